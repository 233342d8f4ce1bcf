"""PEFT glue for LCM-LoRA (Luo et al. 2023, arXiv:2311.05556): the adapter config, adding it to a UNet, running the
UNet as the teacher (:func:`teacher_mode`, adapter off) or with its EMA copy (:func:`adapter_mode`), state dicts.

The student is the teacher UNet plus a LoRA adapter; :func:`teacher_mode` switches the adapter off, so a single UNet
serves as teacher and student; :func:`add_ema_adapter` adds a second, frozen adapter that the distiller keeps as an
EMA of the first (the target network), still one UNet in memory.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

# diffusers' LCM-LoRA scripts (train_lcm_distill_lora_sd*.py), all linear and conv layers of the SD UNet.
LCM_LORA_TARGET_MODULES: tuple[str, ...] = (
    *("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),  # transformer blocks
    *("conv1", "conv2", "conv_shortcut", "time_emb_proj"),  # resnets
    *("downsamplers.0.conv", "upsamplers.0.conv"),
)
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
    if not _tuner_layers(_unwrap(unet)):
        raise ValueError("teacher_mode() needs a model with LoRA adapters; call add_lcm_lora() first")
    with _switched(unet, lambda layer: layer.enable_adapters(False), lambda layer: layer.enable_adapters(True)):
        yield unet


@contextmanager
def _switched(unet: torch.nn.Module, enter: Callable, leave: Callable) -> Iterator[None]:
    """Calls ``enter(layer)`` on every LoRA layer, then ``leave(layer)`` on exit (also when the block raises), and
    restores every LoRA parameter's ``requires_grad`` flag (peft sets them when adapters are toggled)."""
    model = _unwrap(unet)
    layers = _tuner_layers(model)
    flags = [(p, p.requires_grad) for _, p in _lora_parameters(model)]
    for layer in layers:
        enter(layer)
    try:
        yield
    finally:
        for layer in layers:
            leave(layer)
        for p, flag in flags:
            p.requires_grad_(flag)


EMA_ADAPTER = "ema"


def add_ema_adapter(unet: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """Adds a frozen second adapter :data:`EMA_ADAPTER`, a copy of the trained ``"default"`` one (same rank, alpha and
    targets), to serve as the EMA target network of LoRA distillation on the same UNet (only LoRA-sized memory).

    ``"default"`` stays the active, trainable adapter; :func:`adapter_mode` runs the UNet with the EMA one.

    Returns:
        ``(ema, online)`` parameter pairs, in a fixed order, for the EMA update.
    """
    model = _unwrap(unet)
    with warnings.catch_warnings():  # "multiple adapters in the model": intended here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        model.add_adapter(copy.deepcopy(model.peft_config["default"]), adapter_name=EMA_ADAPTER)
    for layer in _tuner_layers(model):
        layer.set_adapter("default")
    named = dict(model.named_parameters())
    pairs = []
    for name, param in named.items():
        if ".lora_" in name and f".{EMA_ADAPTER}." in name:
            online = named[name.replace(f".{EMA_ADAPTER}.", ".default.")]
            param.data = online.data.detach().float().clone()
            pairs.append((param, online))
    for ema, online in pairs:
        ema.requires_grad_(False)
        online.requires_grad_(True)
    return pairs


@contextmanager
def adapter_mode(unet: torch.nn.Module, adapter_name: str) -> Iterator[torch.nn.Module]:
    """Runs ``unet`` with adapter ``adapter_name`` active instead of ``"default"`` inside the block; restores
    ``"default"`` and every LoRA parameter's ``requires_grad`` flag on exit, also when the block raises."""
    with _switched(unet, lambda layer: layer.set_adapter(adapter_name), lambda layer: layer.set_adapter("default")):
        yield unet


def adapter_state_dict(unet: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors under peft's adapter-free keys (``<module path>.lora_{A,B}.weight``), detached."""
    from peft import get_peft_model_state_dict

    model = _unwrap(unet)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {_strip_prefix(k): v.detach() for k, v in state.items()}


def _strip_prefix(key: str) -> str:
    for prefix in _PEFT_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def lora_state_dict(unet: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under diffusers-loadable keys ``unet.<module path>.lora_{A,B}.weight``.

    These are the plain ``get_peft_model_state_dict(unet)`` keys with a ``unet.`` prefix (``base_model.model.`` of a
    ``PeftModel`` removed), what ``StableDiffusionPipeline.save_lora_weights`` writes. Tensors are detached.
    ``adapter_name`` picks another adapter of the UNet (e.g. :data:`EMA_ADAPTER`) under the same keys.
    """
    return {f"unet.{k}": v for k, v in adapter_state_dict(unet, adapter_name).items()}


