"""Building blocks of the distillation script (``train/distill_lora.py``): teacher loading, the two network layouts,
the UNet callables handed to :func:`lcm_kit.loss.consistency_distillation_loss`, one training micro-step, EMA.

Layouts (``mode``):

* ``lora`` -- one UNet: the teacher's own UNet with an LCM-LoRA adapter (:func:`lcm_kit.lora.add_lcm_lora`). The
  teacher is that UNet inside :func:`lcm_kit.lora.teacher_mode` (cond + uncond batched in one call); the target is
  the same UNet with its adapter, without gradients (no EMA), as diffusers' LCM-LoRA scripts.
* ``full`` -- a student UNet with a guidance-scale embedding (``time_cond_proj_dim``) initialised from the teacher
  (the new ``time_embedding.cond_proj`` is zero, so the student starts equal to the teacher), a frozen teacher
  UNet, and an EMA copy of the student as the target network (LCM paper, Algorithm 1).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import functional as F
from .latent_cache import encode_posterior, encode_prompts
from .lora import add_lcm_lora, teacher_mode
from .loss import DistillLossConfig, DistillLossOutput, consistency_distillation_loss
from .schedules import alphas_cumprod_from_betas, make_betas


@dataclass
class Teacher:
    """The frozen parts of the teacher SD pipeline and its noise table."""

    path: str
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) float32
    prediction_type: str
    scheduler_config: dict


@dataclass
class Networks:
    """What the step trains and calls. ``teacher``/``target`` are ``None`` in LoRA mode (the student serves)."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    target: torch.nn.Module | None
    params: list[torch.nn.Parameter]  # trainable parameters, held in a list (clip_grad_norm_ must see them all)
    w_dim: int | None  # width of the student's guidance embedding (full mode), None for LoRA


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    """The dtype of frozen weights: fp16 / bf16 under mixed precision, else fp32 (trainable params stay fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def load_teacher(path: str, device: torch.device, weight_dtype: torch.dtype) -> Teacher:
    """Loads tokenizer, text encoder (``weight_dtype``), VAE (fp32, as diffusers' SD scripts) and UNet (fp32).

    Raises:
        ValueError: if the teacher UNet already has a guidance embedding (distill from a plain SD UNet).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .scheduler import LCMKitScheduler

    sched = dict(LCMKitScheduler.load_config(path, subfolder="scheduler"))
    betas = make_betas(
        sched.get("num_train_timesteps", 1000),
        sched.get("beta_start", 0.00085),
        sched.get("beta_end", 0.012),
        sched.get("beta_schedule", "scaled_linear"),
        sched.get("trained_betas"),
        sched.get("rescale_betas_zero_snr", False),
    )
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError(f"teacher UNet at {path!r} already has a guidance embedding; distill from a plain SD UNet")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    for m in (text_encoder, vae):
        m.requires_grad_(False).eval()
    return Teacher(
        path=path,
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        text_encoder=text_encoder.to(device, weight_dtype),
        vae=vae.to(device),
        unet=unet.to(device),
        alphas_cumprod=alphas_cumprod_from_betas(betas),
        prediction_type=sched.get("prediction_type", "epsilon"),
        scheduler_config=sched,
    )


def w_student_from(teacher_unet: torch.nn.Module, time_cond_proj_dim: int) -> torch.nn.Module:
    """A UNet with a guidance embedding, weights copied from the teacher, ``cond_proj`` zero (student == teacher)."""
    from diffusers import UNet2DConditionModel

    config = {**teacher_unet.config, "time_cond_proj_dim": time_cond_proj_dim}
    student = UNet2DConditionModel.from_config(config).to(teacher_unet.device)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"time_embedding.cond_proj.weight"}, (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.train()


def build_networks(mode: str, teacher: Teacher, weight_dtype: torch.dtype, **opts: Any) -> Networks:
    """The ``lora`` or ``full`` layout (module docstring). ``opts``: ``lora_rank``, ``lora_alpha``, ``lora_dropout``
    (lora) or ``time_cond_proj_dim`` (full)."""
    unet = teacher.unet
    if mode == "lora":
        unet.to(dtype=weight_dtype)
        add_lcm_lora(unet, opts["lora_rank"], opts.get("lora_alpha"), opts.get("lora_dropout", 0.0))
        unet.train()
        return Networks(unet, None, None, [p for p in unet.parameters() if p.requires_grad], None)
    student = w_student_from(unet, opts["time_cond_proj_dim"])
    target = copy.deepcopy(student).requires_grad_(False).eval()  # EMA target, fp32 like the student
    frozen = unet.requires_grad_(False).eval().to(dtype=weight_dtype)
    teacher.unet = frozen
    params = [p for p in student.parameters() if p.requires_grad]
    return Networks(student, frozen, target, params, opts["time_cond_proj_dim"])


def call_unet(unet, z, t, embeds, w=None, w_dim=None, dtype=torch.float32) -> torch.Tensor:
    """Raw UNet output for ``z (B,C,H,W)``, ``t (B,)``, text ``embeds (B,L,D)`` and, with ``w_dim``, ``w (B,)``."""
    cond = F.guidance_scale_embedding(w, w_dim).to(dtype) if w_dim else None
    return unet(z.to(dtype), t, encoder_hidden_states=embeds.to(dtype), timestep_cond=cond).sample


def make_callables(nets: Networks, base: torch.nn.Module, embeds, uncond, weight_dtype) -> tuple[Callable, ...]:
    """``(student, teacher, target)`` for the loss. ``base`` is the unwrapped student (no DDP for no-grad calls)."""
    s_dtype = weight_dtype if nets.teacher is None else torch.float32

    def student(z, t, w):
        return call_unet(nets.student, z, t, embeds, w, nets.w_dim, s_dtype)

    def teacher(z, t):  # cond and uncond batched in one UNet call
        z2, t2, e2 = torch.cat([z, z]), torch.cat([t, t]), torch.cat([embeds, uncond.expand_as(embeds)])
        if nets.teacher is None:
            with teacher_mode(base):
                out = call_unet(base, z2, t2, e2, dtype=weight_dtype)
        else:
            out = call_unet(nets.teacher, z2, t2, e2, dtype=weight_dtype)
        return out.chunk(2)

    def target(z, t, w):
        return call_unet(nets.target if nets.target is not None else base, z, t, embeds, w, nets.w_dim, s_dtype)

    return student, teacher, target


def step_generator(seed: int, rank: int, micro_step: int) -> torch.Generator:
    """The CPU generator of one micro-step: a pure function of (seed, rank, step), so resume needs no RNG state."""
    digest = hashlib.sha256(f"step/{seed}/{rank}/{micro_step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@torch.no_grad()
def batch_inputs(batch: dict, teacher: Teacher, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(latents (B,C,h,w) times scaling_factor, prompt_embeds (B,L,D))`` from a cached or a pixel batch.

    Both paths draw ``mean + std * eps`` from the VAE posterior with ``generator`` (``latent_dist.sample()``).
    """
    device = teacher.vae.device
    if "latent_mean" in batch:
        mean, std, embeds = batch["latent_mean"], batch["latent_std"], batch["prompt_embeds"]
    else:
        mean, std = encode_posterior(teacher.vae, batch["pixel_values"])
        embeds = encode_prompts(teacher.tokenizer, teacher.text_encoder, list(batch["caption"]))
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device, mean.dtype)
    return (mean + std * eps).float().to(device), embeds.to(device)


def distill_loss(
    nets: Networks, base, batch, teacher: Teacher, loss_config: DistillLossConfig, uncond, generator, weight_dtype,
    data_scale: float = 1.0,
) -> DistillLossOutput:  # fmt: skip
    """The LCD loss of one micro-batch (``data_scale`` multiplies the latents: a test hook for non-finite data)."""
    latents, embeds = batch_inputs(batch, teacher, generator)
    fns = make_callables(nets, base, embeds, uncond, weight_dtype)
    return consistency_distillation_loss(
        *fns, latents * data_scale, teacher.alphas_cumprod, loss_config, generator=generator
    )


@torch.no_grad()
def update_ema(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """``theta^- <- decay * theta^- + (1 - decay) * theta`` (LCM Algorithm 1, last line)."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.mul_(decay).add_(s.detach().to(t.dtype), alpha=1 - decay)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted keys and float32 bytes of a state dict (to compare ranks / runs / saved files)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
