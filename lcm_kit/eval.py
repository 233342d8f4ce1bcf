"""Offline evaluation: FID/KID on features of an in-project emoji network, and teacher-agreement metrics.

Inception (for FID) and CLIP (for CLIP score) weights cannot be downloaded here, so distribution metrics use the
features of `EmojiFeatureNet`, a small CNN trained in this project to classify emoji groups and subgroups
(``examples/teacher/train_features.py``, weights in ``models/emoji-features``). The numbers are a stand-in for
Inception-FID: comparable only with each other (same network, same dataset, same sample counts), never with
published FID values; report them as "FID-emoji" / "KID-emoji".

Teacher agreement compares a student's k-step output with the teacher's DDIM-50 solution from the same initial noise
and guidance: `latent_mse` on latents, `pixel_psnr` on decoded images.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .atomic import save_safetensors

DEFAULT_FEATURES_DIR = Path(__file__).resolve().parent.parent / "models" / "emoji-features"


class EmojiFeatureNet(nn.Module):
    """Small CNN over RGB emoji: a ``feature_dim`` embedding plus group and subgroup classification heads.

    Args:
        num_groups: Number of emoji-test.txt groups.
        num_subgroups: Number of emoji-test.txt subgroups.
        feature_dim: Size of the embedding used for FID/KID.
        resolution: Side the network works at; inputs of other sizes are resized (bilinear, antialiased).
        width: Channels of the first conv layer (then 2x, 3x, 4x).
    """

    def __init__(
        self, num_groups: int, num_subgroups: int, feature_dim: int = 64, resolution: int = 32, width: int = 32
    ) -> None:
        super().__init__()
        self.config = {
            "num_groups": num_groups, "num_subgroups": num_subgroups, "feature_dim": feature_dim,
            "resolution": resolution, "width": width,
        }  # fmt: skip
        self.num_features = feature_dim  # read by torchmetrics
        chans = [3, width, 2 * width, 3 * width, 4 * width]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:], strict=True)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, c_out)]
            layers.append(nn.SiLU())
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(chans[-1], feature_dim), nn.SiLU())
        self.group_head = nn.Linear(feature_dim, num_groups)
        self.subgroup_head = nn.Linear(feature_dim, num_subgroups)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        size = self.config["resolution"]
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x * 2 - 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embedding of images (N, 3, H, W), float in [0, 1] or uint8; returns (N, feature_dim)."""
        return self.embed(self.trunk(self._prepare(images)))

    def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Group and subgroup logits, shapes (N, num_groups) and (N, num_subgroups)."""
        h = self.forward(images)
        return self.group_head(h), self.subgroup_head(h)


def save_feature_net(net: EmojiFeatureNet, path: str | os.PathLike, labels: dict[str, list[str]]) -> None:
    """Write ``config.json`` (architecture + label names) and ``model.safetensors`` (atomic) to ``path``."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**net.config, "labels": labels}, indent=2, ensure_ascii=False))
    save_safetensors(net.state_dict(), out / "model.safetensors")


def load_feature_net(path: str | os.PathLike = DEFAULT_FEATURES_DIR) -> EmojiFeatureNet:
    """Load the committed emoji feature network (eval mode, gradients off); labels are in ``net.labels``."""
    from safetensors.torch import load_file

    config = json.loads((Path(path) / "config.json").read_text())
    labels = config.pop("labels", {})
    net = EmojiFeatureNet(**config)
    net.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    net.labels = labels
    return net.eval().requires_grad_(False)


def to_unit_tensor(images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
    """PIL images or a tensor in [0, 1] -> float tensor (N, 3, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            return images.float() / 255.0
        return images.float()
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2)


@torch.no_grad()
def feature_fid_kid(
    real_images: torch.Tensor | Sequence[Image.Image],
    fake_images: torch.Tensor | Sequence[Image.Image],
    feature_net: nn.Module,
    kid_subset_size: int | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """FID and KID computed on ``feature_net`` features (torchmetrics), not on Inception features.

    A stand-in for Inception-FID: features of a network trained in this project on this dataset, so values are
    comparable only with each other (same network and sample counts). Report them as "FID-emoji" / "KID-emoji".

    Args:
        real_images: Reference images, float (N, 3, H, W) in [0, 1], uint8, or a list of PIL images.
        fake_images: Generated images, same formats; sizes may differ from ``real_images``.
        feature_net: Module mapping (N, 3, H, W) floats in [0, 1] to (N, D) features; needs ``num_features``.
        kid_subset_size: KID subset size; defaults to ``min(1000, len(real), len(fake))``.
        batch_size: Images per feature-network forward.

    Returns:
        ``{"fid_emoji": ..., "kid_emoji": ..., "kid_emoji_std": ...}``.
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
    kid_mean, kid_std = kid.compute()
    return {"fid_emoji": float(fid.compute()), "kid_emoji": float(kid_mean), "kid_emoji_std": float(kid_std)}


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


__all__ = [
    "EmojiFeatureNet",
    "feature_fid_kid",
    "latent_mse",
    "load_feature_net",
    "pixel_psnr",
    "save_feature_net",
    "to_unit_tensor",
]
