"""The teacher side of consistency distillation (LCM, arXiv:2310.04378, Algorithm 1): the skipping-step pair
``(t_{n+k}, t_n)``, the random draws, the noised latent ``z_{t_{n+k}}`` and the teacher's guided DDIM step.

Shared by every distillation objective (:mod:`lcm_kit.loss` for LCM, :mod:`lcm_kit.distill.objectives` for the
phased and trajectory ones); the formulas are those of :mod:`lcm_kit.functional` / :mod:`lcm_kit.schedules`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .functional import cfg_combine, diffuse, predict_x0_eps
from .schedules import alpha_sigma, skipping_step_timesteps, solver_step_ends

if TYPE_CHECKING:
    from .loss import DistillLossConfig

TeacherFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def solver_timesteps(
    index: torch.Tensor, num_train_timesteps: int, num_ddim_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t_start, t_end) = (grid[index], grid[index - 1])`` on the skipping-step grid (LCM Sec. 4.3).

    ``grid = [k-1, 2k-1, ..., N*k-1]`` with ``k = num_train_timesteps // N``. At ``index = 0`` there is no previous
    grid point; as diffusers' ``DDIMSolver`` (``ddim_alpha_cumprods_prev[0] = alphas_cumprod[0]``, target timestep
    clamped to 0) ``t_end = 0``: the teacher steps to ``alphas_cumprod[0]`` and the target is the boundary
    ``f(z, 0) = z`` (``c_skip(0) = 1, c_out(0) = 0``).

    Args:
        index: ``(B,)`` long grid indices in ``[0, num_ddim_timesteps)``.
        num_train_timesteps: Length of the teacher's ``alphas_cumprod``.
        num_ddim_timesteps: Points ``N`` of the grid.

    Returns:
        ``(t_start, t_end)``, each ``(B,)`` long on ``index.device``.
    """
    grid = torch.from_numpy(skipping_step_timesteps(num_train_timesteps, num_ddim_timesteps)).to(index.device)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_ddim_timesteps):
        raise ValueError(f"index must lie in [0, {num_ddim_timesteps}), got {index.tolist()}")
    prev = torch.from_numpy(solver_step_ends(num_train_timesteps, num_ddim_timesteps)).to(index.device)
    return grid[index], prev[index]


def _draws(
    latents: torch.Tensor,
    config: DistillLossConfig,
    noise: torch.Tensor | None,
    index: torch.Tensor | None,
    w: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draws (in this order) ``index ~ U{0..N-1}``, ``w ~ U[w_min, w_max]``, ``noise ~ N(0, I)`` unless given.

    With a ``generator`` the draws happen on its device and move to ``latents.device`` (a CPU generator gives the same
    batch on any device); without one they use the global RNG of ``latents.device``.
    """
    bsz, device, dtype = latents.shape[0], latents.device, latents.dtype
    gen_device = generator.device if generator is not None else device
    if index is None:
        index = torch.randint(0, config.num_ddim_timesteps, (bsz,), generator=generator, device=gen_device)
    if w is None:
        u = torch.rand((bsz,), generator=generator, device=gen_device, dtype=torch.float32)
        w = config.w_min + (config.w_max - config.w_min) * u
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=torch.float32)
    index, w, noise = index.to(device=device, dtype=torch.long), w.to(device, dtype), noise.to(device, dtype)
    if index.shape != (bsz,) or w.shape != (bsz,) or noise.shape != latents.shape:
        raise ValueError(
            f"expected index and w of shape ({bsz},) and noise of shape {tuple(latents.shape)}, got "
            f"{tuple(index.shape)}, {tuple(w.shape)}, {tuple(noise.shape)}"
        )
    return noise, index, w


@dataclass(frozen=True)
class SolverPoints:
    """One draw of a consistency-distillation pair (LCM Algorithm 1): the clean latents ``x0``, the noise, grid
    ``index``, guidance ``w``, the timesteps ``t_start = t_{n+k}`` / ``t_end = t_n`` and ``z = z_{t_{n+k}}``."""

    dtype: torch.dtype  # float32, or float64 for float64 latents
    x0: torch.Tensor  # (B, C, H, W)
    noise: torch.Tensor  # (B, C, H, W)
    index: torch.Tensor  # (B,) long
    w: torch.Tensor  # (B,)
    t_start: torch.Tensor  # (B,) long
    t_end: torch.Tensor  # (B,) long
    table: torch.Tensor  # (num_train_timesteps,) alphas_cumprod on x0's device and dtype
    z: torch.Tensor  # (B, C, H, W), LCM Eq. 1 at t_start

    def alpha_sigma(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, sigma)`` at ``timesteps (B,)`` of this noise table."""
        return alpha_sigma(self.table, timesteps)


def solver_points(
    latents: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    config: DistillLossConfig,
    *,
    noise: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SolverPoints:
    """Draws (or takes) index, w and noise (:func:`_draws`, in that order) and noises ``latents`` to ``t_start``.

    The math runs in float32 (or float64 for float64 latents).
    """
    num_train = alphas_cumprod.shape[0]
    if config.num_ddim_timesteps > num_train:
        raise ValueError(f"num_ddim_timesteps ({config.num_ddim_timesteps}) exceeds num_train_timesteps ({num_train})")
    dtype = torch.promote_types(latents.dtype, torch.float32)
    x0 = latents.to(dtype)  # (B, C, H, W)
    noise, index, w = _draws(x0, config, noise, index, w, generator)
    t_start, t_end = solver_timesteps(index, num_train, config.num_ddim_timesteps)  # (B,), (B,)
    table = alphas_cumprod.to(device=x0.device, dtype=dtype)
    z = diffuse(x0, noise, *alpha_sigma(table, t_start))  # z_{t_{n+k}}, LCM Eq. 1
    return SolverPoints(dtype, x0, noise, index, w, t_start, t_end, table, z)


def guided_solver_step(teacher: TeacherFn, p: SolverPoints, prediction_type: str) -> torch.Tensor:
    """The teacher's guided DDIM step ``z_{t_{n+k}} -> z_hat_{t_n}`` (LCM Eq. 8 with the DDIM solver):
    ``alpha(t_n) x0_w + sigma(t_n) eps_w`` with ``x0_w, eps_w`` the LCM-convention CFG combinations of the
    conditional and unconditional ``pred_x0`` / ``pred_eps`` (converted for ``prediction_type``). Call under
    ``no_grad``."""
    a_start, s_start = p.alpha_sigma(p.t_start)
    cond, uncond = teacher(p.z, p.t_start)
    cond_x0, cond_eps = predict_x0_eps(cond.to(p.dtype), p.z, a_start, s_start, prediction_type)
    uncond_x0, uncond_eps = predict_x0_eps(uncond.to(p.dtype), p.z, a_start, s_start, prediction_type)
    return diffuse(cfg_combine(cond_x0, uncond_x0, p.w), cfg_combine(cond_eps, uncond_eps, p.w),
                   *p.alpha_sigma(p.t_end))  # fmt: skip


