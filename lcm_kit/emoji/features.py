"""The emoji feature network and the FID-emoji / KID-emoji metric.

Inception (for FID) and CLIP (for CLIP score) weights cannot be downloaded here, so distribution metrics use the
features of :class:`EmojiFeatureNet`, a small CNN trained in this project to classify emoji groups and subgroups
(``examples/teacher/train_features.py``, weights in ``models/emoji-features``). The numbers are a stand-in for
Inception-FID: comparable only with each other (same network, same dataset, same sample counts), never with
published FID values; report them as "FID-emoji" / "KID-emoji". The computation itself is the generic
:func:`lcm_kit.eval.fid_kid` (any feature module).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..atomic import save_safetensors
from ..eval import fid_kid

DEFAULT_FEATURES_DIR = Path(__file__).resolve().parents[2] / "models" / "emoji-features"


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
        self.metric_name = "emoji"  # metric labels in lcm_kit.compare: "FID-emoji", "KID-emoji"
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


@torch.no_grad()
def feature_fid_kid(
    real_images: torch.Tensor | Sequence[Image.Image],
    fake_images: torch.Tensor | Sequence[Image.Image],
    feature_net: nn.Module | None = None,
    kid_subset_size: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """FID-emoji and KID-emoji: :func:`lcm_kit.eval.fid_kid` on :class:`EmojiFeatureNet` features.

    Args:
        real_images: Reference images, float (N, 3, H, W) in [0, 1], uint8, or a list of PIL images.
        fake_images: Generated images, same formats; sizes may differ from ``real_images``.
        feature_net: The feature network (default: the committed one, :func:`load_feature_net`).
        kid_subset_size: KID subset size; defaults to ``min(1000, len(real), len(fake))``.
        batch_size: Images per feature-network forward.
        seed: Seed of KID's random subsets (FID has no randomness).

    Returns:
        ``{"fid_emoji": ..., "kid_emoji": ..., "kid_emoji_std": ...}``.
    """
    net = feature_net if feature_net is not None else load_feature_net()
    s = fid_kid(real_images, fake_images, net, kid_subset_size, batch_size, seed)
    return {"fid_emoji": s["fid"], "kid_emoji": s["kid"], "kid_emoji_std": s["kid_std"]}


__all__ = ["DEFAULT_FEATURES_DIR", "EmojiFeatureNet", "feature_fid_kid", "load_feature_net", "save_feature_net"]
