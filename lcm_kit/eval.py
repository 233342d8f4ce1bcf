"""Evaluation metrics that work for any teacher and data set.

* Teacher agreement: a student's k-step output against the teacher's DDIM-50 solution from the same initial noise
  and guidance -- :func:`latent_mse` on latents, :func:`pixel_psnr` on decoded images.
* A distribution metric: :func:`fid_kid`, FID / KID (torchmetrics) in the feature space of any feature module, with
  seeded KID subsets. Inception weights cannot be downloaded here; the built-in default uses the in-project emoji
  network, :mod:`lcm_kit.emoji.features` ("FID-emoji").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .images import to_rgb


def to_unit_tensor(images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
    """PIL images or a tensor in [0, 1] -> float tensor (N, 3, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            return images.float() / 255.0
        return images.float()
    arrays = np.stack([np.asarray(to_rgb(im), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2)


@torch.no_grad()
def fid_kid(
    real_images: torch.Tensor | Sequence[Image.Image],
    fake_images: torch.Tensor | Sequence[Image.Image],
    feature_net: nn.Module,
    kid_subset_size: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """FID and KID (torchmetrics) in the feature space of any ``feature_net``, e.g. a network trained on the data.

    Values depend on the feature network: comparable only with each other (same network and sample counts). KID
    averages over random subsets; they are drawn under ``torch.manual_seed(seed)`` in a forked RNG state, so the
    same inputs give the same KID and the caller's random state is untouched. FID has no randomness.

    Args:
        real_images: Reference images, float (N, 3, H, W) in [0, 1], uint8, or a list of PIL images.
        fake_images: Generated images, same formats; sizes may differ from ``real_images``.
        feature_net: Module mapping (N, 3, H, W) floats in [0, 1] to (N, D) features; needs ``num_features`` (D).
        kid_subset_size: KID subset size; defaults to ``min(1000, len(real), len(fake))``.
        batch_size: Images per feature-network forward.
        seed: Seed of KID's subsets.

    Returns:
        ``{"fid": ..., "kid": ..., "kid_std": ...}``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = to_unit_tensor(real_images), to_unit_tensor(fake_images)
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"need at least 2 real and 2 fake images, got {len(real)} and {len(fake)}")
    subset = kid_subset_size or min(1000, len(real), len(fake))
    fid = FrechetInceptionDistance(feature=feature_net, normalize=True)
    kid = KernelInceptionDistance(feature=feature_net, normalize=True, subset_size=subset)
    for images, is_real in ((real, True), (fake, False)):
        for chunk in images.split(batch_size):
            fid.update(chunk, real=is_real)
            kid.update(chunk, real=is_real)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def latent_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error between two latent batches of the same shape, e.g. (N, 4, h, w)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.double() - b.double()).pow(2).mean())


def pixel_psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean over images of the per-image PSNR in dB, ``10 log10(data_range^2 / MSE_i)``.

    Args:
        a: Images (N, C, H, W) (or one image (C, H, W)).
        b: Images of the same shape.
        data_range: Max minus min of the pixel range: 1.0 for [0, 1], 2.0 for [-1, 1], 255 for uint8 values.

    Returns:
        PSNR in dB; ``inf`` when any image pair is identical.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() == 3:
        a, b = a[None], b[None]
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)
    psnr = 10 * torch.log10(data_range**2 / mse)
    return float(psnr.mean())


__all__ = ["fid_kid", "latent_mse", "pixel_psnr", "to_unit_tensor"]
