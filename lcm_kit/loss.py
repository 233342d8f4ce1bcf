"""Latent consistency distillation loss (LCM paper, Luo et al. 2023, arXiv:2310.04378, Algorithm 1).

The student, the teacher and the target network are plain callables, so the loss is testable with toy functions and
the training script decides what they are (for LCM-LoRA: one UNet, the teacher inside :func:`lcm_kit.lora.teacher_mode`
and the target the student itself without gradients, as in diffusers' LCM-LoRA scripts).

Every formula comes from :mod:`lcm_kit.functional` / :mod:`lcm_kit.schedules`; nothing is re-implemented here.

Guidance convention: ``w`` is LCM's (Eq. 8), ``eps = eps_c + w * (eps_c - eps_u)``, i.e. ``guidance_scale - 1`` in the
Imagen / diffusers convention. diffusers' LCM scripts sample ``w ~ U[5, 15]`` and apply it exactly this way in their
code (their ``--w_min`` help text claims the Imagen convention; the code does not do that).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from .functional import PREDICTION_TYPES, boundary_scalings, consistency_output, predict_x0_eps
from .solver import SolverPoints, TeacherFn, guided_solver_step, solver_points, solver_timesteps

__all__ = [
    "DistillLossConfig",
    "DistillLossOutput",
    "SolverPoints",
    "consistency_distillation_loss",
    "distillation_distance",
    "guided_solver_step",
    "solver_points",
    "solver_timesteps",
]

StudentFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TargetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

LOSS_TYPES = ("huber", "l2")


@dataclass(frozen=True)
class DistillLossConfig:
    """Hyper-parameters of latent consistency distillation (LCM Algorithm 1)."""

    LOSS_TYPES: ClassVar[tuple[str, ...]] = LOSS_TYPES  # the loss_type values a config of this class accepts
    num_ddim_timesteps: int = field(
        default=50,
        metadata={
            "help": "Points N of the skipping-step DDIM solver grid (k = num_train_timesteps // N, LCM Sec. 4.3); "
            "must be in [1, num_train_timesteps]."
        },
    )
    w_min: float = field(
        default=5.0,
        metadata={
            "help": "Lower bound of the guidance w ~ U[w_min, w_max], LCM convention cond + w * (cond - uncond) "
            "(= guidance_scale - 1). 5 as diffusers' LCM(-LoRA) scripts (their code applies it in this convention)."
        },
    )
    w_max: float = field(default=15.0, metadata={"help": "Upper bound of the guidance w, LCM convention (see w_min)."})
    loss_type: Literal["huber", "l2"] = field(
        default="huber",
        metadata={
            "help": "'huber': pseudo-Huber sqrt(d^2 + c^2) - c per element (CM / iCT); 'l2': mean squared error."
        },
    )
    huber_c: float = field(
        default=0.001,
        metadata={"help": "c of the pseudo-Huber loss (> 0). Small c makes it close to L1 per latent element."},
    )
    timestep_scaling: float = field(
        default=10.0, metadata={"help": "s = timestep_scaling * t in the boundary scalings c_skip, c_out (LCM Eq. 9)."}
    )
    sigma_data: float = field(
        default=0.5, metadata={"help": "sigma_data of the boundary scalings c_skip, c_out (LCM Eq. 9)."}
    )
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = field(
        default="epsilon",
        metadata={"help": "Parameterisation of teacher, student and target outputs (the teacher scheduler's)."},
    )

    def __post_init__(self):
        if isinstance(self.num_ddim_timesteps, bool) or not isinstance(self.num_ddim_timesteps, numbers.Integral):
            raise ValueError(f"num_ddim_timesteps must be an int, got {self.num_ddim_timesteps!r}")
        if self.num_ddim_timesteps < 1:
            raise ValueError(f"num_ddim_timesteps must be an int >= 1, got {self.num_ddim_timesteps!r}")
        # w_min None: the distiller's per-teacher default (lcm_kit.distill.config), resolved before any use
        if self.w_min is not None and self.w_min < 0:
            raise ValueError(f"w_min must be >= 0 (LCM convention, w = guidance_scale - 1), got {self.w_min}")
        if self.w_min is not None and self.w_min > self.w_max:
            raise ValueError(f"w_min ({self.w_min}) must be <= w_max ({self.w_max})")
        if self.loss_type not in self.LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {self.LOSS_TYPES}, got {self.loss_type!r}")
        if not self.huber_c > 0:
            raise ValueError(f"huber_c must be > 0, got {self.huber_c}")
        if not self.timestep_scaling > 0:
            raise ValueError(f"timestep_scaling must be > 0, got {self.timestep_scaling}")
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")


@dataclass
class DistillLossOutput:
    """What :func:`consistency_distillation_loss` computed.

    Attributes:
        loss: Scalar loss; differentiable w.r.t. the student only.
        t_start: ``(B,)`` long, the noisier timesteps ``t_{n+k}`` the student saw.
        t_end: ``(B,)`` long, the timesteps ``t_n`` of the teacher's DDIM step and of the target.
        w: ``(B,)`` guidance strengths (LCM convention).
        index: ``(B,)`` long, indices into the solver grid (``t_start = grid[index]``).
        loss_per_sample: ``(B,)`` detached mean distance per example (e.g. to log the loss by timestep).
        denoised: ``(B, C, H, W)`` detached student consistency output ``f_theta(z_{t_{n+k}}, w, c, t_{n+k})``.
        target: ``(B, C, H, W)`` target consistency output ``f_theta-(z_hat_{t_n}, w, c, t_n)`` (no grad).
    """

    loss: torch.Tensor
    t_start: torch.Tensor
    t_end: torch.Tensor
    w: torch.Tensor
    index: torch.Tensor
    loss_per_sample: torch.Tensor
    denoised: torch.Tensor
    target: torch.Tensor


def distillation_distance(a: torch.Tensor, b: torch.Tensor, loss_type: str = "huber", huber_c: float = 0.001):
    """Element-wise distance ``d(a, b)`` of LCM Eq. 10: pseudo-Huber ``sqrt((a-b)^2 + c^2) - c`` or ``(a-b)^2``.

    The pseudo-Huber form is from Song et al. 2023 (improved consistency training, Sec. 3.3). Computed in at least
    float32.
    """
    diff = a - b
    if diff.dtype in (torch.float16, torch.bfloat16):
        diff = diff.float()
    if loss_type == "huber":
        return torch.sqrt(diff**2 + huber_c**2) - huber_c
    if loss_type == "l2":
        return diff**2
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def consistency_distillation_loss(
    student: StudentFn,
    teacher: TeacherFn,
    target: TargetFn,
    latents: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    config: DistillLossConfig,
    *,
    noise: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> DistillLossOutput:
    """One latent consistency distillation loss (LCM Algorithm 1, Eq. 10 with the guided DDIM solver of Eq. 8).

    ``z = alpha(t_{n+k}) x0 + sigma(t_{n+k}) eps``; the teacher's guided DDIM step gives
    ``z_hat_{t_n} = alpha(t_n) x0_w + sigma(t_n) eps_w`` with ``x0_w, eps_w`` the LCM-convention CFG combinations
    of the conditional and unconditional ``pred_x0`` / ``pred_eps`` (converted for ``config.prediction_type``, so
    v-prediction teachers are handled); the loss is ``d(f_theta(z, w, t_{n+k}), f_theta-(z_hat_{t_n}, w, t_n))``.

    Args:
        student: ``(z (B,C,H,W), t_start (B,) long, w (B,)) -> (B,C,H,W)`` raw conditional model output.
        teacher: ``(z, t_start) -> (cond, uncond)`` raw outputs, each ``(B,C,H,W)``; called under ``no_grad``.
        target: ``(z_hat (B,C,H,W), t_end (B,) long, w (B,)) -> (B,C,H,W)`` raw output; called under ``no_grad``.
        latents: Clean latents ``x0``, ``(B,C,H,W)``, already times the VAE scaling factor.
        alphas_cumprod: ``(num_train_timesteps,)`` of the teacher's noise schedule.
        config: Loss hyper-parameters.
        noise: Override of the ``eps ~ N(0, I)`` draw, ``(B,C,H,W)``.
        index: Override of the grid-index draw, ``(B,)`` long in ``[0, num_ddim_timesteps)``.
        w: Override of the guidance draw, ``(B,)``.
        generator: Source of the random draws (order: index, w, noise), for reproducibility.

    Returns:
        A :class:`DistillLossOutput`. The math runs in float32 (or float64 for float64 inputs); model outputs are
        cast to that dtype, so the callables may run the UNet in half precision.
    """
    p = solver_points(latents, alphas_cumprod, config, noise=noise, index=index, w=w, generator=generator)
    a_start, s_start = p.alpha_sigma(p.t_start)  # (B,)
    a_end, s_end = p.alpha_sigma(p.t_end)  # (B,)
    z = p.z

    scalings = dict(sigma_data=config.sigma_data, timestep_scaling=config.timestep_scaling)
    pred_x0, _ = predict_x0_eps(student(z, p.t_start, p.w).to(p.dtype), z, a_start, s_start, config.prediction_type)
    denoised = consistency_output(z, pred_x0, *boundary_scalings(p.t_start.to(p.dtype), **scalings))  # LCM Eq. 9

    with torch.no_grad():
        z_prev = guided_solver_step(teacher, p, config.prediction_type)
        target_x0, _ = predict_x0_eps(target(z_prev, p.t_end, p.w).to(p.dtype), z_prev, a_end, s_end,
                                      config.prediction_type)  # fmt: skip
        target_denoised = consistency_output(z_prev, target_x0, *boundary_scalings(p.t_end.to(p.dtype), **scalings))

    dist = distillation_distance(denoised, target_denoised, config.loss_type, config.huber_c)  # (B, C, H, W)
    return DistillLossOutput(
        loss=dist.mean(),
        t_start=p.t_start,
        t_end=p.t_end,
        w=p.w,
        index=p.index,
        loss_per_sample=dist.detach().flatten(1).mean(1),
        denoised=denoised.detach(),
        target=target_denoised,
    )
