"""Objectives of lcm_kit.distill on a toy problem whose probability-flow ODE has a closed form.

Data is a point mass: the conditional model's x0 is ``x_c``, the unconditional one's ``x_u``. Then the guided ODE
(LCM convention, w) is the ODE of a point mass at ``x_w = x_c + w (x_c - x_u)``, the teacher's DDIM step is exact,
and the exact jump from ``(z_t, t)`` to any ``s`` is ``alpha_s x_w + sigma_s (z_t - alpha_t x_w) / sigma_t``. A
student that predicts ``x_w`` is that exact jump, so a trajectory loss (pcm, tcd) must be 0 for it, and > 0 for any
other student. Checked in float64 for the three parameterisations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcm_kit.distill.config import ObjectiveConfig
from lcm_kit.distill.networks import ModelFns
from lcm_kit.distill.objectives import LCMObjective, PCMObjective, TCDObjective, make_objective
from lcm_kit.loss import consistency_distillation_loss
from lcm_kit.schedules import alphas_cumprod_from_betas, make_betas, phase_edges, phase_sampling_timesteps
from lcm_kit.solver import solver_points

TABLE = alphas_cumprod_from_betas(make_betas(1000, 0.00085, 0.012, "scaled_linear")).double()
SHAPE = (6, 4, 3, 3)


def model_output(x0, z, t, prediction_type):
    """The raw output a model with clean estimate ``x0`` gives at ``(z, t)`` (inverse of predict_x0_eps)."""
    a, s = (v.reshape(-1, 1, 1, 1) for v in (TABLE[t].sqrt(), (1 - TABLE[t]).sqrt()))
    eps = (z - a * x0) / s
    return {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]


def toy_fns(prediction_type: str, student_error: float = 0.0) -> ModelFns:
    gen = torch.Generator().manual_seed(3)
    x_c, x_u = torch.randn(SHAPE, generator=gen, dtype=torch.float64), torch.randn(SHAPE, generator=gen).double()

    def x_w(w):
        return x_c + w.reshape(-1, 1, 1, 1) * (x_c - x_u)

    def teacher(z, t):
        return model_output(x_c, z, t, prediction_type), model_output(x_u, z, t, prediction_type)

    def student(z, t, w):
        return model_output(x_w(w) + student_error, z, t, prediction_type)

    def target(z, t, w):
        return model_output(x_w(w), z, t, prediction_type)

    return ModelFns(student, teacher, target)


def config(objective: str, prediction_type: str, **kw) -> ObjectiveConfig:
    return ObjectiveConfig(objective=objective, prediction_type=prediction_type, loss_type="l2", w_min=2.0,
                           w_max=6.0, **kw)  # fmt: skip


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("objective, extra", [("pcm", {"num_phases": 4}), ("pcm", {"num_phases": 1}),
                                              ("pcm", {"num_phases": 50}), ("tcd", {})])  # fmt: skip
def test_trajectory_losses_vanish_exactly_for_the_exact_jump(objective, extra, prediction_type):
    cfg = config(objective, prediction_type, **extra)
    obj = make_objective(cfg, TABLE)
    x0 = torch.zeros(SHAPE, dtype=torch.float64)  # only z and the models matter; the data is the point mass
    for seed in range(3):
        exact = obj(toy_fns(prediction_type), x0, torch.Generator().manual_seed(seed))
        assert exact.loss.item() < 1e-20, (seed, exact.loss.item())
        wrong = obj(toy_fns(prediction_type, student_error=0.05), x0, torch.Generator().manual_seed(seed))
        assert wrong.loss.item() > 1e-6
    assert set(exact.t_end.tolist()) - {0}  # the draws did reach inner grid points


def test_pcm_maps_each_grid_index_to_its_phase_edge():
    # Hand-checked: 50 grid points [19, 39, ..., 999], 4 phases start at indices floor([0, 12.5, 25, 37.5]) =
    # [0, 12, 25, 37]; each phase's edge is the grid point below its first index: [0, grid[11], grid[24], grid[36]].
    first, edges = phase_edges(1000, 50, 4)
    assert first.tolist() == [0, 12, 25, 37] and edges.tolist() == [0, 239, 499, 739]
    assert phase_sampling_timesteps(1000, 50, 4).tolist() == [999, 739, 499, 239]
    assert phase_edges(1000, 50, 2)[1].tolist() == [0, 499] and phase_sampling_timesteps(1000, 50, 1).tolist() == [999]
    obj = PCMObjective(config("pcm", "epsilon"), TABLE)
    index = torch.tensor([0, 11, 12, 24, 25, 36, 37, 49])
    p = solver_points(torch.zeros(8, 1, 1, 1), TABLE.float(), obj.config, index=index)
    assert obj.edge_of(p).tolist() == [0, 0, 239, 239, 499, 499, 739, 739]
    sampling = obj.sampling()
    assert sampling.timesteps == (999, 739, 499, 239) and sampling.scheduler["gamma"] == 0.0


def test_tcd_jump_ends_are_grid_points_at_or_below_t_end():
    obj = TCDObjective(config("tcd", "epsilon"), TABLE)
    index = torch.arange(50).repeat(40)
    p = solver_points(torch.zeros(len(index), 1, 1, 1), TABLE.float(), obj.config, index=index)
    ends = obj.draw_end(p, torch.Generator().manual_seed(0))
    grid_prev = set([0] + list(range(19, 980, 20)))
    assert set(ends.tolist()) <= grid_prev and (ends <= p.t_end).all()
    assert (ends == p.t_end).any() and (ends == 0).sum() > 40  # both extremes are drawn
    again = obj.draw_end(p, torch.Generator().manual_seed(0))
    assert torch.equal(ends, again)


def test_lcm_objective_is_the_lcm_loss():
    cfg = config("lcm", "epsilon")
    fns = toy_fns("epsilon", 0.1)
    x0 = torch.randn(SHAPE, dtype=torch.float64)
    ours = LCMObjective(cfg, TABLE)(fns, x0, torch.Generator().manual_seed(1))
    ref = consistency_distillation_loss(*fns, x0, TABLE, cfg, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours.loss, ref.loss) and LCMObjective(cfg, TABLE).sampling().timesteps is None


@pytest.mark.parametrize("bad", [0, -1, 51, 2.5, True])
def test_bad_num_phases_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="num_phases"):
        ObjectiveConfig(objective="pcm", num_phases=bad)
    with pytest.raises(ValueError, match="num_phases"):
        phase_edges(1000, 50, bad)
    assert np.array_equal(phase_edges(1000, 50, 50)[1][:3], [0, 19, 39])


def test_sampling_gamma_overrides_the_objectives_default():
    assert LCMObjective(config("lcm", "epsilon"), TABLE).sampling().scheduler["gamma"] is None
    assert LCMObjective(config("lcm", "epsilon", sampling_gamma=0.3), TABLE).sampling().scheduler["gamma"] == 0.3
    assert TCDObjective(config("tcd", "epsilon"), TABLE).sampling().scheduler["gamma"] == 0.3
    assert PCMObjective(config("pcm", "epsilon", sampling_gamma=0.1), TABLE).sampling().scheduler["gamma"] == 0.1
    with pytest.raises(ValueError, match="sampling_gamma"):
        config("lcm", "epsilon", sampling_gamma=1.5)
