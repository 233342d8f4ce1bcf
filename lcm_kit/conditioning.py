"""The text conditioning of a teacher UNet during distillation: SD 1.x/2.x (one CLIP encoder) or SDXL (two).

* :class:`TextCond` -- what a UNet call is conditioned on besides the latents, the timestep and ``w``: the caption
  hidden states and, for SDXL, the pooled embedding and the six size / crop ids (``added_cond_kwargs``).
* :class:`PromptEncoder` -- captions to the tensors of a :class:`TextCond` (what the latent cache stores), and the
  unconditional branch of the teacher's classifier-free guidance.

SDXL follows diffusers' ``StableDiffusionXLPipeline.encode_prompt`` (no ``clip_skip``): each encoder's penultimate
hidden states, concatenated along the feature axis; the pooled (projected) embedding of the second encoder. The
unconditional branch is all zeros when the folder's ``force_zeros_for_empty_prompt`` is true (SDXL base's setting,
as diffusers' SDXL LCM scripts train), else the encoding of the empty prompt. The time ids are
``(original_height, original_width, crop_top, crop_left, target_height, target_width)`` (SDXL, arXiv 2307.01952,
section 2.2): the image's size before resizing, the crop's top-left corner in the resized image, the training size,
made per sample by :func:`lcm_kit.transforms.size_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .functional import drop_condition


class TextCond(NamedTuple):
    """A batch's conditioning: ``embeds (B,L,D)``; SDXL adds ``pooled (B,P)`` and ``time_ids (B,6)``."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def unet_kwargs(self, dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments of ``UNet2DConditionModel.forward`` (``encoder_hidden_states``, SDXL's
        ``added_cond_kwargs``) in ``dtype``."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.embeds.to(dtype)}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled.to(dtype), "time_ids": self.time_ids.to(dtype)}
        return kwargs

    def cat(self, other: TextCond) -> TextCond:
        """``self`` and ``other`` batched (cond + uncond in one UNet call)."""
        return TextCond(*(None if a is None else torch.cat([a, b]) for a, b in zip(self, other, strict=True)))

    def to(self, device: torch.device | str) -> TextCond:
        return TextCond(*(None if a is None else a.to(device) for a in self))

    def dropped(self, uncond: TextCond, drop: torch.Tensor) -> TextCond:
        """Caption dropout: the text of each example with ``drop (B,)`` true becomes ``uncond``'s (batch 1); the time
        ids stay (they describe the image, not the caption)."""
        pooled = None if self.pooled is None else drop_condition(self.pooled, uncond.pooled, drop)
        return TextCond(drop_condition(self.embeds, uncond.embeds, drop), pooled, self.time_ids)

    def unconditional(self, uncond: TextCond) -> TextCond:
        """``uncond`` (batch 1) expanded to this batch, with this batch's time ids (diffusers' SDXL scripts)."""
        n = self.embeds.shape[0]
        pooled = None if uncond.pooled is None else uncond.pooled.to(self.pooled).expand(n, -1)
        return TextCond(uncond.embeds.to(self.embeds).expand_as(self.embeds), pooled, self.time_ids)


@dataclass
class PromptEncoder:
    """The teacher's tokenizer(s) and text encoder(s); ``xl``: SDXL's pair (module docstring)."""

    tokenizers: list[Any]
    text_encoders: list[torch.nn.Module]
    force_zeros_for_empty_prompt: bool = False  # SDXL: the unconditional branch is zeros

    @property
    def xl(self) -> bool:
        return len(self.text_encoders) == 2

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """``{"prompt_embeds": (B,L,D)}`` (SD: last hidden states), plus ``"pooled_prompt_embeds": (B,P)`` (SDXL)."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids  # fmt: skip
            out = encoder(ids.to(encoder.device), output_hidden_states=self.xl)
            hidden.append(out.hidden_states[-2] if self.xl else out[0])
            pooled = out[0] if self.xl else None
        embeds = {"prompt_embeds": torch.cat(hidden, dim=-1)}
        return embeds if pooled is None else {**embeds, "pooled_prompt_embeds": pooled}

    def uncond(self) -> TextCond:
        """The teacher's unconditional text (batch 1; no time ids: :meth:`TextCond.unconditional` adds them)."""
        out = self([""])
        embeds, pooled = out["prompt_embeds"], out.get("pooled_prompt_embeds")
        if self.force_zeros_for_empty_prompt:
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        return TextCond(embeds, pooled)
