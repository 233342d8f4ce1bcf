"""Checks and conversion of :class:`lcm_kit.LCMPipeline`'s call arguments, all done before any model runs.

:func:`check_call_args` fills the defaults and raises a ``ValueError`` that names the argument and its value for
every bad input. :func:`prepare_image` brings ``image`` to one of the forms diffusers' ``VaeImageProcessor`` takes,
so an RGB input gives exactly diffusers' numbers:

* PIL images (one or a list) go through :func:`lcm_kit.images.to_rgb`: 16-bit scaled to 8 bits, transparency
  flattened onto white, CMYK by Pillow. They are never taken as latents.
* numpy arrays ``(H, W, C)`` or ``(N, H, W, C)`` of floats in [0, 1], ``C`` = 3, 1 (grey, repeated) or 4 (RGBA:
  alpha flattened onto white, as for PIL). Integer arrays are refused (diffusers would read them as 0..255 floats).
* torch tensors ``(N, 3, H, W)`` (or ``(3, H, W)``) are pixels in [0, 1] (diffusers still takes [-1, 1], with a
  ``FutureWarning``); a tensor with the VAE's ``latent_channels`` (4) is taken as already-encoded latents, as
  diffusers' ``VaeImageProcessor`` and LCM img2img pipeline do. Only a tensor can be latents.

Sizes: ``height`` / ``width`` default to the (first) image's size rounded down to a multiple of ``vae_scale_factor``
(latents: their size times it), else to the UNet's ``sample_size`` times it; given ones must be positive multiples.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from .contract import call_schedule
from .guidance import Guidance
from .images import to_rgb

OUTPUT_TYPES: tuple[str, ...] = ("pil", "np", "pt", "latent")
DEFAULT_STRENGTH = 0.8  # diffusers' LCM img2img default
ImageBatch = list[PIL.Image.Image] | np.ndarray | torch.Tensor
IMAGE_FORMATS = (
    "a PIL image, a numpy array (H, W, 3) or (N, H, W, 3) of floats in [0, 1], a torch tensor (N, 3, H, W), "
    "latents as a torch tensor (N, {c}, h, w), or a list of images of one of these kinds"
)


class CallArgs(NamedTuple):
    """Arguments of ``LCMPipeline.__call__`` after checks and defaults."""

    batch_size: int
    height: int
    width: int
    strength: float | None
    callback_inputs: list[str]
    image: ImageBatch | None


def start_call(pipe: Any, guidance_scale: float | None, num_inference_steps: int | None,
               original_inference_steps: int | None, timesteps: list[int] | None,
               cross_attention_kwargs: dict[str, Any] | None,
               **checked: Any) -> tuple[Guidance, CallArgs]:  # fmt: skip
    """The opening of ``LCMPipeline.__call__`` (and of the pipelines built on it): the guidance decision, the
    sampling contract's steps (:func:`lcm_kit.contract.call_schedule`), :func:`check_call_args` on ``checked``, then
    the scheduler's timesteps. They are set before the text encoder runs, since ``set_timesteps`` checks the steps
    against the grid, so no model runs on a bad call. Returns the guidance and the checked arguments."""
    guidance = Guidance.decide(pipe.unet.config, guidance_scale)
    num_inference_steps, timesteps = call_schedule(pipe.scheduler, num_inference_steps, timesteps)
    args = check_call_args(pipe, num_inference_steps=num_inference_steps, timesteps=timesteps, **checked)
    pipe._cross_attention_kwargs = cross_attention_kwargs
    pipe.scheduler.set_timesteps(
        None if timesteps is not None else num_inference_steps, pipe._execution_device, original_inference_steps,
        timesteps, args.strength or 1.0,
    )  # fmt: skip
    return guidance, args


def check_call_args(pipe: Any, *, prompt: Any, negative_prompt: Any, prompt_embeds: torch.Tensor | None,
                    negative_prompt_embeds: torch.Tensor | None, image: Any, strength: float | None,
                    height: int | None, width: int | None, latents: torch.Tensor | None, callback: Any,
                    callback_inputs: Sequence[str] | None, **sampling: Any) -> CallArgs:  # fmt: skip
    """Fills the defaults of ``LCMPipeline.__call__`` and checks every argument (:func:`check_prompt_args`,
    :func:`prepare_image`, :func:`check_size`, :func:`check_sampling_args`, which also gets ``sampling``: steps,
    timesteps, images per prompt, generator, output type; :func:`check_latents`). Defaults: strength 0.8 with an
    ``image``; the size of the image (rounded down) or of the UNet sample; the callback's own ``tensor_inputs``,
    else ``["latents"]``. Returns the converted image with the rest."""
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        callback_inputs = callback.tensor_inputs
    callback_inputs = list(callback_inputs or ["latents"])
    check_prompt_args(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, pipe.unet.config)
    batch_size = batch_size_of(prompt, prompt_embeds)
    images = prepare_image(image, pipe.vae.config.latent_channels)
    strength = DEFAULT_STRENGTH if image is not None and strength is None else strength
    size = check_size(pipe, images, height, width)
    check_sampling_args(
        image=image, strength=strength, batch_size=batch_size, callback_inputs=callback_inputs,
        allowed_callback_inputs=pipe._callback_tensor_inputs, **sampling,
    )  # fmt: skip
    total = batch_size * sampling["num_images_per_prompt"]
    check_image_count(images, batch_size, total)
    if latents is not None:
        f = pipe.vae_scale_factor
        given = None if height is None and width is None else (size[0] // f, size[1] // f)
        check_latents(latents, total, pipe.unet.config.in_channels, given)
    return CallArgs(batch_size, *size, strength, callback_inputs, images)


def batch_size_of(prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None) -> int:
    """Number of prompts: 1 for a string, ``len`` of a list, else the first dim of ``prompt_embeds``."""
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    return prompt_embeds.shape[0]


def check_prompt_args(prompt: Any, negative_prompt: Any, prompt_embeds: torch.Tensor | None,
                      negative_prompt_embeds: torch.Tensor | None, unet_config: Any) -> None:  # fmt: skip
    """Raises ``ValueError`` unless exactly one of ``prompt`` / ``prompt_embeds`` is given, with matching negatives,
    and embeddings are ``(B, L, D)`` with ``D`` the UNet's ``cross_attention_dim`` (the text encoder's width)."""
    if (prompt is None) == (prompt_embeds is None):
        given = "both" if prompt is not None else "neither"
        raise ValueError(f"pass exactly one of prompt or prompt_embeds, got {given} (prompt={prompt!r})")
    if prompt is not None and not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt)):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError(f"pass at most one of negative_prompt or negative_prompt_embeds, got {negative_prompt!r} too")
    width = unet_config.cross_attention_dim  # an int for SD1.x/2.x UNets
    for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if embeds is None:
            continue
        is_3d = isinstance(embeds, torch.Tensor) and embeds.ndim == 3
        if not is_3d or (isinstance(width, int) and embeds.shape[-1] != width):
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(
                f"{name} must be a tensor (batch, tokens, {width}) for this model (the text encoder's width, the "
                f"UNet's cross_attention_dim), got {shape}"
            )
    if prompt_embeds is not None and negative_prompt_embeds is not None:
        if prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(
                f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
            )


def check_count(name: str, value: Any, minimum: int = 1) -> None:
    """Raises ``ValueError`` unless ``value`` is an integer >= ``minimum`` (numpy integers count; ``bool`` does
    not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def check_size(pipe: Any, images: ImageBatch | None, height: Any, width: Any) -> tuple[int, int]:
    """``(height, width)`` in pixels: the arguments, else the image's size rounded down to a multiple of
    ``vae_scale_factor`` (latents: their size times it), else the UNet's ``sample_size`` times it."""
    f = pipe.vae_scale_factor
    if images is None:
        default = (pipe.unet.config.sample_size * f,) * 2
    elif is_latents(images, pipe.vae.config.latent_channels):
        default = (images.shape[2] * f, images.shape[3] * f)
    else:
        default = pipe.image_processor.get_default_height_width(images[0] if isinstance(images, list) else images)
    for name, value, fallback in (("height", height, default[0]), ("width", width, default[1])):
        check_count(name if value is not None else f"{name} (of the image, rounded down to a multiple of {f})",
                    fallback if value is None else value)  # fmt: skip
    height, width = (default[0] if height is None else height), (default[1] if width is None else width)
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f}, got {height} x {width}")
    return int(height), int(width)


def check_sampling_args(
    *,
    num_inference_steps: int,
    timesteps: Sequence[int] | None,
    image: Any,
    strength: float | None,
    num_images_per_prompt: int,
    generator: torch.Generator | list[torch.Generator] | None,
    batch_size: int,
    output_type: str,
    callback_inputs: Sequence[str],
    allowed_callback_inputs: Sequence[str],
) -> None:
    """Raises ``ValueError`` naming the offending value for every bad sampling argument of ``LCMPipeline``."""
    if timesteps is None:
        check_count("num_inference_steps", num_inference_steps)
    if strength is not None and (not isinstance(strength, numbers.Real) or not 0.0 < strength <= 1.0):
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if strength is not None and image is None:
        raise ValueError(f"strength={strength} needs an image (image-to-image); got image=None")
    check_count("num_images_per_prompt", num_images_per_prompt)
    total = batch_size * num_images_per_prompt
    if isinstance(generator, list) and len(generator) != total:
        raise ValueError(
            f"got a list of {len(generator)} generators for {batch_size} prompt(s) x {num_images_per_prompt} "
            f"image(s) per prompt = {total} images"
        )
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    unknown = [k for k in callback_inputs if k not in allowed_callback_inputs]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not in {list(allowed_callback_inputs)}")


def check_image_count(images: ImageBatch | None, batch_size: int, total: int) -> None:
    """Raises ``ValueError`` unless there is 1 image, one per prompt, or one per output image."""
    n = 0 if images is None else len(images)
    if images is not None and n not in (1, batch_size, total):
        raise ValueError(
            f"got {n} images in image for {batch_size} prompt(s) and {total} output image(s); pass 1, "
            f"{batch_size} or {total} images"
        )


def check_latents(latents: Any, total: int, channels: int, size: tuple[int, int] | None) -> None:
    """Raises ``ValueError`` unless ``latents`` is a ``(total, channels, h, w)`` tensor (``(h, w)`` = ``size`` when
    height / width were passed)."""
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        shape = tuple(latents.shape) if hasattr(latents, "shape") else type(latents).__name__
        raise ValueError(f"latents must be a tensor (batch, {channels}, h, w), got {shape}")
    expected = (total, channels, *(size or latents.shape[2:]))
    if tuple(latents.shape) != expected:
        raise ValueError(
            f"latents must have shape {expected} (prompts x num_images_per_prompt, the UNet's in_channels"
            f"{', height and width / vae_scale_factor' if size else ''}), got {tuple(latents.shape)}"
        )


def is_latents(images: ImageBatch, latent_channels: int) -> bool:
    """Whether a prepared image batch is already-encoded latents (a tensor with ``latent_channels`` channels)."""
    return isinstance(images, torch.Tensor) and images.shape[1] == latent_channels


def prepare_image(image: Any, latent_channels: int) -> ImageBatch | None:
    """Checks ``image`` and converts it to a list of RGB PIL images, an ``(N, H, W, 3)`` float array or an
    ``(N, C, H, W)`` tensor (module docstring); ``None`` stays ``None``.

    Raises:
        ValueError: For any other type (a path, a number, ...), a mixed or empty list, images of different shapes,
            integer arrays, or an unsupported number of channels.
    """
    if image is None:
        return None
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    kind = next((k for k in (PIL.Image.Image, np.ndarray, torch.Tensor) if items and isinstance(items[0], k)), None)
    if kind is None or not all(isinstance(x, kind) for x in items):
        got = f"{type(image).__name__} {image!r}"[:200]
        hint = " (open an image file with PIL.Image.open)" if isinstance(image, (str, os.PathLike)) else ""
        raise ValueError(f"image must be {IMAGE_FORMATS.format(c=latent_channels)}; got {got}{hint}")
    if isinstance(items[0], PIL.Image.Image):
        return [to_rgb(x) for x in items]
    batch = [x if x.ndim == 4 else x[None] for x in items if x.ndim in (3, 4)]
    if len(batch) != len(items) or len({tuple(x.shape[1:]) for x in batch}) != 1:
        raise ValueError(f"image arrays must all be (H, W, C) or (N, H, W, C) of one size, got "
                         f"{[tuple(x.shape) for x in items]}")  # fmt: skip
    if isinstance(items[0], np.ndarray):
        return _numpy_pixels(np.concatenate(batch))
    pixels = torch.cat(batch)
    if pixels.shape[1] not in (3, latent_channels):
        raise ValueError(f"image tensors must be (N, 3, H, W) pixels or (N, {latent_channels}, h, w) latents, got "
                         f"{tuple(pixels.shape)}")  # fmt: skip
    return pixels


def _numpy_pixels(array: np.ndarray) -> np.ndarray:
    """``(N, H, W, 3)`` floats from ``(N, H, W, C)``, ``C`` in 1, 3, 4 (RGBA flattened onto white)."""
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"image arrays must hold floats in [0, 1], got dtype {array.dtype} (divide by 255 first)")
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        alpha = array[..., 3:]
        return array[..., :3] * alpha + (1.0 - alpha)  # over white, as images.to_rgb does for PIL
    if channels != 3:
        raise ValueError(f"image arrays must be (N, H, W, C) with C = 3, 1 or 4 channels, got {array.shape}")
    return array
