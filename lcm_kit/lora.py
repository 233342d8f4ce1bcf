"""PEFT glue for LCM-LoRA (Luo et al. 2023, arXiv:2311.05556): targets, config, teacher mode, save, kohya export.

The student is the teacher UNet plus a LoRA adapter; :func:`teacher_mode` switches the adapter off, so a single UNet
serves as teacher and student. Files are safetensors in the format stock diffusers' ``load_lora_weights`` reads:
the plain ``get_peft_model_state_dict`` keys with a ``unet.`` prefix (``convert_state_dict_to_diffusers`` would mix
``.lora.down`` attention keys with ``lora_A`` conv keys, which diffusers then silently drops in part). Rank and alpha
go into the file's metadata, both in diffusers' ``lora_adapter_metadata`` and as ``lcm_kit.rank`` / ``lcm_kit.alpha``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from .atomic import save_safetensors

__all__ = [
    "LCM_LORA_TARGET_MODULES",
    "add_lcm_lora",
    "lora_state_dict",
    "main",
    "make_lora_config",
    "save_lora",
    "teacher_mode",
    "to_kohya",
]

# diffusers' LCM-LoRA scripts (train_lcm_distill_lora_sd*.py), all linear and conv layers of the SD UNet.
LCM_LORA_TARGET_MODULES: tuple[str, ...] = (
    *("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),  # transformer blocks
    *("conv1", "conv2", "conv_shortcut", "time_emb_proj"),  # resnets
    *("downsamplers.0.conv", "upsamplers.0.conv"),
)
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
_DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_PEFT_PREFIXES = ("unet.", "base_model.model.")


def make_lora_config(
    rank: int = 64,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] = LCM_LORA_TARGET_MODULES,
):
    """A ``peft.LoraConfig`` for LCM-LoRA: ``W x + (alpha / rank) B A x`` on each target (LoRA, Hu et al. Eq. 3).

    Args:
        rank: LoRA rank ``r`` (> 0). LCM-LoRA SD1.5 uses 64 (67.5 M parameters).
        alpha: Scale numerator; defaults to ``rank`` (scale 1), as diffusers' LCM-LoRA scripts (64 / 64).
        dropout: Dropout before the LoRA branch, in ``[0, 1)``.
        target_modules: Module-name suffixes to adapt.

    Raises:
        ValueError: On a non-positive rank or alpha, a dropout outside ``[0, 1)`` or no target modules.
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    alpha = rank if alpha is None else alpha
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"target_modules must be a non-empty sequence of names, got {target_modules!r}")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))


def _lora_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


def add_lcm_lora(
    unet: torch.nn.Module,
    rank: int = 64,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] = LCM_LORA_TARGET_MODULES,
) -> int:
    """Freezes ``unet``, adds the LCM-LoRA adapter (``"default"``), makes its parameters fp32 and trainable.

    The base weights keep their dtype (fp16 / bf16 for mixed precision); peft casts the LoRA branch's input to the
    LoRA dtype and its output back, so fp32 LoRA weights work with a half-precision UNet.

    Args:
        unet: A diffusers ``UNet2DConditionModel`` (anything with diffusers' ``PeftAdapterMixin.add_adapter``).
        rank, alpha, dropout, target_modules: See :func:`make_lora_config`.

    Returns:
        The number of trainable parameters.
    """
    config = make_lora_config(rank, alpha, dropout, target_modules)
    unet.requires_grad_(False)
    unet.add_adapter(config)
    params = _lora_parameters(unet)
    if not params:
        raise ValueError(f"no module of the UNet matches target_modules {list(target_modules)}")
    for _, p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return sum(p.numel() for _, p in params)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / accelerate (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while isinstance(getattr(model, "module", None), torch.nn.Module) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model._orig_mod
    return model


def _tuner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def teacher_mode(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Runs ``unet`` without its LoRA adapters inside the block: the frozen teacher (LCM-LoRA, one UNet in memory).

    Adapters are re-enabled on exit, also when the block raises, and the LoRA parameters' ``requires_grad`` flags are
    restored (peft sets them when toggling adapters). Works for a diffusers model with ``add_adapter``, a
    ``peft.PeftModel``, and either inside DDP / accelerate or ``torch.compile`` wrappers.

    Raises:
        ValueError: If the model has no adapter.
    """
    model = _unwrap(unet)
    layers = _tuner_layers(model)
    if not layers:
        raise ValueError("teacher_mode() needs a model with LoRA adapters; call add_lcm_lora() first")
    flags = [(p, p.requires_grad) for _, p in _lora_parameters(model)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield unet
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def _strip_prefix(key: str) -> str:
    for prefix in _PEFT_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under diffusers-loadable keys ``unet.<module path>.lora_{A,B}.weight``.

    These are the plain ``get_peft_model_state_dict(unet)`` keys with a ``unet.`` prefix (``base_model.model.`` of a
    ``PeftModel`` removed), what ``StableDiffusionPipeline.save_lora_weights`` writes. Tensors are detached.
    """
    from peft import get_peft_model_state_dict

    model = _unwrap(unet)
    return {f"unet.{_strip_prefix(k)}": v.detach() for k, v in get_peft_model_state_dict(model).items()}


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
) -> list[Path]:
    """Saves the adapter as safetensors that ``pipe.load_lora_weights(output_dir)`` of stock diffusers loads.

    Args:
        unet: The UNet with the LCM-LoRA adapter.
        output_dir: Folder to write to (created).
        kohya: Also write ``pytorch_lora_weights_kohya.safetensors`` (see :func:`to_kohya`).
        weight_name: File name of the diffusers-format file.
        dtype: Cast the tensors to this dtype (e.g. ``torch.float16``); default: keep (fp32).
        metadata: Extra safetensors metadata for both files (e.g. the sampling contract, :mod:`lcm_kit.contract`).

    Returns:
        The paths written, the diffusers-format file first.
    """
    rank, alpha, targets = _rank_alpha_targets(unet)
    state = lora_state_dict(unet)
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


if __name__ == "__main__":
    raise SystemExit(main())
