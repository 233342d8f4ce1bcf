"""The one guidance decision of LCM sampling: w-embedding, batched classifier-free guidance, or none.

An LCM UNet (``time_cond_proj_dim`` set in its config) takes the guidance strength ``w`` as an embedding and runs
one conditional pass a step (LCM Sec. 4.1); ``negative_prompt`` has no effect there. A plain SD UNet (e.g. with an
LCM-LoRA) runs classic CFG, cond and uncond batched in one call, only when ``guidance_scale > 1``; otherwise it runs
the conditional pass alone. :meth:`Guidance.decide` makes that decision once, from the UNet config and
``guidance_scale``; the pipeline, the sampler comparison and the examples read it from there. ``w = guidance_scale -
1`` comes from :func:`lcm_kit.functional.guidance_w` (the one place the two conventions meet).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from . import functional as F

GuidanceMode = Literal["w_embedding", "cfg", "none"]
GUIDANCE_MODES: tuple[str, ...] = ("w_embedding", "cfg", "none")
LCM_DEFAULT_GUIDANCE_SCALE = 8.5  # diffusers' LatentConsistencyModelPipeline default (w = 7.5)


def _time_cond_proj_dim(unet_config: Mapping[str, Any] | Any) -> int | None:
    if isinstance(unet_config, Mapping):
        return unet_config.get("time_cond_proj_dim")
    return getattr(unet_config, "time_cond_proj_dim", None)


def has_w_embedding(unet_config: Mapping[str, Any] | Any) -> bool:
    """Whether a UNet with this config takes ``w`` as an embedding (``time_cond_proj_dim`` set): an LCM UNet."""
    return _time_cond_proj_dim(unet_config) is not None


def default_guidance_scale(unet_config: Mapping[str, Any] | Any) -> float:
    """8.5 for an LCM UNet (diffusers' LCM default, ``w = 7.5``); 1.0 (no CFG, one pass a step) for a plain UNet."""
    return LCM_DEFAULT_GUIDANCE_SCALE if has_w_embedding(unet_config) else 1.0


@dataclass(frozen=True)
class Guidance:
    """How a sampler applies guidance, decided once by :meth:`decide`.

    Attributes:
        mode: ``"w_embedding"`` (LCM UNet: ``w`` embedded, one conditional pass), ``"cfg"`` (plain UNet,
            ``guidance_scale > 1``: cond and uncond batched, combined by :func:`lcm_kit.functional.cfg_combine`) or
            ``"none"`` (plain UNet, ``guidance_scale <= 1``: one conditional pass).
        scale: ``guidance_scale`` in the usual convention (``uncond + scale * (cond - uncond)``).
        embedding_dim: Width of the w-embedding (the UNet's ``time_cond_proj_dim``); set only in ``"w_embedding"``.
        w: LCM's guidance strength ``scale - 1`` (:func:`lcm_kit.functional.guidance_w`); derived, not passed.
    """

    mode: GuidanceMode
    scale: float
    embedding_dim: int | None = None
    w: float = field(init=False)

    def __post_init__(self) -> None:
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"mode must be one of {GUIDANCE_MODES}, got {self.mode!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"guidance_scale must be a finite number, got {self.scale}")
        if (self.mode == "w_embedding") != (self.embedding_dim is not None):
            raise ValueError(
                f"embedding_dim must be set exactly in mode 'w_embedding', got mode={self.mode!r}, "
                f"embedding_dim={self.embedding_dim}"
            )
        object.__setattr__(self, "w", float(F.guidance_w(self.scale)))

    @classmethod
    def decide(cls, unet_config: Mapping[str, Any] | Any, guidance_scale: float | None = None) -> Guidance:
        """The guidance for a UNet with ``unet_config`` at ``guidance_scale``.

        Args:
            unet_config: A UNet's config (``unet.config``, a dict, or anything with a ``time_cond_proj_dim``
                attribute).
            guidance_scale: Usual-convention scale; ``None`` gives :func:`default_guidance_scale`.

        Returns:
            ``"w_embedding"`` for an LCM UNet at any scale; for a plain UNet ``"cfg"`` above 1, else ``"none"``.

        Raises:
            ValueError: If ``guidance_scale`` is nan or infinite.
        """
        scale = default_guidance_scale(unet_config) if guidance_scale is None else float(guidance_scale)
        dim = _time_cond_proj_dim(unet_config)
        if dim is not None:
            return cls("w_embedding", scale, embedding_dim=dim)
        return cls("cfg" if scale > 1 else "none", scale)

    @property
    def do_cfg(self) -> bool:
        """Whether an unconditional pass runs (batched with the conditional one)."""
        return self.mode == "cfg"

    @property
    def unet_evals_per_step(self) -> int:
        """UNet evaluations per image and step: 2 with CFG, else 1."""
        return 2 if self.do_cfg else 1

    def embedding(self, batch_size: int) -> torch.Tensor | None:
        """``(batch_size, embedding_dim)`` float32 w-embedding (:func:`lcm_kit.functional.guidance_scale_embedding`
        of ``w``), or ``None`` unless the mode is ``"w_embedding"``."""
        if self.mode != "w_embedding":
            return None
        return F.guidance_scale_embedding(torch.full((batch_size,), self.w), embedding_dim=self.embedding_dim)

    def negative_prompt_unused_reason(self) -> str | None:
        """Why a ``negative_prompt`` would have no effect, or ``None`` when it is used (CFG)."""
        if self.mode == "w_embedding":
            return "with an LCM UNet (time_cond_proj_dim set): guidance is the w embedding"
        if self.mode == "none":
            return f"at guidance_scale={self.scale} <= 1"
        return None

    def warn_if_negative_unused(self, negative_given: bool, stacklevel: int = 2) -> None:
        """Warns when a negative prompt (or its embeddings) was given but has no effect
        (:meth:`negative_prompt_unused_reason`); ``stacklevel`` counts from the caller, as ``warnings.warn``'s."""
        why = self.negative_prompt_unused_reason()
        if why is not None and negative_given:
            warnings.warn(f"negative_prompt has no effect {why}, and no unconditional pass is run",
                          stacklevel=stacklevel + 1)  # fmt: skip


__all__ = ["GUIDANCE_MODES", "Guidance", "GuidanceMode", "default_guidance_scale", "has_w_embedding"]
