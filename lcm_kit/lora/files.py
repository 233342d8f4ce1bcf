"""LCM-LoRA files: the default file in the kohya-ss layout, which every SD tool loads, and the PEFT layout.

``pytorch_lora_weights.safetensors`` (:data:`LORA_WEIGHT_NAME`) holds, per module,
``lora_unet_<module path, . -> _>.lora_down.weight`` / ``.lora_up.weight`` and a 0-d ``.alpha``: ComfyUI, A1111 / Forge
and kohya sd-scripts load it from their LoRA folders, and stock diffusers' ``load_lora_weights`` converts it to the
same PEFT adapter (alpha from the tensors).
``pytorch_lora_weights_peft.safetensors`` (:data:`PEFT_WEIGHT_NAME`, optional) holds the same tensors under the plain
``get_peft_model_state_dict`` keys with a ``unet.`` prefix (what ``StableDiffusionPipeline.save_lora_weights``
writes; ``convert_state_dict_to_diffusers`` would mix ``.lora.down`` attention keys with ``lora_A`` conv keys, which
diffusers then silently drops in part), for diffusers / peft code that reads those keys directly; ComfyUI drops its
attention keys. Rank and alpha go into both files' metadata as ``lcm_kit.rank`` / ``lcm_kit.alpha`` (and diffusers'
``lora_adapter_metadata`` in the PEFT file only: diffusers refuses it next to alpha tensors); the distiller adds the
sampling contract (:mod:`lcm_kit.contract`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import save_safetensors
from .adapters import _strip_prefix, _unwrap, lora_state_dict
from .sgm import is_sdxl_unet, sgm_module

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHT_NAME = "pytorch_lora_weights_peft.safetensors"
_DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_KOHYA_PREFIX = "lora_unet_"
_KOHYA_KIND = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}


def _rank_alpha_targets(unet: torch.nn.Module) -> tuple[int, float, list[str]]:
    model = _unwrap(unet)
    config = model.peft_config["default"]
    return int(config.r), float(config.lora_alpha), sorted(config.target_modules)


def _metadata(rank: int | None, alpha: float, target_modules: list[str] | None = None) -> dict[str, str]:
    """safetensors metadata: ``lcm_kit.rank`` / ``lcm_kit.alpha``, and with ``target_modules`` diffusers'
    ``lora_adapter_metadata`` (the LoraConfig kwargs ``load_lora_weights`` uses for a PEFT-layout file instead of
    guessing, so an alpha != rank survives)."""
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
    peft_layout: bool = False,
    weight_name: str = LORA_WEIGHT_NAME,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    adapter_name: str = "default",
) -> list[Path]:
    """Saves the adapter in the kohya-ss layout (:func:`to_kohya`), which ComfyUI, A1111 and kohya sd-scripts load
    from their LoRA folders and stock diffusers' ``pipe.load_lora_weights(output_dir)`` loads completely.

    Args:
        unet: The UNet with the LCM-LoRA adapter.
        output_dir: Folder to write to (created).
        peft_layout: Also write :data:`PEFT_WEIGHT_NAME`, the same tensors under diffusers' PEFT keys.
        weight_name: File name of the kohya-layout file.
        dtype: Cast the LoRA tensors to this dtype (e.g. ``torch.float16``); default: keep (fp32).
        metadata: Extra safetensors metadata for both files (e.g. the sampling contract, :mod:`lcm_kit.contract`).
        adapter_name: The adapter to save (default: the trained one; the distiller's EMA copy is ``"ema"``).

    Returns:
        The paths written, the kohya-layout file first.
    """
    rank, alpha, targets = _rank_alpha_targets(unet)
    state = lora_state_dict(unet, adapter_name)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    out, extra = Path(output_dir), metadata or {}
    kohya = to_kohya(state, alpha, _unwrap(unet).config)
    paths = [save_safetensors(kohya, out / weight_name, {**_metadata(rank, alpha), **extra})]
    if peft_layout:
        paths.append(save_safetensors(state, out / PEFT_WEIGHT_NAME, {**_metadata(rank, alpha, targets), **extra}))
    return paths


def kohya_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of the default file :func:`save_lora` writes for ``unet`` (kohya-ss layout, fp32), detached."""
    return to_kohya(lora_state_dict(unet), _rank_alpha_targets(unet)[1], _unwrap(unet).config)


def _kohya_key(peft_key: str, unet_config: Mapping[str, Any] | None = None) -> str:
    """``[unet.]<a.b.c>.lora_A.weight`` -> ``lora_unet_<a_b_c>.lora_down.weight`` (``lora_B`` -> ``lora_up``); for an
    SDXL ``unet_config`` the module path is its SGM path (:mod:`lcm_kit.lora.sgm`)."""
    if peft_key.startswith(_KOHYA_PREFIX):
        raise ValueError(f"{peft_key!r} is already in the kohya layout")
    module, sep, kind = _strip_prefix(peft_key).rpartition(".lora_")
    if not sep or kind not in _KOHYA_KIND:
        raise ValueError(f"not a peft LoRA key (…lora_A.weight / …lora_B.weight): {peft_key!r}")
    if module.startswith(("text_encoder", "lora_te")):
        raise ValueError(f"only UNet LoRA keys in peft format can be converted, got {peft_key!r}")
    if unet_config is not None and is_sdxl_unet(unet_config):
        module = sgm_module(module, unet_config)
    return f"{_KOHYA_PREFIX}{module.replace('.', '_')}.{_KOHYA_KIND[kind]}"


def to_kohya(state_dict: dict[str, torch.Tensor], alpha: float,
             unet_config: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Converts peft / diffusers-layout LoRA keys to the kohya-ss layout (ComfyUI, A1111, sd-scripts, diffusers).

    ``[unet.]<a.b.c>.lora_A.weight`` -> ``lora_unet_<a_b_c>.lora_down.weight``, ``lora_B`` -> ``lora_up``, plus a
    0-d fp32 ``lora_unet_<a_b_c>.alpha`` per module. Kohya applies ``(alpha / rank) up @ down``, the same scale as
    peft, so the conversion is exact: the tensors are the same objects under new names. With the config of an SDXL
    UNet, ``a.b.c`` is the module's SGM path (``input_blocks_4_1_...``, :mod:`lcm_kit.lora.sgm`), as kohya names SDXL.

    Raises:
        ValueError: On a key that is not a UNet ``lora_A`` / ``lora_B`` weight (or is already in the kohya layout).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = _kohya_key(key, unet_config)
        out[name] = value
        out[f"{name.partition('.')[0]}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def to_peft(state_dict: dict[str, torch.Tensor], peft_keys: Iterable[str],
            unet_config: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """A LoRA file's tensors under the model's peft keys (``<a.b.c>.lora_{A,B}.weight``, no prefix): the inverse of
    :func:`to_kohya` (``unet_config``: the model's, for SDXL's SGM names). Kohya names lose which ``_`` was a ``.``,
    so the model's own keys (those of :func:`~lcm_kit.lora.adapters.adapter_state_dict`) say what each name stands
    for; the ``.alpha`` entries are dropped (the model's config holds alpha). A file in the PEFT layout (``unet.``
    keys, older files) is read too.

    Raises:
        ValueError: On a file key that names no key of ``peft_keys``, or a key of ``peft_keys`` the file lacks.
    """
    kohya = any(k.startswith(_KOHYA_PREFIX) for k in state_dict)
    names = {(_kohya_key(k, unet_config) if kohya else f"unet.{k}"): k for k in peft_keys}
    unknown = [k for k in state_dict if k not in names and not (kohya and k.endswith(".alpha"))]
    if unknown:
        raise ValueError(f"LoRA keys that name no LoRA module of the model: {unknown[:5]}")
    missing = [k for name, k in names.items() if name not in state_dict]
    if missing:
        raise ValueError(f"LoRA tensors missing from the file: {missing[:5]}")
    return {key: state_dict[name] for name, key in names.items()}


def _read_alpha(metadata: dict[str, str] | None) -> float | None:
    metadata = metadata or {}
    if "lcm_kit.alpha" in metadata:
        return float(metadata["lcm_kit.alpha"])
    adapter = json.loads(metadata.get(_DIFFUSERS_METADATA_KEY, "{}"))
    alpha = adapter.get("unet.lora_alpha", adapter.get("lora_alpha"))
    return None if alpha is None else float(alpha)


def _convert_file(src: Path, dst: Path, alpha: float | None) -> float:
    """Converts a PEFT-layout file to the kohya layout; its metadata (the sampling contract, ...) is kept, except
    diffusers' ``lora_adapter_metadata``, which diffusers refuses next to alpha tensors."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    stored = _read_alpha(metadata)
    if stored is not None and alpha is not None and stored != alpha:
        raise ValueError(f"--alpha {alpha} differs from the alpha {stored} stored in {src}")
    alpha = stored if stored is not None else alpha
    if alpha is None:
        raise ValueError(f"{src} stores no LoRA alpha in its metadata; pass --alpha")
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
    rank = ranks.pop() if len(ranks) == 1 else None
    kept = {k: v for k, v in metadata.items() if k != _DIFFUSERS_METADATA_KEY}
    save_safetensors(to_kohya(state, alpha), dst, {**kept, **_metadata(rank, alpha)})
    return alpha


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m lcm_kit.lora to-kohya IN.safetensors OUT.safetensors [--alpha A]``."""
    parser = argparse.ArgumentParser(prog="python -m lcm_kit.lora", description="LCM-LoRA file tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("to-kohya", help="convert a PEFT-layout LoRA file (older lcm_kit, diffusers) to the "
                          "kohya-ss layout that every SD tool loads (metadata kept)")
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


