"""Tests of lcm_kit.loss: gradients, no_grad of teacher/target, distances, sampling, and parity with diffusers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler

from lcm_kit.loss import (
    DistillLossConfig,
    consistency_distillation_loss,
    distillation_distance,
    solver_timesteps,
)
from lcm_kit.testing import SD15_SCHEDULER_CONFIG

SCHEDULE = {k: SD15_SCHEDULER_CONFIG[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")}


def _ddim(prediction_type: str = "epsilon", num_ddim_timesteps: int = 50, dtype=torch.float32) -> DDIMScheduler:
    """diffusers' DDIM, SD1.5 table; ``set_alpha_to_one=False``: a step from t=k-1 lands on alphas_cumprod[0]."""
    sched = DDIMScheduler(
        **SCHEDULE, set_alpha_to_one=False, clip_sample=False, prediction_type=prediction_type, steps_offset=0
    )
    sched.set_timesteps(num_ddim_timesteps)  # only num_inference_steps matters to step(): prev = t - 1000 // 50
    sched.alphas_cumprod = sched.alphas_cumprod.to(dtype)
    sched.final_alpha_cumprod = sched.final_alpha_cumprod.to(dtype)
    return sched


class Toys:
    """A student / target conv net and a frozen two-headed teacher, recording whether grad mode was on."""

    def __init__(self, seed: int = 0, dtype=torch.float32):
        torch.manual_seed(seed)
        self.student_net = torch.nn.Conv2d(4, 4, 3, padding=1, dtype=dtype)
        self.target_net = torch.nn.Conv2d(4, 4, 3, padding=1, dtype=dtype)
        self.teacher_net = torch.nn.Conv2d(4, 8, 3, padding=1, dtype=dtype)
        self.grad_modes: dict[str, list[bool]] = {"student": [], "teacher": [], "target": []}

    def student(self, z, t, w):
        self.grad_modes["student"].append(torch.is_grad_enabled())
        return self.student_net(z) * (1 + 0.01 * w[:, None, None, None]) + 1e-4 * t[:, None, None, None]

    def teacher(self, z, t):
        self.grad_modes["teacher"].append(torch.is_grad_enabled())
        cond, uncond = self.teacher_net(z).chunk(2, dim=1)
        return cond, uncond

    def target(self, z, t, w):
        self.grad_modes["target"].append(torch.is_grad_enabled())
        return self.target_net(z) + 1e-4 * t[:, None, None, None]


def _run(toys: Toys, config: DistillLossConfig, batch: int = 3, seed: int = 0, **overrides):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=gen)
    ac = _ddim(config.prediction_type).alphas_cumprod
    return consistency_distillation_loss(
        toys.student, toys.teacher, toys.target, latents, ac, config, generator=gen, **overrides
    )


def test_gradients_reach_only_the_student_and_teacher_target_run_without_grad():
    toys = Toys()
    out = _run(toys, DistillLossConfig())
    out.loss.backward()
    assert out.loss.ndim == 0 and out.loss.requires_grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in toys.student_net.parameters())
    assert all(p.grad is None for p in [*toys.teacher_net.parameters(), *toys.target_net.parameters()])
    assert toys.grad_modes == {"student": [True], "teacher": [False], "target": [False]}
    assert not out.target.requires_grad and not out.denoised.requires_grad


def test_target_may_be_the_student_itself():
    """LCM-LoRA uses the online student as target (no EMA): the target call must add nothing to the gradient."""
    import copy

    shared, frozen = Toys(), Toys()
    frozen.target_net = copy.deepcopy(shared.student_net).requires_grad_(False)
    shared.target = lambda z, t, w: (
        shared.student_net(z) * (1 + 0.01 * w[:, None, None, None]) + 1e-4 * t[:, None, None, None]
    )
    frozen.target = lambda z, t, w: (
        frozen.target_net(z) * (1 + 0.01 * w[:, None, None, None]) + 1e-4 * t[:, None, None, None]
    )
    frozen.student_net.load_state_dict(shared.student_net.state_dict())
    a, b = _run(shared, DistillLossConfig()), _run(frozen, DistillLossConfig())
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    torch.testing.assert_close(shared.student_net.weight.grad, frozen.student_net.weight.grad, rtol=0, atol=0)


def test_distances_closed_form():
    a = torch.tensor([0.0, 3e-3, -2.0])
    b = torch.tensor([0.0, -1e-3, 1.0])
    c = 1e-3
    expected = torch.tensor([0.0, math.sqrt(16e-6 + 1e-6) - 1e-3, math.sqrt(9 + 1e-6) - 1e-3])
    torch.testing.assert_close(distillation_distance(a, b, "huber", c), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(distillation_distance(a, b, "l2"), torch.tensor([0.0, 16e-6, 9.0]))
    # pseudo-Huber: ~ d^2 / (2c) for |d| << c, ~ |d| - c for |d| >> c
    small = distillation_distance(
        torch.tensor([1e-4], dtype=torch.float64), torch.zeros(1, dtype=torch.float64), "huber", 1.0
    )
    torch.testing.assert_close(small, torch.tensor([0.5e-8], dtype=torch.float64), rtol=1e-6, atol=0)
    large = distillation_distance(torch.tensor([100.0]), torch.zeros(1), "huber", 1e-3)
    torch.testing.assert_close(large, torch.tensor([100.0 - 1e-3]), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="l1"):
        distillation_distance(a, b, "l1")


@pytest.mark.parametrize("loss_type", ["huber", "l2"])
def test_loss_is_the_mean_distance_of_denoised_and_target(loss_type):
    config = DistillLossConfig(loss_type=loss_type, huber_c=0.05)
    out = _run(Toys(), config)
    d = out.denoised - out.target
    expected = (torch.sqrt(d**2 + 0.05**2) - 0.05).mean() if loss_type == "huber" else (d**2).mean()
    torch.testing.assert_close(out.loss.detach(), expected)
    torch.testing.assert_close(out.loss_per_sample.mean(), expected)


def test_w_and_timesteps_are_drawn_in_range_and_on_the_grid():
    config = DistillLossConfig(w_min=2.0, w_max=4.0, num_ddim_timesteps=10)
    out = _run(Toys(), config, batch=64)
    assert out.w.shape == (64,) and out.w.min() >= 2.0 and out.w.max() <= 4.0 and out.w.std() > 0.3
    assert out.t_start.dtype == torch.long and set(out.t_start.tolist()) <= set(range(99, 1000, 100))
    torch.testing.assert_close(out.t_end, torch.clamp(out.t_start - 100, min=0))
    fixed = _run(Toys(), DistillLossConfig(w_min=7.0, w_max=7.0), batch=4)
    assert fixed.w.tolist() == [7.0] * 4


def test_reproducible_with_a_generator():
    a, b = _run(Toys(), DistillLossConfig(), seed=3), _run(Toys(), DistillLossConfig(), seed=3)
    c = _run(Toys(), DistillLossConfig(), seed=4)
    for name in ("t_start", "w", "loss"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    assert not torch.equal(a.w, c.w)


def test_first_grid_point_steps_to_t0_and_the_target_is_the_boundary():
    t_start, t_end = solver_timesteps(torch.tensor([0, 1, 49]), 1000, 50)
    assert t_start.tolist() == [19, 39, 999] and t_end.tolist() == [0, 19, 979]
    out = _run(Toys(), DistillLossConfig(), batch=2, index=torch.tensor([0, 0]))
    assert out.t_end.tolist() == [0, 0]
    # f(z, 0) = z: c_skip(0) = 1, c_out(0) = 0, so the target is the teacher's DDIM sample itself.
    noise, latents = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    toys = Toys()
    sched = _ddim()
    out = consistency_distillation_loss(
        toys.student, toys.teacher, toys.target, latents, sched.alphas_cumprod, DistillLossConfig(),
        noise=noise, index=torch.tensor([0, 0]), w=torch.tensor([3.0, 3.0]),
    )  # fmt: skip
    z = sched.add_noise(latents, noise, torch.tensor([19, 19]))
    cond, uncond = toys.teacher(z, None)
    guided = cond + 3.0 * (cond - uncond)
    z_prev = torch.stack([sched.step(guided[i : i + 1], 19, z[i : i + 1], eta=0.0).prev_sample[0] for i in range(2)])
    torch.testing.assert_close(out.target, z_prev, rtol=1e-5, atol=1e-6)


def _oracle(toys: Toys, prediction_type: str, latents, noise, index, w):
    """The same quantities computed independently with diffusers' DDIMScheduler.step and LCMScheduler's scalings."""
    ddim, lcm = _ddim(prediction_type, dtype=latents.dtype), LCMScheduler(**SCHEDULE, timestep_scaling=10.0)
    t_start = (index + 1) * 20 - 1
    t_end = torch.clamp(t_start - 20, min=0)
    z = ddim.add_noise(latents, noise, t_start)
    student_out, denoised, targets = toys.student(z, t_start, w), [], []
    cond, uncond = toys.teacher(z, t_start)
    guided = cond + w[:, None, None, None] * (cond - uncond)  # CFG on raw outputs = CFG on (x0, eps): affine maps
    for i in range(len(index)):
        ts, te = int(t_start[i]), int(t_end[i])
        x0_student = ddim.step(student_out[i : i + 1], ts, z[i : i + 1], eta=0.0).pred_original_sample
        c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(ts)
        denoised.append(c_skip * z[i : i + 1] + c_out * x0_student)
        z_prev = ddim.step(guided[i : i + 1], ts, z[i : i + 1], eta=0.0).prev_sample
        target_out = toys.target(z_prev, t_end[i : i + 1], w[i : i + 1])
        x0_target = ddim.step(target_out, te, z_prev, eta=0.0).pred_original_sample
        c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(te)
        targets.append(c_skip * z_prev + c_out * x0_target)
    return torch.cat(denoised), torch.cat(targets)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_matches_diffusers_ddim_step_and_lcm_scalings(prediction_type):
    # float64 end to end, so that the 1/alpha(999) ~ 15x and w = 15 amplification of float32 rounding (up to ~6e-5
    # at t=999) does not hide a real mismatch; diffusers' tables are cast to float64 as well.
    f64 = torch.float64
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=gen, dtype=f64)
    noise = torch.randn(4, 4, 8, 8, generator=gen, dtype=f64)
    index, w = torch.tensor([0, 1, 20, 49]), torch.tensor([5.0, 7.5, 10.0, 15.0], dtype=f64)
    config = DistillLossConfig(prediction_type=prediction_type)
    toys = Toys(dtype=f64)
    out = consistency_distillation_loss(
        toys.student, toys.teacher, toys.target, latents, _ddim(prediction_type, dtype=f64).alphas_cumprod, config,
        noise=noise, index=index, w=w,
    )  # fmt: skip
    with torch.no_grad():
        denoised, target = _oracle(toys, prediction_type, latents, noise, index, w)
    torch.testing.assert_close(out.denoised, denoised, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.target, target, rtol=1e-9, atol=1e-9)
    expected = (torch.sqrt((denoised - target) ** 2 + 1e-6) - 1e-3).mean()
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_v_prediction_teacher_is_not_treated_as_epsilon():
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    kwargs = dict(noise=noise, index=torch.tensor([10, 30]), w=torch.tensor([5.0, 5.0]))
    toys = Toys()
    ac = _ddim().alphas_cumprod
    v = consistency_distillation_loss(
        toys.student,
        toys.teacher,
        toys.target,
        latents,
        ac,
        DistillLossConfig(prediction_type="v_prediction"),
        **kwargs,
    )
    eps = consistency_distillation_loss(
        toys.student, toys.teacher, toys.target, latents, ac, DistillLossConfig(), **kwargs
    )
    assert (v.target - eps.target).abs().max() > 1e-2


def test_half_precision_model_outputs():
    toys = Toys()
    student, teacher = toys.student, toys.teacher
    out = _run(toys, DistillLossConfig(), batch=2)
    toys.student = lambda z, t, w: student(z, t, w).bfloat16()
    toys.teacher = lambda z, t: tuple(x.bfloat16() for x in teacher(z, t))
    half = _run(toys, DistillLossConfig(), batch=2)
    assert half.loss.dtype == torch.float32 and torch.isfinite(half.loss)
    torch.testing.assert_close(half.loss, out.loss, rtol=0.05, atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(w_min=10.0, w_max=5.0), "w_min"),
        (dict(w_min=-1.0), "w_min"),
        (dict(num_ddim_timesteps=0), "num_ddim_timesteps"),
        (dict(num_ddim_timesteps=2.5), "num_ddim_timesteps"),
        (dict(huber_c=0.0), "huber_c"),
        (dict(huber_c=-1e-3), "huber_c"),
        (dict(loss_type="l1"), "loss_type"),
        (dict(prediction_type="flow"), "prediction_type"),
        (dict(timestep_scaling=0.0), "timestep_scaling"),
        (dict(sigma_data=-0.5), "sigma_data"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillLossConfig(**kwargs)


def test_config_has_help_and_is_frozen():
    import dataclasses

    config = DistillLossConfig()
    assert all(f.metadata.get("help") for f in dataclasses.fields(config))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.w_min = 1.0  # type: ignore[misc]


def test_bad_inputs_to_the_loss():
    with pytest.raises(ValueError, match="num_ddim_timesteps"):
        _run(Toys(), DistillLossConfig(num_ddim_timesteps=1001))
    with pytest.raises(ValueError, match="index"):
        _run(Toys(), DistillLossConfig(), index=torch.tensor([0, 1, 50]))
    with pytest.raises(ValueError, match="shape"):
        _run(Toys(), DistillLossConfig(), w=torch.ones(2))
