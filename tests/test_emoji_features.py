"""Tests of lcm_kit.emoji.features: FID-emoji/KID-emoji sanity, feature-net save/load (moved from test_eval.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lcm_kit.emoji import features
from lcm_kit.testing import synthetic_blobs as _blobs


def test_feature_fid_kid_orders_corruption() -> None:
    pytest.importorskip("torchmetrics")
    torch.manual_seed(0)
    net = features.EmojiFeatureNet(num_groups=3, num_subgroups=5).eval()
    real = _blobs(64, seed=0)
    same = features.feature_fid_kid(real, real, net)
    light = features.feature_fid_kid(real, (real + 0.1 * torch.randn_like(real)).clamp(0, 1), net)
    heavy = features.feature_fid_kid(real, (real + 0.5 * torch.randn_like(real)).clamp(0, 1), net)
    assert set(same) == {"fid_emoji", "kid_emoji", "kid_emoji_std"}
    assert abs(same["fid_emoji"]) < 1e-3
    assert same["fid_emoji"] < light["fid_emoji"] < heavy["fid_emoji"]
    assert light["kid_emoji"] < heavy["kid_emoji"]


def test_feature_fid_accepts_pil_and_other_sizes() -> None:
    pytest.importorskip("torchmetrics")
    from PIL import Image

    net = features.EmojiFeatureNet(num_groups=2, num_subgroups=2).eval()
    real = _blobs(8, seed=1)
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).astype("uint8")).resize((64, 64)) for im in real]
    out = features.feature_fid_kid(real, pil, net, kid_subset_size=4)
    assert math.isfinite(out["fid_emoji"])
    with pytest.raises(ValueError, match="at least 2"):
        features.feature_fid_kid(real[:1], real, net)


def test_feature_net_roundtrip(tmp_path: Path) -> None:
    net = features.EmojiFeatureNet(num_groups=2, num_subgroups=3, feature_dim=16).eval()
    labels = {"group": ["a", "b"], "subgroup": ["x", "y", "z"]}
    features.save_feature_net(net, tmp_path, labels)
    loaded = features.load_feature_net(tmp_path)
    x = _blobs(4, seed=2)
    assert torch.equal(net(x), loaded(x)) and loaded(x).shape == (4, 16)
    assert loaded.labels == labels and loaded.num_features == 16
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(loaded(u8), loaded(u8.float() / 255))


@pytest.mark.skipif(not (features.DEFAULT_FEATURES_DIR / "model.safetensors").exists(), reason="not built")
def test_committed_feature_net_loads() -> None:
    net = features.load_feature_net()
    assert net(_blobs(2, seed=3)).shape == (2, net.num_features)
    assert len(net.labels["group"]) >= 8
