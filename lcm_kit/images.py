"""One conversion of any PIL image to 8-bit RGB, used for pipeline inputs and for training data.

``Image.convert("RGB")`` alone goes wrong on two kinds of files users have:

* High bit depth: Pillow opens 16-bit grayscale PNG / TIFF files as mode ``I;16`` (or ``I``, ``I;16B``), and
  ``convert("RGB")`` clips every value above 255, so a normal 16-bit image comes out about 99 % white. Here the values
  are scaled to 8 bits (``v * 255 / 65535``, so 65535 -> 255). 16-bit RGB(A) PNGs are opened as 8-bit RGB(A) by Pillow
  already.
* Transparency: ``convert("RGB")`` drops alpha and keeps whatever colour is stored under transparent pixels (often
  black). Here transparent and translucent pixels are composited onto **white**, as A1111's img2img does by default
  and as the emoji data of :mod:`lcm_kit.emoji` is rendered.

Every other mode (``CMYK``, ``YCbCr``, ``L``, ``1``, plain ``P``, ``RGB``, ...) uses Pillow's own conversion.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Integer modes holding 16-bit data: Pillow's modes for 16-bit grayscale PNG and TIFF files.
SIXTEEN_BIT_MODES: tuple[str, ...] = ("I", "I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES: tuple[str, ...] = ("RGBA", "RGBa", "LA", "La", "PA")
BACKGROUND = (255, 255, 255)  # what transparent pixels become


def to_rgb(image: Image.Image) -> Image.Image:
    """A new 8-bit ``RGB`` copy of ``image``: 16-bit and float images scaled, transparency flattened onto white.

    Args:
        image: Any PIL image. Modes ``I``, ``I;16*`` are taken as 16-bit values (0..65535); mode ``F`` as floats in
            [0, 1] when no value exceeds 1, else as 16-bit values. Values out of range are clipped.

    Returns:
        An ``RGB`` image of the same size (always a new image, even for an ``RGB`` input).
    """
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        return _gray_to_8_bit(image).convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:  # a P / L / RGB image may have a transparent key
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return image.convert("RGB")


def _gray_to_8_bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    full_scale = 1.0 if image.mode == "F" and values.size and values.max() <= 1.0 else 65535.0
    return Image.fromarray(np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8), mode="L")


__all__ = ["to_rgb"]
