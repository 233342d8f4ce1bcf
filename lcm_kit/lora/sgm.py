"""SDXL LoRA module names in the SGM layout: the UNet of Stability's generative-models code, which kohya sd-scripts
trains SDXL LoRAs on and by which A1111 / Forge and ComfyUI name SDXL LoRA modules
(``lora_unet_input_blocks_4_1_…``).

diffusers' SD 1.x names (``lora_unet_down_blocks_...``) are what the SD 1.x tools expect and are kept there. For SDXL
those names are not enough: sd-scripts matches none of them, and A1111's name conversion assumes SD 1.x's block
layout (an up block's upsampler without attention before it), so an SDXL file uses this layout instead.

The map from a diffusers module path to its SGM path, for ``layers_per_block = n`` (SDXL: 2), ``p = n + 1``:

* ``down_blocks.b.resnets.l`` / ``.attentions.l`` -> ``input_blocks.(1 + b p + l).0`` / ``.1``;
  ``down_blocks.b.downsamplers.0.conv`` -> ``input_blocks.((b + 1) p).0.op``;
* ``mid_block.resnets.0`` / ``.attentions.0`` / ``.resnets.1`` -> ``middle_block.0`` / ``.1`` / ``.2``;
* ``up_blocks.b.resnets.l`` / ``.attentions.l`` -> ``output_blocks.(b p + l).0`` / ``.1``;
  ``up_blocks.b.upsamplers.0.conv`` -> ``output_blocks.(b p + n).2.conv`` (``.1.conv`` in a block without attention);
* ``conv_in``, ``time_embedding``, ``add_embedding``, ``conv_norm_out``, ``conv_out`` -> ``input_blocks.0.0``,
  ``time_embed``, ``label_emb.0``, ``out.0``, ``out.2``.

Inside a resnet, ``conv1 / conv2 / norm1 / norm2 / time_emb_proj / conv_shortcut`` become ``in_layers.2 / out_layers.3
/ in_layers.0 / out_layers.0 / emb_layers.1 / skip_connection``; transformer blocks keep their names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "norm1": "in_layers.0", "norm2": "out_layers.0",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
       "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
       "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip


def is_sdxl_unet(config: Mapping[str, Any]) -> bool:
    """An SDXL UNet config (``addition_embed_type="text_time"``): its LoRA files use SGM names."""
    return config.get("addition_embed_type") == "text_time"


def _inner(kind: str, rest: list[str]) -> str:
    """``0.<resnet part>`` or ``1.<transformer part>`` of a block entry."""
    if kind == "resnets":
        return ".".join(["0", RESNET.get(rest[0], rest[0]), *rest[1:]])
    return ".".join(["1", *rest])


def sgm_module(module: str, config: Mapping[str, Any]) -> str:
    """The SGM path of the diffusers module path ``module`` of an SDXL UNet with this ``config`` (module docstring).

    Raises:
        ValueError: For a path outside the UNet's blocks and top-level layers.
    """
    for name, sgm in TOP.items():
        if module == name or module.startswith(name + "."):
            return sgm + module[len(name) :]
    parts, per = module.split("."), int(config["layers_per_block"]) + 1
    try:
        if parts[0] == "mid_block" and parts[1] in ("resnets", "attentions"):
            index = 1 if parts[1] == "attentions" else 2 * int(parts[2])
            return ".".join([f"middle_block.{index}", *_inner(parts[1], parts[3:]).split(".")[1:]])
        block, kind = int(parts[1]), parts[2]
        if parts[0] == "down_blocks" and kind == "downsamplers":
            return ".".join([f"input_blocks.{(block + 1) * per}.0.op", *parts[5:]])
        if parts[0] == "up_blocks" and kind == "upsamplers":
            with_attention = "CrossAttn" in config["up_block_types"][block]
            return ".".join([f"output_blocks.{block * per + per - 1}.{2 if with_attention else 1}.conv", *parts[5:]])
        if kind in ("resnets", "attentions") and parts[0] in ("down_blocks", "up_blocks"):
            layer = int(parts[3])
            index = 1 + block * per + layer if parts[0] == "down_blocks" else block * per + layer
            where = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
            return f"{where}.{index}.{_inner(kind, parts[4:])}"
    except (IndexError, ValueError):
        pass
    raise ValueError(f"no SGM name for the SDXL UNet module {module!r}")
