"""Training objectives: what one micro-batch's loss is, and how the trained student must then be sampled.

An objective is any callable with the :class:`Objective` protocol: it receives the networks as plain functions
(:class:`lcm_kit.distill.networks.ModelFns`: student, teacher, target), the clean latents and a generator, and
returns an output with a scalar ``loss``; :meth:`Objective.sampling` says how its student samples (its
:class:`lcm_kit.contract.SamplingContract`). The formulas
come from :mod:`lcm_kit.functional` through :mod:`lcm_kit.solver` / :mod:`lcm_kit.loss`; an objective only
decides which of them to combine. A new objective is one class here, one entry in :data:`OBJECTIVES` and one
choice of ``--objective`` (:class:`lcm_kit.distill.config.ObjectiveConfig`).

``ct`` is the odd one out: consistency training from data alone (:mod:`lcm_kit.consistency_training`), no teacher
UNet and no guidance ``w`` (its student is a plain UNet that learns the unconditional model by caption dropout).

``lcm``, ``pcm`` and ``tcd`` share the teacher side (LCM Algorithm 1): ``z = z_{t_{n+k}}`` on the skipping-step
grid and the teacher's guided DDIM step to ``z_hat_{t_n}``. They differ in where the student's output lands:

* ``lcm`` -- at 0, through the boundary scalings ``c_skip z + c_out x0`` (LCM arXiv 2310.04378, Eq. 9-10);
* ``pcm`` -- at the lower edge ``s_m`` of the phase holding ``t_{n+k}``, by a DDIM jump with the model's own
  ``x0, eps`` (Phased Consistency Models, arXiv 2405.18407, Sec. 3: phased ODE trajectory, the DDIM-form
  parameterisation of the phase's consistency function, and the phased consistency distillation loss);
* ``tcd`` -- at a random ``s <= t_n`` drawn on the grid, by the same DDIM jump (Trajectory Consistency
  Distillation, arXiv 2402.19159, Sec. 4: the trajectory consistency function ``f(x_t, t, s)`` in its first-order
  semi-linear form, trained for every ``s`` so it can be sampled with strategic stochastic sampling, gamma).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from ..consistency_training import consistency_training_loss
from ..contract import SamplingContract
from ..functional import append_dims, diffuse, predict_x0_eps
from ..loss import DistillLossOutput, consistency_distillation_loss, distillation_distance
from ..schedules import phase_edges, phase_sampling_timesteps
from ..solver import SolverPoints, guided_solver_step, solver_points, solver_timesteps
from .config import ObjectiveConfig
from .networks import ModelFns


class Objective(Protocol):
    """The loss of one micro-batch, and the sampler settings the trained student needs."""

    config: ObjectiveConfig
    guided: ClassVar[bool]  # the student learns the teacher's guided ODE at a drawn w (full mode: a w-embedding)

    def __call__(self, fns: ModelFns, latents: torch.Tensor, generator: torch.Generator,
                 step: int = 0) -> DistillLossOutput:  # fmt: skip
        """``latents (B,C,H,W)`` (times the VAE scaling factor) at global optimizer step ``step`` -> an output whose
        ``loss`` is a scalar."""
        ...

    def sampling(self) -> SamplingContract:
        """The sampling contract of the trained student (:mod:`lcm_kit.contract`)."""
        ...


def _contract(objective: str, steps: int, timesteps: tuple[int, ...] | None, c: ObjectiveConfig,
              gamma: float | None, guided: bool = True) -> SamplingContract:  # fmt: skip
    """The contract: the grid and boundary scalings the student learned (LCM Sec. 4.3 and Eq. 9), TCD's ``gamma``
    (the objective's default ``gamma``, or ``--sampling_gamma``) and the guidance range it was distilled for (none
    for an objective that is not ``guided``)."""
    gamma = gamma if c.sampling_gamma is None else c.sampling_gamma  # --sampling_gamma overrides the default
    scheduler = {"original_inference_steps": c.num_ddim_timesteps, "timestep_scaling": c.timestep_scaling,
                 "sigma_data": c.sigma_data, "prediction_type": c.prediction_type, "gamma": gamma}  # fmt: skip
    return SamplingContract(objective, steps, timesteps, scheduler, (c.w_min, c.w_max) if guided else None)


@dataclass(frozen=True)
class LCMObjective:
    """Latent consistency distillation (LCM Algorithm 1): the student at ``t_{n+k}`` matches the target at the
    teacher's guided DDIM step ``t_n``, both mapped to 0 by the boundary-scaled consistency function."""

    config: ObjectiveConfig
    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) of the teacher
    guided: ClassVar[bool] = True

    def __call__(self, fns: ModelFns, latents: torch.Tensor, generator: torch.Generator,
                 step: int = 0) -> DistillLossOutput:  # fmt: skip
        return consistency_distillation_loss(
            fns.student, fns.teacher, fns.target, latents, self.alphas_cumprod, self.config, generator=generator
        )

    def sampling(self) -> SamplingContract:
        return _contract("lcm", 4, None, self.config, None)


def jump_distillation_loss(fns: ModelFns, latents: torch.Tensor, alphas_cumprod: torch.Tensor,
                           config: ObjectiveConfig, jump_to: Callable[[SolverPoints], torch.Tensor],
                           generator: torch.Generator | None = None) -> DistillLossOutput:  # fmt: skip
    """Consistency distillation onto a point ``s = jump_to(points) <= t_n`` of the trajectory (PCM / TCD).

    The student's DDIM jump ``alpha(s) x0_theta + sigma(s) eps_theta`` from ``z_{t_{n+k}}`` must match the target
    network's jump from the teacher's ``z_hat_{t_n}`` to the same ``s``; where ``s = t_n`` the target is
    ``z_hat_{t_n}`` itself (the jump is the identity there; PCM's ``c_skip = 1`` case). Draws: index, w, noise
    (:func:`lcm_kit.solver.solver_points`), then whatever ``jump_to`` draws.
    """
    p = solver_points(latents, alphas_cumprod, config, generator=generator)
    t_jump = jump_to(p)  # (B,) long, <= t_end
    pt = config.prediction_type
    a_start, s_start = p.alpha_sigma(p.t_start)
    a_end, s_end = p.alpha_sigma(p.t_end)
    a_jump, s_jump = p.alpha_sigma(t_jump)
    x0, eps = predict_x0_eps(fns.student(p.z, p.t_start, p.w).to(p.dtype), p.z, a_start, s_start, pt)
    jumped = diffuse(x0, eps, a_jump, s_jump)  # DDIM jump t_{n+k} -> s
    with torch.no_grad():
        z_prev = guided_solver_step(fns.teacher, p, pt)
        t_x0, t_eps = predict_x0_eps(fns.target(z_prev, p.t_end, p.w).to(p.dtype), z_prev, a_end, s_end, pt)
        at_edge = append_dims(p.t_end == t_jump, z_prev.ndim)
        target = torch.where(at_edge, z_prev, diffuse(t_x0, t_eps, a_jump, s_jump))
    dist = distillation_distance(jumped, target, config.loss_type, config.huber_c)  # (B, C, H, W)
    return DistillLossOutput(dist.mean(), p.t_start, p.t_end, p.w, p.index, dist.detach().flatten(1).mean(1),
                             jumped.detach(), target)  # fmt: skip


@dataclass(frozen=True)
class PCMObjective:
    """Phased consistency distillation: ``s`` is the lower edge of the phase holding ``t_{n+k}``
    (:func:`lcm_kit.schedules.phase_edges`); sampled deterministically (``gamma = 0``) on the phase edges."""

    config: ObjectiveConfig
    alphas_cumprod: torch.Tensor
    guided: ClassVar[bool] = True

    def edge_of(self, p: SolverPoints) -> torch.Tensor:
        """``(B,)`` long: the phase edge below each grid index ``p.index``."""
        first, edges = phase_edges(len(self.alphas_cumprod), self.config.num_ddim_timesteps, self.config.num_phases)
        first, edges = torch.from_numpy(first).to(p.index.device), torch.from_numpy(edges).to(p.index.device)
        phase = torch.searchsorted(first, p.index, right=True) - 1  # last phase whose first index <= index
        return edges[phase]

    def __call__(self, fns: ModelFns, latents: torch.Tensor, generator: torch.Generator,
                 step: int = 0) -> DistillLossOutput:  # fmt: skip
        return jump_distillation_loss(fns, latents, self.alphas_cumprod, self.config, self.edge_of, generator)

    def sampling(self) -> SamplingContract:
        c = self.config
        ts = phase_sampling_timesteps(len(self.alphas_cumprod), c.num_ddim_timesteps, c.num_phases)
        return _contract("pcm", c.num_phases, tuple(int(t) for t in ts), c, 0.0)


@dataclass(frozen=True)
class TCDObjective:
    """Trajectory consistency distillation: ``s`` = the solver step end of grid index ``j ~ U{0, ..., n}`` (any grid
    point at or below ``t_n``, 0 included); sampled with TCD's strategic stochastic sampling (``gamma``, default
    0.3)."""

    config: ObjectiveConfig
    alphas_cumprod: torch.Tensor
    gamma: float = 0.3  # TCD's default eta
    guided: ClassVar[bool] = True

    def draw_end(self, p: SolverPoints, generator: torch.Generator | None) -> torch.Tensor:
        """``(B,)`` long jump ends, drawn after the index / w / noise draws of ``p``."""
        gen_device = generator.device if generator is not None else p.index.device
        u = torch.rand(p.index.shape, generator=generator, device=gen_device, dtype=torch.float64).to(p.index.device)
        j = torch.minimum((u * (p.index + 1)).long(), p.index)  # uniform on {0, ..., index}
        return solver_timesteps(j, len(self.alphas_cumprod), self.config.num_ddim_timesteps)[1]  # the step end of j

    def __call__(self, fns: ModelFns, latents: torch.Tensor, generator: torch.Generator,
                 step: int = 0) -> DistillLossOutput:  # fmt: skip
        return jump_distillation_loss(fns, latents, self.alphas_cumprod, self.config,
                                      lambda p: self.draw_end(p, generator), generator)  # fmt: skip

    def sampling(self) -> SamplingContract:
        return _contract("tcd", 4, None, self.config, self.gamma)


@dataclass(frozen=True)
class CTObjective:
    """Consistency training, iCT / ECT in SD latent space (:mod:`lcm_kit.consistency_training`): the target is the
    student itself under ``no_grad``; ``fns.teacher`` and ``fns.target`` are never called (an EMA of the student,
    if any, is for sampling only). Sampled in 2 steps of the LCM scheduler by default, with CFG (``guidance_scale``)
    available because of caption dropout."""

    config: ObjectiveConfig
    alphas_cumprod: torch.Tensor
    guided: ClassVar[bool] = False

    def __call__(self, fns: ModelFns, latents: torch.Tensor, generator: torch.Generator,
                 step: int = 0) -> DistillLossOutput:  # fmt: skip
        return consistency_training_loss(fns.student, latents, self.alphas_cumprod, self.config, step,
                                         generator=generator)  # fmt: skip

    def sampling(self) -> SamplingContract:
        return _contract("ct", 2, None, self.config, None, guided=False)


OBJECTIVES: dict[str, type] = {"lcm": LCMObjective, "pcm": PCMObjective, "tcd": TCDObjective, "ct": CTObjective}


def make_objective(config: ObjectiveConfig, alphas_cumprod: torch.Tensor) -> Objective:
    """The objective named by ``config.objective`` over the teacher's noise table."""
    if config.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {config.objective!r}")
    return OBJECTIVES[config.objective](config, alphas_cumprod)
