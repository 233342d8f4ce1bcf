"""LCM-LoRA files: safetensors that stock diffusers' ``load_lora_weights`` reads, and the kohya-ss layout.

Files hold the plain ``get_peft_model_state_dict`` keys with a ``unet.`` prefix (``convert_state_dict_to_diffusers``
would mix ``.lora.down`` attention keys with ``lora_A`` conv keys, which diffusers then silently drops in part). Rank
and alpha go into the file's metadata, both in diffusers' ``lora_adapter_metadata`` and as ``lcm_kit.rank`` /
``lcm_kit.alpha``; the distiller adds the sampling contract (:mod:`lcm_kit.contract`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..atomic import save_safetensors
from .adapters import _strip_prefix, _unwrap, lora_state_dict

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
_DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def _rank_alpha_targets(unet: torch.nn.Module) -> tuple[int, float, list[str]]:
    model = _unwrap(unet)
    config = model.peft_config["default"]
    return int(config.r), float(config.lora_alpha), sorted(config.target_modules)


def _metadata(rank: int | None, alpha: float, target_modules: list[str] | None = None) -> dict[str, str]:
    """safetensors metadata: ``lcm_kit.rank`` / ``lcm_kit.alpha``, and diffusers' ``lora_adapter_metadata`` (the
    LoraConfig kwargs ``load_lora_weights`` uses instead of guessing, so an alpha != rank survives)."""
    meta = {"format": "pt", "lcm_kit.alpha": repr(float(alpha))}
    if rank is not None:
        meta["lcm_kit.rank"] = str(rank)
    if target_modules is not None:
        adapter = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": target_modules}
        meta[_DIFFUSERS_METADATA_KEY] = json.dumps(adapter, sort_keys=True)
    return meta


def save_lora(
    unet: torch.nn.Module,
    output_dir: str | os.PathLike,
    *,
    kohya: bool = False,
    weight_name: str = LORA_WEIGHT_NAME,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    adapter_name: str = "default",
) -> list[Path]:
    """Saves the adapter as safetensors that ``pipe.load_lora_weights(output_dir)`` of stock diffusers loads.

    Args:
        unet: The UNet with the LCM-LoRA adapter.
        output_dir: Folder to write to (created).
        kohya: Also write ``pytorch_lora_weights_kohya.safetensors`` (see :func:`to_kohya`).
        weight_name: File name of the diffusers-format file.
        dtype: Cast the tensors to this dtype (e.g. ``torch.float16``); default: keep (fp32).
        metadata: Extra safetensors metadata for both files (e.g. the sampling contract, :mod:`lcm_kit.contract`).
        adapter_name: The adapter to save (default: the trained one; the distiller's EMA copy is ``"ema"``).

    Returns:
        The paths written, the diffusers-format file first.
    """
    rank, alpha, targets = _rank_alpha_targets(unet)
    state = lora_state_dict(unet, adapter_name)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    out = Path(output_dir)
    extra = metadata or {}
    paths = [save_safetensors(state, out / weight_name, {**_metadata(rank, alpha, targets), **extra})]
    if kohya:
        kohya_state = to_kohya(state, alpha)
        paths.append(save_safetensors(kohya_state, out / KOHYA_WEIGHT_NAME, {**_metadata(rank, alpha), **extra}))
    return paths


def to_kohya(state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Converts peft / diffusers-format LoRA keys to the kohya-ss format (A1111, ComfyUI, diffusers' kohya loader).

    ``[unet.]<a.b.c>.lora_A.weight`` -> ``lora_unet_<a_b_c>.lora_down.weight``, ``lora_B`` -> ``lora_up``, plus a
    0-d ``lora_unet_<a_b_c>.alpha`` per module. Kohya applies ``(alpha / rank) up @ down``, the same scale as peft,
    so the conversion is exact.

    Raises:
        ValueError: On a key that is not a ``lora_A`` / ``lora_B`` weight.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        module, sep, kind = _strip_prefix(key).rpartition(".lora_")
        if not sep or kind not in ("A.weight", "B.weight"):
            raise ValueError(f"not a peft LoRA key (…lora_A.weight / …lora_B.weight): {key!r}")
        if module.startswith(("text_encoder", "lora_unet_", "lora_te")):
            raise ValueError(f"only UNet LoRA keys in peft format can be converted, got {key!r}")
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{'lora_down' if kind == 'A.weight' else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=value.dtype)
    return out


def _read_alpha(metadata: dict[str, str] | None) -> float | None:
    metadata = metadata or {}
    if "lcm_kit.alpha" in metadata:
        return float(metadata["lcm_kit.alpha"])
    adapter = json.loads(metadata.get(_DIFFUSERS_METADATA_KEY, "{}"))
    alpha = adapter.get("unet.lora_alpha", adapter.get("lora_alpha"))
    return None if alpha is None else float(alpha)


def _convert_file(src: Path, dst: Path, alpha: float | None) -> float:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        stored = _read_alpha(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    if stored is not None and alpha is not None and stored != alpha:
        raise ValueError(f"--alpha {alpha} differs from the alpha {stored} stored in {src}")
    alpha = stored if stored is not None else alpha
    if alpha is None:
        raise ValueError(f"{src} stores no LoRA alpha in its metadata; pass --alpha")
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
    rank = ranks.pop() if len(ranks) == 1 else None
    save_safetensors(to_kohya(state, alpha), dst, _metadata(rank, alpha))
    return alpha


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m lcm_kit.lora to-kohya IN.safetensors OUT.safetensors [--alpha A]``."""
    parser = argparse.ArgumentParser(prog="python -m lcm_kit.lora", description="LCM-LoRA file tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("to-kohya", help="convert a diffusers/peft-format LoRA file to kohya-ss keys")
    conv.add_argument("src", type=Path, help="input .safetensors (peft keys, optional unet. prefix)")
    conv.add_argument("dst", type=Path, help="output .safetensors (lora_unet_* keys)")
    conv.add_argument("--alpha", type=float, default=None, help="LoRA alpha, if the input's metadata has none")
    args = parser.parse_args(argv)
    if not args.src.is_file():
        parser.error(f"no such file: {args.src}")
    try:
        alpha = _convert_file(args.src, args.dst, args.alpha)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {args.dst} (alpha {alpha:g})")
    return 0


