"""What the demo's drawing widgets send, turned into model inputs: a sketch image, or an image and a mask.

An editor value is what an image editor widget sends (Gradio's ``ImageEditor`` / ``Sketchpad`` with ``type="pil"``):
a dict with ``background`` (an image or ``None``), ``layers`` (the strokes, transparent elsewhere) and ``composite``
(all of it flattened). Everything here is plain PIL, so it is tested without a browser. Bad input (nothing drawn, a
canvas that is not square or smaller than the model's images) is a ``ValueError`` whose message the page shows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ..images import to_rgb

EditorValue = dict[str, Any]


def _image(value: Any, name: str) -> Image.Image | None:
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    if not isinstance(value, Image.Image):
        raise ValueError(f"{name}: expected an image, got {type(value).__name__}")
    return value


def check_canvas_size(image: Image.Image, size: int, name: str) -> None:
    """A ``ValueError`` unless ``image`` is square and at least ``size`` pixels wide (it is resized to ``size``)."""
    w, h = image.size
    if w != h:
        raise ValueError(f"{name} is {w}x{h} px: it must be square (it is resized to the model's {size}x{size})")
    if w < size:
        raise ValueError(f"{name} is {w}x{h} px: it must be at least the model's {size}x{size}")


def is_blank(image: Image.Image) -> bool:
    """Whether every pixel of the RGB ``image`` has the same colour (an empty canvas)."""
    return all(lo == hi for lo, hi in image.getextrema())


def sketch_image(value: EditorValue | Image.Image | None, size: int) -> Image.Image:
    """The drawing as an RGB ``size x size`` image (transparent parts white), ready for image-to-image.

    Args:
        value: An editor value (its ``composite`` is used) or an image.
        size: The model's image size in pixels.

    Raises:
        ValueError: Nothing is drawn (no image, or a single colour), or the canvas is not square / too small.
    """
    image = _image(value.get("composite") if isinstance(value, dict) else value, "canvas")
    if image is None:
        raise ValueError("the canvas is empty: draw something")
    rgb = to_rgb(image)
    if is_blank(rgb):
        raise ValueError("the canvas is empty: draw something")
    check_canvas_size(rgb, size, "the canvas")
    return rgb.resize((size, size), Image.Resampling.LANCZOS)


def inpaint_inputs(value: EditorValue | None, size: int) -> tuple[Image.Image, Image.Image]:
    """``(image, mask)`` at ``size x size`` for inpainting: the editor's background, and white wherever a layer was
    painted (the part to repaint).

    Raises:
        ValueError: No background image, nothing painted, or a background that is not square / too small.
    """
    value = value or {}
    background = _image(value.get("background"), "background")
    if background is None or (background.mode == "RGBA" and background.getextrema()[3][1] == 0):
        raise ValueError("no image to inpaint: upload one, or send the text-to-image output here")
    check_canvas_size(background, size, "the image")
    painted = np.zeros(background.size[::-1], dtype=bool)
    for i, layer in enumerate(value.get("layers") or []):
        layer = _image(layer, f"layer {i}")
        if layer.size != background.size:
            raise ValueError(f"layer {i} is {layer.size}, the image {background.size}: they must match")
        painted |= np.asarray(layer.convert("RGBA"))[..., 3] > 0
    if not painted.any():
        raise ValueError("nothing to repaint: paint over the part of the image to change")
    mask = Image.fromarray(painted.astype(np.uint8) * 255, mode="L")
    image = to_rgb(background).resize((size, size), Image.Resampling.LANCZOS)
    return image, mask.resize((size, size), Image.Resampling.BOX)


__all__ = ["EditorValue", "check_canvas_size", "inpaint_inputs", "is_blank", "sketch_image"]
