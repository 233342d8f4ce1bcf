"""Files of a distillation run: checkpoints (accelerate state + safetensors weights), final weights, model card,
validation grids.

Checkpoint layout ``<output_dir>/checkpoint-<step>/``: accelerate's ``save_state`` (optimizer, LR scheduler, RNG
states, gradient-accumulation step) plus our hook's weights, safetensors only: ``pytorch_lora_weights.safetensors``
(lora mode; the base UNet is not duplicated) or ``unet/`` + ``unet_target/`` (full mode, the EMA target included),
and ``training_state.json`` (``global_step``). A checkpoint is written to ``checkpoint-<step>.tmp`` and renamed when
complete, so ``--resume_from_checkpoint latest`` never picks a half-written one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .lora import LORA_WEIGHT_NAME, save_lora

logger = logging.getLogger(__name__)
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def register_hooks(accelerator, nets) -> None:
    """Save/load hooks: our safetensors weights replace accelerate's full-model dump (see module docstring)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    def save_hook(models, weights, output_dir):
        student = accelerator.unwrap_model(nets.student)
        if accelerator.is_main_process:
            if nets.target is None:
                save_lora(student, output_dir)
            else:
                student.save_pretrained(os.path.join(output_dir, "unet"))
                nets.target.save_pretrained(os.path.join(output_dir, "unet_target"))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        student = accelerator.unwrap_model(nets.student)
        while models:
            models.pop()
        if nets.target is None:
            state = load_file(os.path.join(input_dir, LORA_WEIGHT_NAME))
            result = set_peft_model_state_dict(student, {k.removeprefix("unet."): v for k, v in state.items()})
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"checkpoint LoRA keys do not match the model: {result.unexpected_keys[:5]}")
        else:
            for module, sub in ((student, "unet"), (nets.target, "unet_target")):
                sd = load_file(os.path.join(input_dir, sub, "diffusion_pytorch_model.safetensors"))
                module.load_state_dict(sd)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    found = [p for p in root.iterdir() if p.is_dir() and _CKPT.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(_CKPT.match(p.name).group(1)))


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None) -> Path:
    """Saves ``checkpoint-<step>`` on all processes (temp dir + rename on the main one), prunes to ``total_limit``."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "training_state.json").write_text(json.dumps({"global_step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        old = list_checkpoints(output_dir)
        for path in old[: max(0, len(old) - total_limit)] if total_limit else []:
            shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(output_dir: str, resume: str | None) -> Path | None:
    """``None`` / ``"latest"`` (newest complete checkpoint, or none yet) / a path -> the checkpoint to load.

    Raises:
        ValueError: an explicit path that is not a checkpoint folder.
    """
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "training_state.json").is_file():
        raise ValueError(f"resume_from_checkpoint {resume!r} is not a checkpoint folder (no training_state.json)")
    return path


def load_checkpoint(accelerator, path: Path) -> int:
    """Loads accelerate state + weights from ``path``; returns its ``global_step``."""
    accelerator.load_state(str(path))
    return int(json.loads((path / "training_state.json").read_text())["global_step"])


def save_final(accelerator, nets, teacher, output_dir: str, save_kohya: bool) -> list[Path]:
    """LoRA: ``pytorch_lora_weights.safetensors`` (+ kohya). Full: an ``LCMPipeline`` folder with the EMA UNet."""
    if not accelerator.is_main_process:
        return []
    student = accelerator.unwrap_model(nets.student)
    if nets.target is None:
        return save_lora(student, output_dir, kohya=save_kohya)
    from .pipeline import LCMPipeline
    from .scheduler import LCMKitScheduler

    pipe = LCMPipeline(  # training is over: the text encoder goes back to fp32 (it ran in the mixed dtype)
        vae=teacher.vae,
        text_encoder=teacher.text_encoder.to(torch.float32),
        tokenizer=teacher.tokenizer,
        unet=nets.target,
        scheduler=LCMKitScheduler.from_config(teacher.scheduler_config),
    )
    pipe.save_pretrained(output_dir)
    student.save_pretrained(os.path.join(output_dir, "unet_online"))
    return [Path(output_dir) / "model_index.json"]


MODEL_CARD = """---
library_name: diffusers
tags: [lcm, latent-consistency-model, {tag}, lcm_kit]
base_model: {teacher}
---
# {title}

Distilled with `lcm_kit` (`train/distill_lora.py --mode {mode}`) from the teacher `{teacher}`:
{steps} optimizer steps, batch {batch} x {accum} accumulation x {procs} process(es), lr {lr}, w ~ U[{w_min}, {w_max}]
(LCM convention, w = guidance_scale - 1), {ddim} DDIM solver steps, {loss} loss{extra}.
The resolved training config is `training_config.json`.

## Use
{usage}
"""

LORA_USAGE = """Stock diffusers (an LCM-LoRA has no guidance embedding: guidance_scale 1-2):
```python
from diffusers import LCMScheduler, StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{teacher}")
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
pipe.load_lora_weights("{out}")
image = pipe("a photo of a cat", num_inference_steps=4, guidance_scale=1.0).images[0]
```
lcm_kit:
```python
from lcm_kit.pipeline import LCMPipeline
pipe = LCMPipeline.from_pretrained("{teacher}")
pipe.load_lora_weights("{out}")
image = pipe("a photo of a cat", num_inference_steps=4).images[0]
```"""

FULL_USAGE = """A full pipeline folder (the UNet is the EMA target network; `unet_online/` is the online student):
```python
from lcm_kit.pipeline import LCMPipeline
pipe = LCMPipeline.from_pretrained("{out}")
image = pipe("a photo of a cat", num_inference_steps=4, guidance_scale=8.5).images[0]
```
Stock diffusers: `LatentConsistencyModelPipeline.from_pretrained("{out}")`."""


def write_model_card(output_dir: str, cfg: dict[str, Any], steps: int, procs: int) -> Path:
    """A short ``README.md``: teacher, settings, how to load the result."""
    lora = cfg["mode"] == "lora"
    extra = f", LoRA rank {cfg['lora_rank']} alpha {cfg['lora_alpha'] or cfg['lora_rank']}" if lora else (
        f", EMA decay {cfg['ema_decay']}, w-embedding {cfg['time_cond_proj_dim']}"
    )  # fmt: skip
    usage = (LORA_USAGE if lora else FULL_USAGE).format(teacher=cfg["pretrained_teacher_model"], out=output_dir)
    text = MODEL_CARD.format(
        tag="lora" if lora else "full", title="LCM-LoRA" if lora else "Latent Consistency Model", mode=cfg["mode"],
        teacher=cfg["pretrained_teacher_model"], steps=steps, batch=cfg["train_batch_size"],
        accum=cfg["gradient_accumulation_steps"], procs=procs, lr=cfg["learning_rate"], w_min=cfg["w_min"],
        w_max=cfg["w_max"], ddim=cfg["num_ddim_timesteps"], loss=cfg["loss_type"], extra=extra, usage=usage,
    )  # fmt: skip
    path = Path(output_dir) / "README.md"
    path.write_text(text)
    return path


@torch.no_grad()
def validation_grid(accelerator, nets, teacher, prompts: list[str], seed: int, step_counts=(1, 2, 4)):
    """Student samples (rows: prompts, columns: 1/2/4 steps, fixed seeds) as one PIL grid, via ``LCMPipeline``.

    Runs inside ``torch.random.fork_rng`` so the training RNG streams are untouched (resume stays exact).
    """
    from PIL import Image

    from .pipeline import LCMPipeline
    from .scheduler import LCMKitScheduler

    unet = nets.target if nets.target is not None else accelerator.unwrap_model(nets.student)
    was_training = unet.training
    pipe = LCMPipeline(
        vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer, unet=unet.eval(),
        scheduler=LCMKitScheduler.from_config(teacher.scheduler_config),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    images = []
    with torch.random.fork_rng(devices=[]), accelerator.autocast():  # components may mix fp32 and bf16/fp16
        for i, prompt in enumerate(prompts):
            for n in step_counts:
                gen = torch.Generator().manual_seed(seed + i)
                images.append(pipe(prompt, num_inference_steps=n, generator=gen, output_type="pil").images[0])
    unet.train(was_training)
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(step_counts), h * len(prompts)))
    for k, img in enumerate(images):
        grid.paste(img, ((k % len(step_counts)) * w, (k // len(step_counts)) * h))
    return grid
