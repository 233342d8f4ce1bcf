"""Checks of :class:`lcm_kit.LCMXLPipeline`'s folder and of the call arguments SDXL adds, run before any model.

The arguments shared with :class:`lcm_kit.LCMPipeline` are checked by :mod:`lcm_kit.pipeline_inputs`.
"""

from __future__ import annotations

from typing import Any

import torch


def check_xl_args(prompt_2: Any, negative_prompt_2: Any, prompt_embeds: torch.Tensor | None,
                  pooled_prompt_embeds: torch.Tensor | None, negative_prompt_embeds: torch.Tensor | None,
                  negative_pooled_prompt_embeds: torch.Tensor | None, batch_size: int) -> None:  # fmt: skip
    """Raises ``ValueError`` naming the argument unless the second prompts match the batch and each embeddings
    tensor comes with its pooled embeddings ``(batch, projection_dim)``."""
    for name, value in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)):
        if isinstance(value, list) and len(value) != batch_size:
            raise ValueError(f"{name} has {len(value)} prompts for a batch of {batch_size} prompts")
        if value is not None and not isinstance(value, str | list):
            raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
    pairs = (("prompt_embeds", prompt_embeds, pooled_prompt_embeds),
             ("negative_prompt_embeds", negative_prompt_embeds, negative_pooled_prompt_embeds))  # fmt: skip
    for name, embeds, pooled in pairs:
        if embeds is None:
            continue
        pooled_name = name.replace("prompt_embeds", "pooled_prompt_embeds")
        if pooled is None:
            raise ValueError(f"{name} needs {pooled_name} too (SDXL's UNet takes text_encoder_2's pooled embedding)")
        if not isinstance(pooled, torch.Tensor) or pooled.ndim != 2 or pooled.shape[0] != embeds.shape[0]:
            shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
            raise ValueError(f"{pooled_name} must be a tensor ({embeds.shape[0]}, projection_dim), got {shape}")


__all__ = ["check_xl_args"]
