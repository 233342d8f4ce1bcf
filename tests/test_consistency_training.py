"""Consistency training (``--objective ct``): the curriculum, the noise-level distribution, the whole-sample distances,
the VP mapping of the pairs, and the objective's contract (no teacher call, same dropout masks for the target).

The pair construction is checked on a point mass ``x0``: its probability-flow ODE is known in closed form, so the
exact consistency function (the ODE solution at the boundary, timestep 0) makes the consistency-training loss vanish
exactly -- but only if both points of a pair share the noise draw and are mapped to the same VP trajectory.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lcm_kit.consistency_training import ct_points, ict_levels
from lcm_kit.distill.config import ModelConfig, ObjectiveConfig
from lcm_kit.distill.networks import ModelFns
from lcm_kit.distill.objectives import CTObjective, make_objective
from lcm_kit.functional import (
    boundary_scalings,
    drop_condition,
    ect_lower_sigma,
    lognormal_level_probs,
    whole_sample_distance,
)
from lcm_kit.schedules import (
    alphas_cumprod_from_betas,
    ict_doubling_interval,
    ict_num_noise_levels,
    karras_sigmas,
    make_betas,
    sigma_to_timestep,
    vp_sigmas,
)

TABLE = alphas_cumprod_from_betas(make_betas(1000, 0.00085, 0.012, "scaled_linear")).double()
SHAPE = (6, 4, 8, 8)


def config(**kw) -> ObjectiveConfig:
    return ObjectiveConfig(**{"objective": "ct", "ct_total_steps": 800, **kw})


def test_ict_curriculum_starts_at_11_doubles_every_k_prime_steps_and_is_capped():
    # iCT defaults s0 = 10, s1 = 1280: K' = floor(K / (log2(128) + 1)) = K / 8; N = 10 * 2^j + 1 up to 1281.
    assert ict_doubling_interval(800) == 100
    assert ict_num_noise_levels(0, 800) == 11
    expected = {0: 11, 99: 11, 100: 21, 199: 21, 200: 41, 300: 81, 400: 161, 500: 321, 600: 641, 700: 1281}
    assert {k: ict_num_noise_levels(k, 800) for k in expected} == expected
    assert ict_num_noise_levels(10**6, 800) == 1281  # capped at s1 + 1
    assert [ict_num_noise_levels(k, 8) for k in range(9)] == [11, 21, 41, 81, 161, 321, 641, 1281, 1281]  # K' = 1
    assert ict_num_noise_levels(5, 3, s0=2, s1=5) == 6  # log2 floor(5/2) = 1: K' = 1; min(2 * 32, 5) + 1


def test_ict_levels_span_the_teachers_schedule_not_edm():
    sigmas = ict_levels(TABLE, config(), 0)
    table = ((1 - TABLE) / TABLE).sqrt()  # sqrt(1 - abar) / sqrt(abar), written out
    assert len(sigmas) == 11 and torch.all(sigmas[1:] > sigmas[:-1])
    assert sigmas[0].item() == pytest.approx(table[0].item(), rel=1e-12)
    assert sigmas[-1].item() == pytest.approx(table[-1].item(), rel=1e-12) and sigmas[-1] < 80
    rho = 7.0  # EDM Eq. 5 at i = 5 of 11, by hand
    mid = (table[0] ** (1 / rho) + 0.5 * (table[-1] ** (1 / rho) - table[0] ** (1 / rho))) ** rho
    assert sigmas[5].item() == pytest.approx(mid.item(), rel=1e-12)


@pytest.mark.parametrize("n", [11, 161, 1281])
def test_lognormal_pair_probabilities_match_the_erf_formula(n):
    sigmas = karras_sigmas(n, 0.0292, 14.6146)
    probs = lognormal_level_probs(sigmas, -1.1, 2.0)

    def cdf(s):  # the normal CDF of ln(sigma) up to the constant 1/2 factor and offset, from Python's math.erf
        return math.erf((math.log(s) - (-1.1)) / (math.sqrt(2.0) * 2.0))

    ref = np.array([cdf(float(sigmas[i + 1])) - cdf(float(sigmas[i])) for i in range(n - 1)])
    ref /= ref.sum()
    assert probs.shape == (n - 1,)
    np.testing.assert_allclose(probs.numpy(), ref, rtol=0, atol=1e-7)


def test_pairs_are_drawn_from_those_probabilities_with_iCT_weights():
    cfg = config()
    p = ct_points(20000, TABLE, cfg, 0, torch.Generator().manual_seed(0))
    sigmas = ict_levels(TABLE, cfg, 0)
    freq = torch.bincount(p.index, minlength=10).double() / 20000
    np.testing.assert_allclose(freq.numpy(), lognormal_level_probs(sigmas).numpy(), atol=0.015)
    assert torch.equal(p.sigma_lo, sigmas[p.index]) and torch.equal(p.sigma_hi, sigmas[p.index + 1])
    torch.testing.assert_close(p.weight, 1 / (p.sigma_hi - p.sigma_lo))


def test_ect_pairs_tighten_by_q_per_stage_and_stay_in_the_schedule():
    t = torch.tensor([0.05, 0.5, 2.0, 10.0], dtype=torch.float64)
    n = 1 + 8 * torch.sigmoid(-t)  # n(t) = 1 + k sigmoid(-b t), k = 8, b = 1
    for stage in (1, 3, 6):
        r = ect_lower_sigma(t, stage)
        torch.testing.assert_close(r, (t - t * n / 2**stage).clamp(min=0))
    # stage 1: n(t) / 2 >= 1 where sigmoid(-t) >= 1/8 (t <= ln 7): r clipped to the boundary; large t: r ~ t / 2
    stage1 = ect_lower_sigma(t, 1)
    assert stage1[:2].tolist() == [0.0, 0.0] and stage1[3].item() == pytest.approx(5, rel=1e-3)
    cfg = config(ct_schedule="ect")
    table = vp_sigmas(TABLE)
    for step in (0, 400, 799):
        p = ct_points(4000, TABLE, cfg, step, torch.Generator().manual_seed(1))
        assert torch.all(p.sigma_lo >= table[0]) and torch.all(p.sigma_hi <= table[-1])
        assert torch.all(p.sigma_lo <= p.sigma_hi) and torch.isfinite(p.weight).all() and (p.index == -1).all()
    late = ct_points(4000, TABLE, cfg, 799, torch.Generator().manual_seed(1))
    assert (late.sigma_lo > table[0]).float().mean() > 0.5  # by stage 8 most pairs are proper pairs


def test_sigma_to_timestep_inverts_the_table():
    table = vp_sigmas(TABLE)
    ts = torch.tensor([0, 1, 17, 500, 998, 999])
    torch.testing.assert_close(sigma_to_timestep(table[ts], TABLE), ts.double(), rtol=0, atol=1e-9)
    mid = (table[10].log() + table[11].log()) / 2
    assert sigma_to_timestep(mid.exp(), TABLE).item() == pytest.approx(10.5)
    assert sigma_to_timestep(torch.tensor([1e-6, 1e6]), TABLE).tolist() == [0.0, 999.0]  # clipped to the range


def test_pseudo_huber_constant_and_norm_are_whole_sample():
    a = torch.zeros(2, 4, 8, 8)
    b = a.clone()
    b[0, 0, 0, 0] = 3.0  # one element off by 3
    b[1] = 3.0 / 16  # every element off by 3/16: the same L2 norm of 3 over the 256 elements
    c = 0.00054 * math.sqrt(4 * 8 * 8)  # iCT: c = 0.00054 sqrt(d), d = 256 here
    dist = whole_sample_distance(a, b, "huber", c)
    assert dist.shape == (2,)
    torch.testing.assert_close(dist, torch.full((2,), math.sqrt(9 + c**2) - c))  # depends on the norm only
    per_element = (torch.sqrt((a - b) ** 2 + c**2) - c).flatten(1).sum(1)  # the per-element form differs
    assert abs(per_element[1].item() - dist[1].item()) > 0.01
    cauchy = whole_sample_distance(a, b, "cauchy", c)
    torch.testing.assert_close(cauchy, torch.full((2,), math.log(1 + 9 / (2 * c**2))))


def exact_point_mass_student(x0: torch.Tensor, prediction_type: str, error: float = 0.0):
    """The exact consistency function of data = the point mass ``x0``, in LCM's parameterisation, as a raw model
    output: from ``z = alpha_t x0 + sigma_t eps`` the ODE reaches ``alpha_0 x0 + sigma_0 eps`` at timestep 0. The
    VE sigma of a fractional timestep comes from log-linear interpolation of the table (the inverse of
    sigma_to_timestep)."""
    log_table = vp_sigmas(TABLE).log().numpy()

    def student(z, t, w):
        ve = torch.from_numpy(np.exp(np.interp(t.double().numpy(), np.arange(1000), log_table)))
        a, s = (v.reshape(-1, 1, 1, 1) for v in (1 / (1 + ve**2).sqrt(), ve / (1 + ve**2).sqrt()))
        eps = (z - a * x0) / s
        a0, s0 = TABLE[0].sqrt(), (1 - TABLE[0]).sqrt()
        c_skip, c_out = (v.reshape(-1, 1, 1, 1) for v in boundary_scalings(t.double()))
        safe_c_out = torch.where(c_out > 0, c_out, torch.ones_like(c_out))
        pred_x0 = (a0 * x0 + s0 * eps - c_skip * z) / safe_c_out  # so that c_skip z + c_out x0 = the solution
        pred_x0 = pred_x0 + error * t.double().reshape(-1, 1, 1, 1) / 1000  # a wrong student: off by error * t/T
        return {"sample": pred_x0, "epsilon": (z - a * pred_x0) / s}[prediction_type]

    return student


def raises(*args):
    raise AssertionError("consistency training called a teacher / target network")


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
@pytest.mark.parametrize("schedule", ["ict", "ect"])
def test_loss_vanishes_for_the_exact_consistency_function_and_calls_no_teacher(prediction_type, schedule):
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    obj = make_objective(config(ct_schedule=schedule, prediction_type=prediction_type, loss_type="l2"), TABLE)
    assert isinstance(obj, CTObjective) and not obj.guided
    for step in (0, 500):
        exact = ModelFns(exact_point_mass_student(x0, prediction_type), raises, raises)
        out = obj(exact, x0, torch.Generator().manual_seed(step), step)
        assert out.loss.item() < 1e-18, out.loss.item()
        wrong = ModelFns(exact_point_mass_student(x0, prediction_type, 0.05), raises, raises)
        assert obj(wrong, x0, torch.Generator().manual_seed(step), step).loss.item() > 1e-6


def test_loss_is_the_weighted_whole_sample_pseudo_huber():
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    weight = torch.nn.Parameter(torch.tensor(0.3))

    def student(z, t, w):  # a trainable toy: epsilon = weight * z
        return weight * z

    cfg = config()
    out = make_objective(cfg, TABLE)(ModelFns(student, raises, raises), x0, torch.Generator().manual_seed(4), 100)
    p = ct_points(SHAPE[0], TABLE, cfg, 100, torch.Generator().manual_seed(4))  # the same first draw
    c = 0.00054 * math.sqrt(4 * 8 * 8)
    norm = (out.denoised - out.target).flatten(1).norm(dim=1).double()
    expected = (p.weight * (torch.sqrt(norm**2 + c**2) - c)).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    assert weight.grad is not None and weight.grad != 0 and not out.target.requires_grad  # stop-gradient target


def test_target_replays_the_students_dropout_masks():
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    masks = []

    def student(z, t, w):
        out = torch.nn.functional.dropout(z, 0.5, training=True)
        masks.append(out != 0)
        return out

    torch.manual_seed(0)
    make_objective(config(), TABLE)(ModelFns(student, raises, raises), x0, torch.Generator().manual_seed(6), 0)
    after_loss = torch.get_rng_state()
    torch.manual_seed(0)
    torch.nn.functional.dropout(x0, 0.5, training=True)  # one draw: the target's replay left the RNG untouched
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])
    assert torch.equal(after_loss, torch.get_rng_state())


def test_caption_dropout_swaps_in_the_empty_prompt():
    embeds, uncond = torch.randn(3, 5, 2), torch.randn(1, 5, 2)
    out = drop_condition(embeds, uncond, torch.tensor([True, False, True]))
    assert torch.equal(out[0], uncond[0]) and torch.equal(out[1], embeds[1]) and torch.equal(out[2], uncond[0])
    assert config().caption_dropout_p == 0.1 and ObjectiveConfig().caption_dropout_p == 0.0
    assert config(caption_dropout=0.25).caption_dropout_p == 0.25


def test_sampling_contract_has_no_guidance_range():
    contract = make_objective(config(), TABLE).sampling()
    assert (contract.objective, contract.num_inference_steps, contract.timesteps) == ("ct", 2, None)
    assert contract.w_range is None and contract.scheduler["original_inference_steps"] == 50


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ct_s0": 0}, "ct_s0"),
        ({"ct_s0": 20, "ct_s1": 10}, "ct_s0"),
        ({"ct_total_steps": 0}, "ct_total_steps"),
        ({"ct_p_std": 0.0}, "ct_p_std"),
        ({"ct_ect_q": 1.0}, "ct_ect_q"),
        ({"caption_dropout": 1.0}, "caption_dropout"),
        ({"ct_diffusion_weight": -1.0}, "ct_diffusion_weight"),
        ({"ct_schedule": "edm"}, "ct_schedule"),
        ({"objective": "lcm", "loss_type": "cauchy"}, "cauchy"),
    ],
)
def test_bad_ct_settings_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        config(**kwargs)


def test_random_init_needs_full_mode(tiny_sd_dir):
    with pytest.raises(ValueError, match="init 'random' needs --mode full"):
        ModelConfig(pretrained_teacher_model=str(tiny_sd_dir), init="random")
    assert ModelConfig(pretrained_teacher_model=str(tiny_sd_dir), init="random", mode="full").init == "random"


def test_optional_denoising_loss_applies_below_its_noise_level():
    # Dao et al.'s extra diffusion loss: ct_diffusion_weight * ||f(x_hi) - x0||^2 (mean over elements) on the
    # samples with sigma_hi <= ct_diffusion_max_sigma, added to the per-sample consistency loss.
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))

    def student(z, t, w):
        return 0.5 * z

    fns = ModelFns(student, raises, raises)
    plain = make_objective(config(), TABLE)(fns, x0, torch.Generator().manual_seed(8), 300)
    extra = make_objective(config(ct_diffusion_weight=2.0, ct_diffusion_max_sigma=1.0), TABLE)(
        fns, x0, torch.Generator().manual_seed(8), 300
    )
    p = ct_points(SHAPE[0], TABLE, config(), 300, torch.Generator().manual_seed(8))
    early = (p.sigma_hi <= 1.0).float()
    assert 0 < early.sum() < SHAPE[0]  # the draw has samples on both sides of the threshold
    mse = (plain.denoised - x0).flatten(1).pow(2).mean(1)
    torch.testing.assert_close(extra.loss_per_sample - plain.loss_per_sample, 2.0 * early * mse)
