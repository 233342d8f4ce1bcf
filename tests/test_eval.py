"""Tests of lcm_kit.eval: closed-form PSNR/MSE, generic FID/KID with any feature module, seeded KID."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lcm_kit import eval as lcm_eval
from lcm_kit.testing import synthetic_blobs as _blobs


def test_pixel_psnr_closed_form() -> None:
    a = torch.zeros(3, 3, 8, 8)
    b = a + 0.1  # MSE = 0.01 -> PSNR = 10 log10(1 / 0.01) = 20 dB
    assert lcm_eval.pixel_psnr(a, b) == pytest.approx(20.0)
    assert lcm_eval.pixel_psnr(a, b, data_range=2.0) == pytest.approx(20.0 + 20 * math.log10(2))
    # mean of per-image PSNRs: differences 0.1 and 0.01 -> 20 dB and 40 dB
    c = torch.cat([a[:1] + 0.1, a[:1] + 0.01])
    assert lcm_eval.pixel_psnr(a[:2], c) == pytest.approx(30.0)
    assert lcm_eval.pixel_psnr(a[0], b[0]) == pytest.approx(20.0)  # single image (C, H, W)
    assert lcm_eval.pixel_psnr(a, a) == math.inf


def test_latent_mse() -> None:
    a = torch.zeros(2, 4, 8, 8)
    assert lcm_eval.latent_mse(a, a + 0.5) == pytest.approx(0.25)
    assert lcm_eval.latent_mse(a, a) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        lcm_eval.latent_mse(a, a[:1])


class _MeanColour(nn.Module):
    """A feature module that is not the emoji network: per-channel means and standard deviations."""

    num_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.float().mean(dim=(2, 3)), x.float().std(dim=(2, 3))], dim=1)


def test_fid_kid_with_any_feature_module() -> None:
    pytest.importorskip("torchmetrics")
    real = _blobs(32, seed=0)
    same = lcm_eval.fid_kid(real, real, _MeanColour())
    far = lcm_eval.fid_kid(real, (real * 0.5).clamp(0, 1), _MeanColour())
    assert set(same) == {"fid", "kid", "kid_std"}
    assert abs(same["fid"]) < 1e-3 and far["fid"] > 1e-2 and far["kid"] > same["kid"]
    with pytest.raises(ValueError, match="at least 2"):
        lcm_eval.fid_kid(real[:1], real, _MeanColour())


def test_kid_is_seeded_and_leaves_the_global_rng_alone() -> None:
    pytest.importorskip("torchmetrics")
    real, fake = _blobs(24, seed=0), _blobs(24, seed=1)
    torch.manual_seed(123)
    a = lcm_eval.fid_kid(real, fake, _MeanColour(), kid_subset_size=8)
    after_a = torch.rand(1)
    torch.manual_seed(456)  # a different global state: the same KID
    b = lcm_eval.fid_kid(real, fake, _MeanColour(), kid_subset_size=8)
    assert a == b
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after_a)  # KID's subset draws did not advance the caller's generator
    c = lcm_eval.fid_kid(real, fake, _MeanColour(), kid_subset_size=8, seed=1)
    assert c["fid"] == a["fid"] and c["kid"] != a["kid"]  # other subsets; FID has no randomness
