"""Training objectives: what one micro-batch's loss is, and how the trained student must then be sampled.

An objective is any callable with the :class:`Objective` protocol: it receives the networks as plain functions
(:class:`lcm_kit.distill.networks.ModelFns`: student, teacher, target), the clean latents and a generator, and
returns an output with a scalar ``loss``. The formulas come from :mod:`lcm_kit.functional` through
:mod:`lcm_kit.loss`; an objective only decides which of them to combine. A new objective is one class here plus
one entry in :data:`OBJECTIVES` and the ``objective`` choices of :class:`lcm_kit.distill.config.ObjectiveConfig`.

* ``lcm`` -- latent consistency distillation (LCM, arXiv 2310.04378, Algorithm 1 / Eq. 10 with the guided DDIM
  solver of Eq. 8), :func:`lcm_kit.loss.consistency_distillation_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..loss import DistillLossOutput, consistency_distillation_loss
from .config import ObjectiveConfig
from .networks import ModelFns


class Objective(Protocol):
    """The loss of one micro-batch, and the sampler settings the trained student needs."""

    config: ObjectiveConfig

    def __call__(self, fns: ModelFns, latents: torch.Tensor, generator: torch.Generator) -> DistillLossOutput:
        """``latents (B,C,H,W)`` (times the VAE scaling factor) -> an output whose ``loss`` is a scalar."""
        ...

    def scheduler_overrides(self) -> dict[str, Any]:
        """``LCMKitScheduler`` config values the student must be sampled with (over the teacher's schedule)."""
        ...


@dataclass(frozen=True)
class LCMObjective:
    """Latent consistency distillation (LCM Algorithm 1): the student at ``t_{n+k}`` matches the target at the
    teacher's guided DDIM step ``t_n`` on the skipping-step grid of ``num_ddim_timesteps`` points."""

    config: ObjectiveConfig
    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) of the teacher

    def __call__(self, fns: ModelFns, latents: torch.Tensor, generator: torch.Generator) -> DistillLossOutput:
        return consistency_distillation_loss(
            fns.student, fns.teacher, fns.target, latents, self.alphas_cumprod, self.config, generator=generator
        )

    def scheduler_overrides(self) -> dict[str, Any]:
        """The grid and boundary scalings the student learned (LCM Sec. 4.3 and Eq. 9)."""
        c = self.config
        return {
            "original_inference_steps": c.num_ddim_timesteps,
            "timestep_scaling": c.timestep_scaling,
            "sigma_data": c.sigma_data,
            "prediction_type": c.prediction_type,
        }


OBJECTIVES: dict[str, type] = {"lcm": LCMObjective}


def make_objective(config: ObjectiveConfig, alphas_cumprod: torch.Tensor) -> Objective:
    """The objective named by ``config.objective`` over the teacher's noise table."""
    if config.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {config.objective!r}")
    return OBJECTIVES[config.objective](config, alphas_cumprod)
