"""The networks of a distillation: the frozen teacher, the student and the target, in two layouts.

* ``lora`` -- one UNet: the teacher's own UNet with an LCM-LoRA adapter (:func:`lcm_kit.lora.add_lcm_lora`). The
  teacher is that UNet inside :func:`lcm_kit.lora.teacher_mode` (cond + uncond batched in one call); the target is
  the same UNet with its adapter, without gradients (no EMA), as diffusers' LCM-LoRA scripts; with ``--lora_ema``
  it is a second adapter on the same UNet that follows the trained one as an EMA (:func:`lcm_kit.lora.adapter_mode`).
* ``full`` -- a student UNet with a guidance-scale embedding (``time_cond_proj_dim``) initialised from the teacher
  (the new ``time_embedding.cond_proj`` is zero, so the student starts equal to the teacher), a frozen teacher
  UNet, and an EMA copy of the student as the target network (LCM paper, Algorithm 1). For an objective that is not
  ``guided`` (``ct``) the student is a plain copy of the teacher's UNet (no w-embedding) and the EMA copy is only
  what is sampled and saved. ``--init random`` re-initialises the student (training from scratch).

:meth:`Networks.callables` turns them into the three plain functions an objective calls (:class:`ModelFns`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .. import functional as F
from ..conditioning import PromptEncoder, TextCond
from ..latent_cache import encode_posterior
from ..loading import check_sdxl, check_supported, is_sdxl_folder, load_checked
from ..lora import EMA_ADAPTER, adapter_mode, add_ema_adapter, add_lcm_lora, teacher_mode
from ..scheduler import LCMKitScheduler
from .config import ModelConfig


@dataclass
class Teacher:
    """The frozen parts of the teacher SD / SDXL pipeline and its noise schedule."""

    path: str
    text: PromptEncoder  # tokenizer(s) and text encoder(s), SDXL's pair when ``xl``
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: LCMKitScheduler  # the teacher's noise schedule, LCM defaults elsewhere

    @property
    def xl(self) -> bool:
        """An SDXL teacher (two text encoders, pooled embedding and size / crop ids)."""
        return self.text.xl

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """``(num_train_timesteps,)`` float32 noise table of the teacher."""
        return self.scheduler.alphas_cumprod

    @property
    def prediction_type(self) -> str:
        """The teacher's parameterisation (``epsilon``, ``v_prediction`` or ``sample``)."""
        return self.scheduler.config.prediction_type

    def components(self) -> dict[str, Any]:
        """The text and VAE components of an ``LCMPipeline`` / ``LCMXLPipeline`` (all but unet and scheduler)."""
        names = (("tokenizer", "tokenizer_2"), ("text_encoder", "text_encoder_2"))
        out = {"vae": self.vae}
        for kind, modules in zip(names, (self.text.tokenizers, self.text.text_encoders), strict=True):
            out.update(zip(kind, modules, strict=False))
        return out

    @torch.no_grad()
    def latents_and_cond(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, TextCond]:
        """``(latents (B,C,h,w) times scaling_factor, text conditioning)`` from a cached or a pixel batch.

        Both paths draw ``mean + std * eps`` from the VAE posterior with ``generator`` (``latent_dist.sample()``).
        """
        device = self.vae.device
        if "latent_mean" in batch:
            mean, std, text = batch["latent_mean"], batch["latent_std"], batch
        else:
            mean, std = encode_posterior(self.vae, batch["pixel_values"])
            text = self.text(list(batch["caption"]))
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device, mean.dtype)
        pooled = text["pooled_prompt_embeds"] if self.xl else None
        cond = TextCond(text["prompt_embeds"], pooled, batch["add_time_ids"] if self.xl else None)
        return (mean + std * eps).float().to(device), cond.to(device)


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    """The dtype of frozen weights: fp16 / bf16 under mixed precision, else fp32 (trainable params stay fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def load_teacher(path: str, device: torch.device, weight_dtype: torch.dtype) -> Teacher:
    """Loads tokenizer(s), text encoder(s) (``weight_dtype``), VAE (fp32, as diffusers' SD scripts: SDXL's
    ``force_upcast`` VAE thus always encodes in fp32), UNet (fp32) and the noise schedule
    (``LCMKitScheduler.from_config`` of the folder's scheduler: same betas and prediction type). An SDXL folder
    (UNet ``addition_embed_type="text_time"``) loads both text encoders and its ``force_zeros_for_empty_prompt``.

    Raises:
        ValueError: if the folder is neither SD 1.x/2.x- nor SDXL-style, a component's weights do not all load
            (:mod:`lcm_kit.loading`), or the teacher UNet already has a guidance embedding (distill from a plain
            UNet).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    xl = is_sdxl_folder(path)
    index = check_sdxl(path, {}) if xl else check_supported(path, role="--pretrained_teacher_model")
    if xl and (missing := [c for c in ("text_encoder_2", "tokenizer_2") if not any(index.get(c) or ())]):
        raise ValueError(f"--pretrained_teacher_model {path!r} has an SDXL UNet (addition_embed_type='text_time') but "
                         f"its model_index.json lists no {' / '.join(missing)}: an SDXL teacher needs both text "
                         "encoders (a StableDiffusionXLPipeline folder)")  # fmt: skip
    scheduler = LCMKitScheduler.from_config(LCMKitScheduler.load_config(path, subfolder="scheduler"))
    unet = load_checked(UNet2DConditionModel, path, "unet")
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError(f"teacher UNet at {path!r} already has a guidance embedding; distill from a plain UNet")
    kinds = (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection))[: 1 + xl]
    encoders = [load_checked(cls, path, name) for name, cls in kinds]
    vae = load_checked(AutoencoderKL, path, "vae")
    for m in (*encoders, vae):
        m.requires_grad_(False).eval()
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=sub) for sub in ("tokenizer", "tokenizer_2")[: 1 + xl]]
    zeros = xl and bool(index.get("force_zeros_for_empty_prompt", True))
    text = PromptEncoder(tokenizers, [e.to(device, weight_dtype) for e in encoders], zeros)
    return Teacher(path=path, text=text, vae=vae.to(device), unet=unet.to(device), scheduler=scheduler)


class ModelFns(NamedTuple):
    """The three callables of an objective (shapes: ``z (B,C,H,W)``, ``t (B,)`` long, ``w (B,)``).

    ``student(z, t, w)`` and ``target(z, t, w)`` return the raw conditional output; ``teacher(z, t)`` returns the
    raw ``(cond, uncond)`` outputs. The objective calls ``teacher`` and ``target`` under ``no_grad``.
    """

    student: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    teacher: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    target: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def call_unet(unet, z, t, text: TextCond, w=None, w_dim=None, dtype=torch.float32) -> torch.Tensor:
    """Raw UNet output for ``z (B,C,H,W)``, ``t (B,)``, the ``text`` conditioning and, with ``w_dim``, ``w (B,)``."""
    cond = F.guidance_scale_embedding(w, w_dim).to(dtype) if w_dim else None
    return unet(z.to(dtype), t, timestep_cond=cond, **text.unet_kwargs(dtype)).sample


@dataclass
class Networks:
    """What the step trains and calls. ``teacher``/``target`` are ``None`` in LoRA mode (the student serves)."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    target: torch.nn.Module | None
    params: list[torch.nn.Parameter]  # trainable parameters, held in a list (clip_grad_norm_ must see them all)
    w_dim: int | None  # width of the student's guidance embedding (full mode), None for LoRA
    weight_dtype: torch.dtype  # dtype of the frozen weights
    ema_pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] | None = None  # lora_ema: (ema, online) params
    sample_ema_adapter: bool = False  # lora_ema for an objective without a target (ct): the EMA adapter is sampled

    def ema_update_pairs(self, student: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """``(target, source)`` parameter pairs of the EMA update (empty when the target is the student itself)."""
        if self.target is not None:
            return list(zip(self.target.parameters(), student.parameters(), strict=True))
        return self.ema_pairs or []

    def sampling_unet(self, base: torch.nn.Module) -> torch.nn.Module:
        """The UNet that is saved and validated: the EMA target (full), or the adapted UNet ``base`` (LoRA)."""
        return self.target if self.target is not None else base

    @property
    def sampling_adapter(self) -> str:
        """The LoRA adapter that is saved and validated: the EMA copy (``sample_ema_adapter``) or the trained one."""
        return EMA_ADAPTER if self.sample_ema_adapter else "default"

    def callables(self, base: torch.nn.Module, text: TextCond, uncond: TextCond) -> ModelFns:
        """:class:`ModelFns` for the batch's ``text`` (``uncond``: the teacher's unconditional text, batch 1);
        ``base`` is the unwrapped student (no DDP for no-grad)."""
        dtype = self.weight_dtype
        s_dtype = dtype if self.teacher is None else torch.float32

        def student(z, t, w):
            return call_unet(self.student, z, t, text, w, self.w_dim, s_dtype)

        def teacher(z, t):  # cond and uncond batched in one UNet call
            z2, t2, both = torch.cat([z, z]), torch.cat([t, t]), text.cat(text.unconditional(uncond))
            if self.teacher is None:
                with teacher_mode(base):
                    out = call_unet(base, z2, t2, both, dtype=dtype)
            else:
                out = call_unet(self.teacher, z2, t2, both, dtype=dtype)
            return out.chunk(2)

        def target(z, t, w):
            if self.ema_pairs:
                with adapter_mode(base, EMA_ADAPTER):
                    return call_unet(base, z, t, text, w, self.w_dim, s_dtype)
            return call_unet(self.sampling_unet(base), z, t, text, w, self.w_dim, s_dtype)

        return ModelFns(student, teacher, target)


def w_student_from(teacher_unet: torch.nn.Module, time_cond_proj_dim: int) -> torch.nn.Module:
    """A UNet with a guidance embedding, weights copied from the teacher, ``cond_proj`` zero (student == teacher)."""
    from diffusers import UNet2DConditionModel

    config = {**teacher_unet.config, "time_cond_proj_dim": time_cond_proj_dim}
    student = UNet2DConditionModel.from_config(config).to(teacher_unet.device)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"time_embedding.cond_proj.weight"}, (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.train()


def full_student_from(teacher_unet: torch.nn.Module, config: ModelConfig, guided: bool) -> torch.nn.Module:
    """The trainable full-mode student: with a w-embedding (``guided``, :func:`w_student_from`) or a plain fp32 copy
    of the teacher's UNet; with ``config.init == "random"`` the same architecture from fresh random weights (drawn
    from the global RNG, which the loop seeds)."""
    from diffusers import UNet2DConditionModel

    if guided:
        student = w_student_from(teacher_unet, config.time_cond_proj_dim)
    else:
        student = copy.deepcopy(teacher_unet).float().requires_grad_(True).train()
    if config.init == "random":
        student = UNet2DConditionModel.from_config(student.config).to(teacher_unet.device).train()
    return student


def build_networks(config: ModelConfig, teacher: Teacher, weight_dtype: torch.dtype, guided: bool = True) -> Networks:
    """The ``lora`` or ``full`` layout of ``config.mode`` (module docstring); full mode replaces ``teacher.unet``
    with its frozen ``weight_dtype`` copy. ``guided``: the objective's (full mode: a w-embedding student)."""
    unet = teacher.unet
    if config.mode == "lora":
        unet.to(dtype=weight_dtype)
        add_lcm_lora(unet, config.lora_rank, config.lora_alpha, config.lora_dropout)
        pairs = add_ema_adapter(unet) if config.lora_ema else None
        unet.train()
        params = [p for p in unet.parameters() if p.requires_grad]
        return Networks(unet, None, None, params, None, weight_dtype, pairs, bool(pairs) and not guided)
    student = full_student_from(unet, config, guided)
    target = copy.deepcopy(student).requires_grad_(False).eval()  # EMA target, fp32 like the student
    frozen = unet.requires_grad_(False).eval().to(dtype=weight_dtype)
    teacher.unet = frozen
    params = [p for p in student.parameters() if p.requires_grad]
    return Networks(student, frozen, target, params, config.time_cond_proj_dim if guided else None, weight_dtype)


@torch.no_grad()
def update_ema(pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]], decay: float) -> None:
    """``theta^- <- decay * theta^- + (1 - decay) * theta`` for each ``(theta^-, theta)`` (LCM Algorithm 1, last
    line)."""
    for t, s in pairs:
        t.mul_(decay).add_(s.detach().to(t.dtype), alpha=1 - decay)
