"""Properties of the consistency math (lcm_kit.functional, lcm_kit.schedules), checked against closed forms and
against diffusers where it implements the same formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, LatentConsistencyModelPipeline, LCMScheduler

from lcm_kit import functional as F
from lcm_kit import schedules


def test_boundary_scalings_limits_and_diffusers():
    c_skip, c_out = F.boundary_scalings(torch.tensor(0.0))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0  # f(x, 0) = x
    ref = LCMScheduler()
    for t in [0, 1, 19, 259, 999]:
        ours = F.boundary_scalings(torch.tensor(t))
        theirs = ref.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert torch.allclose(torch.stack(ours).float(), torch.stack([torch.as_tensor(x) for x in theirs]).float())
    # closed form at s = 10 * 1: c_skip = .25 / (100 + .25), c_out = 10 / sqrt(100.25)
    c_skip, c_out = F.boundary_scalings(1.0, sigma_data=0.5, timestep_scaling=10.0)
    assert c_skip == pytest.approx(0.25 / 100.25) and c_out == pytest.approx(10 / 100.25**0.5)


@pytest.mark.parametrize("prediction_type", F.PREDICTION_TYPES)
def test_predict_x0_eps_inverts_noising(prediction_type):
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    ac = schedules.alphas_cumprod_from_betas(schedules.make_betas())
    t = torch.tensor([1, 500, 999])
    alpha, sigma = schedules.alpha_sigma(ac, t)
    z = F.diffuse(x0, eps, alpha, sigma)
    a, s = F.append_dims(alpha, 4), F.append_dims(sigma, 4)
    # the model output a perfect model would give for each parameterisation
    output = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[prediction_type]
    pred_x0, pred_eps = F.predict_x0_eps(output, z, alpha, sigma, prediction_type)
    # x0 from eps at t=999 divides by alpha ~ 0.068, so float32 error grows ~15x there
    torch.testing.assert_close(pred_x0, x0, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(pred_eps, eps, atol=2e-5, rtol=1e-4)


def test_predict_rejects_unknown_type():
    with pytest.raises(ValueError, match="flow"):
        F.predict_x0_eps(torch.zeros(1, 1), torch.zeros(1, 1), 1.0, 0.0, "flow")


def test_diffuse_matches_diffusers_add_noise():
    torch.manual_seed(0)
    x0, eps = torch.randn(4, 4, 3, 3), torch.randn(4, 4, 3, 3)
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 500, 999])
    alpha, sigma = schedules.alpha_sigma(ref.alphas_cumprod, t)
    torch.testing.assert_close(F.diffuse(x0, eps, alpha, sigma), ref.add_noise(x0, eps, t))


def test_cfg_combine_lcm_convention_equals_classic_cfg():
    torch.manual_seed(0)
    cond, uncond = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    scale = 7.5
    classic = uncond + scale * (cond - uncond)
    torch.testing.assert_close(F.cfg_combine(cond, uncond, F.guidance_w(scale)), classic)
    # per-sample w broadcasts
    w = torch.tensor([0.0, 2.0])
    out = F.cfg_combine(cond, uncond, w)
    torch.testing.assert_close(out[0], cond[0])
    torch.testing.assert_close(out[1], cond[1] + 2 * (cond[1] - uncond[1]))


@pytest.mark.parametrize("dim", [256, 32, 33])
def test_guidance_embedding_matches_diffusers(dim):
    w = torch.tensor([0.0, 1.5, 7.5, 14.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    torch.testing.assert_close(F.guidance_scale_embedding(w, dim), ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        F.guidance_scale_embedding(w[None], dim)


def test_dynamic_threshold_matches_diffusers():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8) * 3
    ref = LCMScheduler(thresholding=True, sample_max_value=2.0)
    torch.testing.assert_close(F.dynamic_threshold(x, 0.995, 2.0), ref._threshold_sample(x))


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_betas_match_diffusers(schedule, zero_snr):
    ref = LCMScheduler(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr)
    ours = schedules.make_betas(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr)
    torch.testing.assert_close(ours, ref.betas)
    with pytest.raises(ValueError, match="cosine"):
        schedules.make_betas(beta_schedule="cosine")


def test_skipping_step_grid_and_inference_subset():
    # NOTES: k = 1000 // 50 = 20, grid [19, 39, ..., 999]
    grid = schedules.skipping_step_timesteps(1000, 50)
    np.testing.assert_array_equal(grid, np.arange(19, 1000, 20))
    np.testing.assert_array_equal(schedules.lcm_inference_timesteps(4), [999, 759, 499, 259])
    np.testing.assert_array_equal(schedules.lcm_inference_timesteps(4, strength=0.5), [499, 379, 259, 139])
    np.testing.assert_array_equal(schedules.lcm_inference_timesteps(1), [999])
    with pytest.raises(ValueError, match="51"):
        schedules.lcm_inference_timesteps(51)
    with pytest.raises(ValueError, match="0"):
        schedules.lcm_inference_timesteps(0)


def test_custom_timesteps_validation(caplog):
    with caplog.at_level("WARNING"):
        out = schedules.check_custom_timesteps([999, 749, 499, 249])
    np.testing.assert_array_equal(out, [999, 749, 499, 249])
    assert "749" in caplog.text  # off-grid points are accepted with a warning
    with pytest.raises(ValueError, match="descending"):
        schedules.check_custom_timesteps([499, 999])
    with pytest.raises(ValueError, match="1000"):
        schedules.check_custom_timesteps([1000, 10])
