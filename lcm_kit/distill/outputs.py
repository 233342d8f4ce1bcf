"""What a distillation run writes: the resolved config, the student's scheduler, the final weights (the LoRA in the
kohya-ss layout, optionally also in the PEFT layout, or a full ``LCMPipeline`` folder), the model card and validation
grids.

The objective's sampling contract (:meth:`lcm_kit.distill.objectives.Objective.sampling`) is where the training
settings become sampler settings (the solver grid ``original_inference_steps``, ``timestep_scaling``, ``sigma_data``,
``gamma``, the default steps); :func:`student_scheduler` turns it into the scheduler that validation and the saved
pipeline use, and the model card and the LoRA metadata record it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..atomic import check_writable as check_writable  # re-exported: the loop checks output_dir here
from ..contract import SamplingContract
from ..functional import guidance_scale_from_w
from ..lora import PEFT_WEIGHT_NAME, save_lora
from ..scheduler import LCMKitScheduler
from .config import RunConfig
from .networks import Networks, Teacher


def student_scheduler(teacher: Teacher, contract: SamplingContract) -> LCMKitScheduler:
    """The scheduler the trained student samples with: the teacher's noise schedule plus the grid, boundary scalings
    and ``gamma`` of its contract (:meth:`lcm_kit.distill.objectives.Objective.sampling`), and the whole contract under
    ``sampling_contract``."""
    return LCMKitScheduler.from_config(teacher.scheduler.config, **contract.scheduler,
                                       sampling_contract=contract.to_dict())  # fmt: skip


def student_pipeline(teacher: Teacher, unet: torch.nn.Module, scheduler: LCMKitScheduler):
    """An ``LCMPipeline`` (``LCMXLPipeline`` for an SDXL teacher) of the teacher's VAE and text side and ``unet``."""
    if not teacher.xl:
        from ..pipeline import LCMPipeline

        return LCMPipeline(unet=unet, scheduler=scheduler, **teacher.components())
    from ..pipeline_xl import LCMXLPipeline

    zeros = teacher.text.force_zeros_for_empty_prompt
    return LCMXLPipeline(unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=zeros, add_watermarker=False,
                         **teacher.components())  # fmt: skip


def sampling_columns(sampling: SamplingContract) -> list[dict]:
    """Pipeline arguments of the validation grid's columns: the fixed schedule of a phased student, else 1/2/4
    steps."""
    if sampling.timesteps is not None:
        return [{"timesteps": list(sampling.timesteps)}]
    return [{"num_inference_steps": n} for n in (1, 2, 4)]


def write_config(config: RunConfig) -> Path:
    """Dumps the resolved config (every flag, the teacher's ``prediction_type`` included) to training_config.json."""
    path = Path(config.output.output_dir) / "training_config.json"
    path.write_text(json.dumps(config.resolved(), indent=2))
    return path


def save_final(nets: Networks, student: torch.nn.Module, teacher: Teacher, contract: SamplingContract,
               output_dir: str, save_peft_layout: bool) -> list[Path]:  # fmt: skip
    """LoRA: ``pytorch_lora_weights.safetensors`` (kohya-ss layout; + the PEFT-layout file) of
    :attr:`Networks.sampling_adapter`, the sampling contract in their metadata. Full: an ``LCMPipeline`` folder with
    the EMA UNet and :func:`student_scheduler` (contract in its config; ``unet_online/`` holds the online student).
    ``student`` is the unwrapped student."""
    if nets.target is None:
        return save_lora(student, output_dir, peft_layout=save_peft_layout, metadata=contract.as_metadata(),
                         adapter_name=nets.sampling_adapter)  # fmt: skip
    for encoder in teacher.text.text_encoders:  # training is over: back to fp32 (they ran in the mixed dtype)
        encoder.to(torch.float32)
    student_pipeline(teacher, nets.target, student_scheduler(teacher, contract)).save_pretrained(output_dir)
    student.save_pretrained(os.path.join(output_dir, "unet_online"))
    return [Path(output_dir) / "model_index.json"]


MODEL_CARD = """---
library_name: diffusers
tags: [lcm, latent-consistency-model, {tag}, lcm_kit]
base_model: {teacher}
---
# {title}

Distilled with `lcm_kit` (`train/distill_lora.py --mode {mode} --objective {objective}`) from the teacher
`{teacher}`: {steps} optimizer steps, batch {batch} x {accum} accumulation x {procs} process(es), lr {lr},
{recipe}, {loss} loss{extra}.
The resolved training config is `training_config.json`.

Sampling contract (what it was trained for): {contract}. Sample it with `LCMKitScheduler` set to {sampler}.

## Use
{usage}
"""

LORA_USAGE = """`pytorch_lora_weights.safetensors` is in the kohya-ss layout (`lora_unet_...` keys, each module's alpha
stored): put it into ComfyUI's `models/loras`, A1111's / Forge's `models/Lora` or kohya sd-scripts; diffusers'
`load_lora_weights` loads it as well.{peft_file}

lcm_kit applies the sampling contract stored in the file when the LoRA is loaded:
```python
from lcm_kit import {pipeline}
pipe = {pipeline}.from_pretrained("{teacher}")
pipe.load_lora_weights("{out}")
image = pipe("a photo of a cat").images[0]  # {steps}, {cfg_note}
```
Stock diffusers (an LCM-LoRA has no guidance embedding: guidance_scale 1-2):
```python
from diffusers import {stock_scheduler}, {stock_pipeline}
pipe = {stock_pipeline}.from_pretrained("{teacher}")
pipe.scheduler = {stock_scheduler}.from_config(pipe.scheduler.config, {stock_kwargs})
pipe.load_lora_weights("{out}")
image = pipe("a photo of a cat", {steps}, guidance_scale=1.0{stock_eta}).images[0]
```"""

FULL_USAGE = """A full pipeline folder (the UNet is the EMA target network; `unet_online/` is the online student);
its `scheduler/` holds the sampling contract, which `{pipeline}` applies:
```python
from lcm_kit import {pipeline}
pipe = {pipeline}.from_pretrained("{out}")
image = pipe("a photo of a cat", guidance_scale={guidance}).images[0]  # {steps}
```
Stock diffusers loads it as `{stock_full}.from_pretrained("{out}")`; give it `{steps}` and, for a
student with a gamma, `TCDScheduler.from_config(pipe.scheduler.config)` with `eta` = gamma (our sampler equals it)."""


def _recipe(config: RunConfig) -> str:
    """The model card's words for what the student learnt from: the guided teacher's ODE, or data alone (ct)."""
    o = config.objective
    if o.objective != "ct":
        return (f"w ~ U[{o.w_min}, {o.w_max}] (LCM convention, w = guidance_scale - 1), {o.num_ddim_timesteps} DDIM "
                "solver steps")  # fmt: skip
    init = "" if config.model.init == "random" else " and the initial weights"
    return (f"consistency training without a teacher UNet ({o.ct_schedule} curriculum over {o.ct_total_steps} steps, "
            f"caption dropout {o.caption_dropout_p}; the teacher gave the VAE, text encoder, noise schedule{init})")


def write_model_card(config: RunConfig, sampling: SamplingContract, steps: int, procs: int, xl: bool = False) -> Path:
    """A short ``README.md``: teacher, settings, the sampling contract, how to load the result (``xl``: an SDXL
    teacher, loaded with ``LCMXLPipeline`` / ``StableDiffusionXLPipeline``)."""
    m, o, opt = config.model, config.objective, config.optim
    lora = m.mode == "lora"
    ema = f", EMA target adapter (decay {m.ema_decay})" if m.lora_ema else ", target = the student (no EMA)"
    extra = f", LoRA rank {m.lora_rank} alpha {m.lora_scale_alpha}{ema}" if lora else (
        f", EMA decay {m.ema_decay}, w-embedding {m.time_cond_proj_dim}"
    )  # fmt: skip
    sampler = sampling.scheduler
    kwargs = ", ".join(f"{k}={v!r}" for k, v in sampler.items())
    stock_kwargs = ", ".join(f"{k}={sampler[k]!r}" for k in ("original_inference_steps", "timestep_scaling"))
    gamma = sampler["gamma"]
    w_mid = (o.w_min + o.w_max) / 2
    guided = sampling.w_range is not None  # else (ct) a plain UNet trained with caption dropout: CFG is available
    stock = {"stock_scheduler": "LCMScheduler" if gamma is None else "TCDScheduler",
             "stock_eta": "" if gamma is None else f", eta={gamma}",
             "guidance": f"{guidance_scale_from_w(w_mid):g}" if guided else "1.0",
             "pipeline": "LCMXLPipeline" if xl else "LCMPipeline",
             "stock_pipeline": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "stock_full": "StableDiffusionXLPipeline" if xl else "LatentConsistencyModelPipeline",
             "cfg_note": "no CFG (the guidance is distilled in)" if guided else
             "guidance_scale > 1 adds CFG (trained with caption dropout)"}  # fmt: skip
    call = (f"timesteps={list(sampling.timesteps)}" if sampling.timesteps is not None
            else f"num_inference_steps={sampling.num_inference_steps}")  # fmt: skip
    contract = f"objective `{sampling.objective}`, {call}, gamma {sampler['gamma']}"
    peft_file = (f" `{PEFT_WEIGHT_NAME}` holds the same tensors under diffusers' PEFT keys."
                 if config.output.save_peft_layout else "")  # fmt: skip
    usage = (LORA_USAGE if lora else FULL_USAGE).format(teacher=m.pretrained_teacher_model, steps=call,
                                                       out=config.output.output_dir, stock_kwargs=stock_kwargs,
                                                       peft_file=peft_file, **stock)  # fmt: skip
    text = MODEL_CARD.format(
        tag="lora" if lora else "full", title="LCM-LoRA" if lora else "Latent Consistency Model", mode=m.mode,
        objective=o.objective, teacher=m.pretrained_teacher_model, steps=steps, batch=opt.train_batch_size,
        accum=opt.gradient_accumulation_steps, procs=procs, lr=opt.learning_rate, recipe=_recipe(config),
        loss=o.loss_type, extra=extra, sampler=f"`{kwargs}`", usage=usage, contract=contract,
    )  # fmt: skip
    path = Path(config.output.output_dir) / "README.md"
    path.write_text(text)
    return path


@torch.no_grad()
def validation_grid(unet: torch.nn.Module, teacher: Teacher, scheduler: LCMKitScheduler, prompts: list[str],
                    seed: int, autocast, columns: list[dict]):  # fmt: skip
    """Samples of ``unet`` (rows: prompts, columns: pipeline arguments such as ``{"num_inference_steps": 2}``, fixed
    seeds) as one PIL grid, via :func:`student_pipeline`.

    Runs inside ``torch.random.fork_rng`` so the training RNG streams are untouched (resume stays exact);
    ``autocast`` is the accelerator's context (components may mix fp32 and bf16/fp16).
    """
    from PIL import Image

    was_training = unet.training
    pipe = student_pipeline(teacher, unet.eval(), scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = []
    with torch.random.fork_rng(devices=[]), autocast():
        for i, prompt in enumerate(prompts):
            for kwargs in columns:
                gen = torch.Generator().manual_seed(seed + i)
                images.append(pipe(prompt, generator=gen, output_type="pil", **kwargs).images[0])
    unet.train(was_training)
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(columns), h * len(prompts)))
    for k, img in enumerate(images):
        grid.paste(img, ((k % len(columns)) * w, (k // len(columns)) * h))
    return grid


def write_debug_digest(student: torch.nn.Module, config: RunConfig, rank: int) -> Path:
    """Test hook: each rank writes the digest of its trained weights (the LoRA file's tensors or the full student)."""
    from ..lora import kohya_state_dict

    state = kohya_state_dict(student) if config.model.mode == "lora" else student.state_dict()
    path = Path(config.output.output_dir, f"debug_params_rank{rank}.txt")
    path.write_text(state_digest(state))
    return path


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted keys and float32 bytes of a state dict (to compare ranks / runs / saved files)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
