"""Training-image transforms (no torchvision) and the per-sample random generators.

Resize the short side to ``resolution`` (bilinear, as diffusers' scripts), center or random crop to a square,
optional horizontal flip (p = 0.5), scale to ``[-1, 1]``; :func:`size_ids` records where the crop came from (SDXL's
size and crop conditioning). Random choices come from generators keyed by ``(seed, epoch, index)``, so they do not
depend on worker count and repeat exactly on resume.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image


def keyed_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by the sha256 of ``key`` (its parts joined by ``/``): a pure function of the key."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator seeded by ``(seed, epoch, index)``: per-sample randomness independent of workers and resume."""
    return keyed_generator(seed, epoch, index)


class CropBox(NamedTuple):
    """Where a training crop comes from: the image's size after the short-side resize, the crop's top-left."""

    width: int
    height: int
    left: int
    top: int


def crop_box(size: tuple[int, int], resolution: int, center_crop: bool,
             generator: torch.Generator | None = None) -> CropBox:  # fmt: skip
    """The resize and crop of an image of ``size = (w, h)``: short side to ``resolution``, then a center crop or a
    random one (drawn from ``generator``: left, then top)."""
    w, h = size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if center_crop:
        return CropBox(new_w, new_h, (new_w - resolution) // 2, (new_h - resolution) // 2)
    left = int(torch.randint(0, new_w - resolution + 1, (1,), generator=generator))
    top = int(torch.randint(0, new_h - resolution + 1, (1,), generator=generator))
    return CropBox(new_w, new_h, left, top)


def crop_image(img: Image.Image, box: CropBox, resolution: int, flip: bool) -> torch.Tensor:
    """Resize, crop to ``box``, optional h-flip -> ``(3, R, R)`` in [-1, 1]."""
    img = img.resize((box.width, box.height), Image.BILINEAR)
    img = img.crop((box.left, box.top, box.left + resolution, box.top + resolution))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    return x.flip(-1) if flip else x


def transform_image(
    img: Image.Image, resolution: int, center_crop: bool, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Resize short side, crop (center, or random with ``generator``), optional h-flip -> ``(3, R, R)`` in [-1, 1]."""
    return crop_image(img, crop_box(img.size, resolution, center_crop, generator), resolution, flip)


def size_ids(size: tuple[int, int], box: CropBox, resolution: int, flip: bool) -> torch.Tensor:
    """SDXL's size and crop conditioning of one sample (:mod:`lcm_kit.conditioning`), float32 ``(6,)``:
    ``(original h, original w, crop top, crop left, R, R)``. A flipped image's crop starts where the box ends,
    counted from the other side (``width - left - R``); diffusers' SDXL scripts record ``R - left`` there instead."""
    left = box.width - box.left - resolution if flip else box.left
    return torch.tensor([size[1], size[0], box.top, left, resolution, resolution], dtype=torch.float32)


def draw_flip(random_flip: bool, generator: torch.Generator) -> bool:
    """Whether to flip this sample (p = 0.5 when ``random_flip``)."""
    return bool(random_flip and torch.rand((), generator=generator) < 0.5)
