"""Argument checks and conversions of :class:`lcm_kit.LCMEditPipeline`: images, masks, grey images and scale
factors to tensors, each bad input a ``ValueError`` naming the argument, raised before any model runs.

Images are what diffusers' pipelines take (PIL, numpy ``(H, W, 3)`` / ``(B, H, W, 3)`` in [0, 1], tensors
``(B, 3, H, W)`` in [0, 1], or lists of them) and come out as ``(B, 3, H, W)`` in [-1, 1]. Their size is kept:
an edit constrains pixels, so nothing is resized, and a size that is not a multiple of the VAE factor is an error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from .images import to_rgb
from .pipeline_inputs import check_count

_SIZE = VaeImageProcessor(vae_scale_factor=1)  # reads an input's size without rounding it
_MASKS = VaeImageProcessor(vae_scale_factor=1, do_normalize=False, do_binarize=True, do_convert_grayscale=True)


def _first(image: Any) -> Any:
    return image[0] if isinstance(image, list) and image else image


def image_size(image: Any, name: str) -> tuple[int, int]:
    """``(height, width)`` of an image input (the first one of a list).

    Raises:
        ValueError: Naming ``name`` if it is ``None``, an empty list or not an image.
    """
    first = _first(image)
    if not isinstance(first, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        raise ValueError(f"{name} must be a PIL image, a numpy array, a tensor or a list of them, got {type(image)}")
    if isinstance(first, np.ndarray) and first.ndim == 2:  # (H, W): a grey image or a mask
        return first.shape
    height, width = _SIZE.get_default_height_width(first)
    return height, width


def to_pixels(processor: VaeImageProcessor, image: Any, name: str, multiple: int) -> torch.Tensor:
    """``image`` as ``(B, 3, H, W)`` in [-1, 1], its size unchanged.

    Raises:
        ValueError: Naming ``name`` if it is not an image or its size is not a multiple of ``multiple``.
    """
    height, width = image_size(image, name)
    if height % multiple or width % multiple:
        raise ValueError(f"{name} is {height}x{width}: height and width must be multiples of {multiple}")
    return processor.preprocess(_as_rgb(image), height=height, width=width)


def to_mask(mask_image: Any, size: tuple[int, int]) -> torch.Tensor:
    """A diffusers-convention mask (white / 1 = repaint; PIL, numpy ``(H, W)`` / ``(B, H, W)`` / ``(B, H, W, 1)``
    or a tensor ``(B, 1, H, W)`` / ``(H, W)``, values in [0, 1]) as ``(B, 1, H, W)`` in {0, 1} (binarized at 0.5).

    Raises:
        ValueError: Naming ``mask_image`` if it is not an image, has values outside [0, 1], or its size is not
            ``size`` (the image's).
    """
    mask_size = image_size(mask_image, "mask_image")
    if mask_size != tuple(size):
        raise ValueError(f"mask_image is {mask_size[0]}x{mask_size[1]} but image is {size[0]}x{size[1]}")
    items = mask_image if isinstance(mask_image, list) else [mask_image]
    for m in items:
        if isinstance(m, (np.ndarray, torch.Tensor)):
            lo, hi = float(m.min()), float(m.max())
            if lo < 0 or hi > 1:
                raise ValueError(f"mask_image values must be in [0, 1] (1 = repaint), got [{lo}, {hi}]")
    if isinstance(mask_image, torch.Tensor) and mask_image.ndim == 2:
        mask_image = mask_image[None, None]
    if isinstance(mask_image, np.ndarray) and mask_image.ndim == 2:
        mask_image = mask_image[None, :, :, None]
    return _MASKS.preprocess(mask_image, height=size[0], width=size[1])


def _as_rgb(image: Any) -> Any:
    """3-channel inputs: PIL images through :func:`lcm_kit.images.to_rgb` (16-bit scaled, transparency onto white, as
    for ``LCMPipeline``); grey numpy ``(H, W)`` / ``(..., 1)`` and tensors with 1 channel repeated."""
    if isinstance(image, list):
        return [_as_rgb(i) for i in image]
    if isinstance(image, PIL.Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        image = image[..., None] if image.ndim == 2 else image
        return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    if isinstance(image, torch.Tensor) and image.ndim >= 3 and image.shape[-3] == 1:
        return image.repeat_interleave(3, dim=-3)
    return image


def to_grey(processor: VaeImageProcessor, image: Any, multiple: int, tolerance: float = 1e-6) -> torch.Tensor:
    """A greyscale image as its luma ``(B, 1, H, W)`` in [-1, 1] (grey PIL modes, 1-channel arrays, or RGB with
    ``R == G == B``).

    Raises:
        ValueError: Naming ``image`` if it has colour (channels differing by more than ``tolerance``), or as
            :func:`to_pixels`.
    """
    pixels = to_pixels(processor, image, "image", multiple)
    spread = float((pixels.amax(1) - pixels.amin(1)).abs().max()) / 2  # in [0, 1] units
    if spread > tolerance:
        raise ValueError(
            f"colorize needs a greyscale image, but image has colour (channels differ by up to {spread:.4f}); "
            "pass image.convert('L') to colorize it anew"
        )
    return pixels[:, :1]


def output_size(low_size: tuple[int, int], scale_factor: Any, height: int | None, width: int | None,
                multiple: int) -> tuple[int, int]:  # fmt: skip
    """The output size of super-resolution: ``low_size * scale_factor``, or ``(height, width)`` if given.

    Raises:
        ValueError: Naming ``scale_factor`` if it is not an int >= 1, does not divide ``height`` / ``width`` into the
            low-resolution size, or makes a size that is not a multiple of ``multiple`` (the VAE factor).
    """
    check_count("scale_factor", scale_factor)
    out = (height or low_size[0] * scale_factor, width or low_size[1] * scale_factor)
    if out[0] % scale_factor or out[1] % scale_factor:
        raise ValueError(f"scale_factor={scale_factor} does not divide the output size {out[0]}x{out[1]}")
    if (out[0] // scale_factor, out[1] // scale_factor) != tuple(low_size):
        raise ValueError(f"scale_factor={scale_factor}: output {out[0]}x{out[1]} is not image size "
                         f"{low_size[0]}x{low_size[1]} times scale_factor")  # fmt: skip
    if out[0] % multiple or out[1] % multiple:
        raise ValueError(f"scale_factor={scale_factor} gives {out[0]}x{out[1]}, not a multiple of {multiple}")
    return out


def check_interpolation(prompt: Any, image: Any, num_frames: Any) -> list[str]:
    """The one or two prompts of an interpolation, as a list.

    Raises:
        ValueError: Naming ``num_frames`` unless it is an int >= 2, ``prompt`` unless it is a string or a list of 1
            or 2 strings, ``image`` unless it is ``None`` or a list of 2 images.
    """
    check_count("num_frames", num_frames, minimum=2)
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or len(prompts) not in (1, 2) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a list of 1 or 2 strings (the two ends), got {prompt!r}")
    if image is not None and not (isinstance(image, list) and len(image) == 2):
        raise ValueError(f"image must be None or a list of 2 images (the two ends), got {type(image)}")
    return prompts


__all__ = ["check_interpolation", "image_size", "output_size", "to_grey", "to_mask", "to_pixels"]
