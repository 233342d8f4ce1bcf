"""Load-time checks of an SD folder, shared by :class:`lcm_kit.LCMPipeline` and the distiller's teacher.

* :func:`check_supported` reads the folder's JSON configs before any weights: an SDXL (or other non-SD1.x/2.x)
  folder is refused at once, instead of loading and failing later with a ``TypeError`` inside the UNet.
* :func:`load_checked` loads one component with the library's own loading report (``output_loading_info=True``
  in diffusers and transformers) and raises on missing, unexpected or mismatched weights. Both libraries otherwise
  leave unmatched weights at random init with only a log line: a text encoder saved by transformers >= 5.6 (names
  without the ``text_model.`` prefix) loads 0 of its tensors under transformers < 5.6.
* :func:`checked_pipeline_kwargs` loads the UNet, VAE and text encoder that way for ``from_pretrained``.
"""

from __future__ import annotations

import os
from typing import Any

from .pipeline_utils import HUB_KWARGS

SUPPORTED = (
    "LCMPipeline takes SD 1.x/2.x-style folders with one CLIP text encoder (model_index.json with vae, text_encoder, "
    "tokenizer, unet, scheduler), LCMXLPipeline SDXL folders; the distiller takes either"
)
# model_index.json components an SD 1.x/2.x folder (or one LCMPipeline saved) may list.
SD_COMPONENTS = frozenset(
    {"vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor", "image_encoder"}
)
# from_pretrained keyword arguments forwarded to each checked component (torch_dtype separately).
COMPONENT_KWARGS: tuple[str, ...] = HUB_KWARGS + ("variant", "use_safetensors", "low_cpu_mem_usage")
# With these, placement / quantisation is diffusers' pipeline-level business: it loads the components itself.
PIPELINE_ONLY_KWARGS: tuple[str, ...] = ("device_map", "quantization_config", "dduf_file")
SHOWN = 4  # keys shown per kind in an error message
MIN_TRANSFORMERS = "5.6"  # pyproject's floor: the first transformers that reads both CLIP text-encoder layouts


def _read_config(cls, path: str | os.PathLike, subfolder: str | None, hub_kwargs: dict) -> dict:
    """``cls.load_config`` of ``path`` (a folder or hub id), or ``{}`` when that file does not exist."""
    try:
        return dict(cls.load_config(path, subfolder=subfolder, **hub_kwargs))
    except OSError:
        return {}


def unsupported_reasons(index: dict, unet_config: dict) -> list[str]:
    """Why a folder with this ``model_index.json`` and ``unet/config.json`` is not an SD 1.x/2.x folder (none: [])."""
    reasons = []
    class_name = index.get("_class_name") or ""
    if "XL" in class_name:
        reasons.append(f"model_index.json names {class_name}")
    listed = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list | tuple) and any(v)}
    if extra := sorted(listed - SD_COMPONENTS):
        reasons.append(f"model_index.json lists components an SD 1.x/2.x pipeline does not have: {', '.join(extra)}")
    if index and "unet" not in listed:
        reasons.append("model_index.json lists no unet")
    if (embed := unet_config.get("addition_embed_type")) is not None:
        reasons.append(f"the UNet has addition_embed_type={embed!r} (SDXL's is 'text_time')")
    return reasons


def check_supported(path: str | os.PathLike, role: str = "model folder", hub_kwargs: dict | None = None) -> dict:
    """Raises ``ValueError`` if ``path`` is not an SD 1.x/2.x-style folder; reads only JSON files.

    Args:
        path: A diffusers folder or hub id.
        role: How the error names ``path`` (e.g. ``"--pretrained_teacher_model"``).
        hub_kwargs: ``revision``, ``cache_dir`` ... of ``from_pretrained``.

    Returns:
        The folder's ``model_index.json`` (``{}`` if it has none).
    """
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    hub_kwargs = hub_kwargs or {}
    index = _read_config(DiffusionPipeline, path, None, hub_kwargs)
    unet_config = _read_config(UNet2DConditionModel, path, "unet", hub_kwargs)
    if reasons := unsupported_reasons(index, unet_config):
        raise ValueError(f"{role} {str(path)!r} is not supported: {'; '.join(reasons)}. {SUPPORTED}.")
    return index


def _library(cls) -> tuple[str, str, str, str]:
    """``(library, installed version, config key of the version that wrote a folder, how to fix)`` of a class."""
    fix = "Re-save the component with save_pretrained from a model that loads completely"
    if cls.__module__.startswith("transformers"):
        import transformers
        from packaging.version import Version

        if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
            fix = (
                f"lcm_kit needs transformers>={MIN_TRANSFORMERS}, which reads both CLIP text-encoder layouts (the "
                "older `text_model.`-prefixed one and the one it writes)"
            )
        return "transformers", transformers.__version__, "transformers_version", fix
    import diffusers

    return "diffusers", diffusers.__version__, "_diffusers_version", fix


def _keys_hint(missing: list[str], unexpected: list[str]) -> str:
    """A sentence for the common case of one layout change: the same names with or without a prefix."""
    hows = ((missing, unexpected, "lack the '{}.' prefix that this model class expects"),
            (unexpected, missing, "carry an extra '{}.' prefix that this model class does not use"))  # fmt: skip
    for longer, shorter, how in hows:
        prefixes = {k.split(".", 1)[0] for k in longer}
        stripped = {k.split(".", 1)[-1] for k in longer}
        if len(prefixes) == 1 and len(longer) == len(shorter) and stripped == set(shorter):
            return f" The file's weight names {how.format(prefixes.pop())}."
    return ""


def loading_error(folder: str, cls, info: dict, written_by: str | None) -> str | None:
    """The message of an incomplete load from ``info`` (``output_loading_info``), or ``None`` if it is complete."""
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    mismatched = [str(m[0] if isinstance(m, tuple | list) else m) for m in info.get("mismatched_keys") or ()]
    if not (missing or unexpected or mismatched):
        return None
    lib, version, _, fix = _library(cls)
    kinds = (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched))
    parts = [f"{len(v)} {kind} ({', '.join(v[:SHOWN])}{', ...' if len(v) > SHOWN else ''})" for kind, v in kinds if v]
    written = f"; the folder was written by {lib} {written_by}" if written_by else ""
    return (
        f"{folder}: the weights do not match {cls.__name__}: {'; '.join(parts)} weight names. Loading it would leave "
        f"those weights at random init.{_keys_hint(missing, unexpected)} Installed: {lib} {version}{written}. {fix}."
    )


def load_checked(cls, path: str | os.PathLike, subfolder: str, **kwargs: Any):
    """``cls.from_pretrained(path, subfolder=subfolder, **kwargs)``; raises if any weight did not load.

    Raises:
        ValueError: naming the component folder and a few missing / unexpected / mismatched weight names.
    """
    model, info = cls.from_pretrained(path, subfolder=subfolder, output_loading_info=True, **kwargs)
    written_by = getattr(model.config, _library(cls)[2], None)
    if (message := loading_error(os.path.join(str(path), subfolder), cls, info, written_by)) is not None:
        raise ValueError(message)
    return model


def check_sdxl(path: str | os.PathLike, hub_kwargs: dict[str, Any]) -> dict:
    """Raises ``ValueError`` if the UNet config of ``path`` has no SDXL ``text_time`` embedding (an SD 1.x/2.x
    folder: use ``LCMPipeline``); reads only JSON files. Returns the folder's ``model_index.json`` (``{}`` if none).
    A folder without ``unet/config.json`` is left to diffusers' own error."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    config = _read_config(UNet2DConditionModel, path, "unet", hub_kwargs)
    if config and (embed := config.get("addition_embed_type")) != "text_time":
        raise ValueError(
            f"{str(path)!r} is not an SDXL folder: its UNet has addition_embed_type={embed!r} (SDXL's is "
            "'text_time'). Load SD 1.x/2.x folders with lcm_kit.LCMPipeline"
        )
    return _read_config(DiffusionPipeline, path, None, hub_kwargs)


def is_sdxl_folder(path: str | os.PathLike, hub_kwargs: dict[str, Any] | None = None) -> bool:
    """Whether the UNet config of ``path`` has SDXL's ``addition_embed_type="text_time"``; reads only JSON (an
    unreadable config: ``False``, left to the loading's own error)."""
    from diffusers import UNet2DConditionModel

    config = _read_config(UNet2DConditionModel, path, "unet", hub_kwargs or {})
    return config.get("addition_embed_type") == "text_time"


def checked_components(path: str | os.PathLike, kwargs: dict[str, Any], sdxl: bool = False) -> dict[str, Any]:
    """``kwargs`` of ``DiffusionPipeline.from_pretrained(path, **kwargs)`` with the folder checked
    (:func:`check_supported`, or :func:`check_sdxl` when ``sdxl``) and its UNet, VAE and CLIP text encoder(s) loaded
    by :func:`load_checked` (those the caller did not pass). Any pipeline class can take them; the folder's own
    scheduler is left as it is.

    A component whose ``model_index.json`` class differs (e.g. an ``AutoencoderTiny``), and every component when
    ``device_map`` / ``quantization_config`` / ``dduf_file`` is given, is left to diffusers' own loading.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    index = check_sdxl(path, hub_kwargs) if sdxl else check_supported(path, hub_kwargs=hub_kwargs)
    out = dict(kwargs)
    if any(k in kwargs for k in PIPELINE_ONLY_KWARGS):
        return out
    common = {k: kwargs[k] for k in COMPONENT_KWARGS if k in kwargs}
    components = [("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)]
    if sdxl:
        components.append(("text_encoder_2", CLIPTextModelWithProjection))
    for name, cls in components:
        if name in kwargs or list(index.get(name) or ())[-1:] != [cls.__name__]:
            continue
        dtype = _component_dtype(kwargs.get("torch_dtype"), name)
        dtype_kwarg = {} if dtype is None else {"dtype" if name.startswith("text_") else "torch_dtype": dtype}
        out[name] = load_checked(cls, path, name, **common, **dtype_kwarg)
    return out


def checked_pipeline_kwargs(path: str | os.PathLike, kwargs: dict[str, Any], sdxl: bool = False) -> dict[str, Any]:
    """:func:`checked_components` for ``LCMPipeline`` / ``LCMXLPipeline``, plus, unless ``scheduler=`` is passed, an
    :class:`~lcm_kit.scheduler.LCMKitScheduler` built with ``from_config`` from the folder's scheduler config (DDPM,
    PNDM, DDIM, Euler, LCM ...: betas, ``prediction_type`` and ``set_alpha_to_one`` carry over, and so do
    ``sigma_data`` / ``gamma`` of a folder lcm_kit saved)."""
    from .scheduler import LCMKitScheduler

    out = checked_components(path, kwargs, sdxl)
    if out.get("scheduler") is None:
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        config = LCMKitScheduler.load_config(path, subfolder="scheduler", **hub_kwargs)
        out["scheduler"] = LCMKitScheduler.from_config(config)
    return out


def _component_dtype(torch_dtype, name: str):
    """The dtype of one component from ``from_pretrained``'s ``torch_dtype`` (a dtype, or diffusers' per-component
    dict with an optional ``"default"``)."""
    if isinstance(torch_dtype, dict):
        return torch_dtype.get(name, torch_dtype.get("default"))
    return torch_dtype


__all__ = [
    "check_sdxl", "check_supported", "checked_components", "checked_pipeline_kwargs", "is_sdxl_folder", "load_checked",
    "loading_error", "native_resolution", "unsupported_reasons",
]


def native_resolution(path: str | os.PathLike) -> int:
    """The image size an SD folder was trained at: ``unet.sample_size * 2^(len(vae.block_out_channels) - 1)`` (the
    UNet's latent size times the VAE's downsampling factor); reads only the two JSON configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = _read_config(UNet2DConditionModel, path, "unet", {})
    vae = _read_config(AutoencoderKL, path, "vae", {})
    if not unet or not vae:
        raise ValueError(f"{path}: no unet/config.json or vae/config.json, so its resolution is unknown")
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
