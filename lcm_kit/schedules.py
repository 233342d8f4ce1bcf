"""Noise tables (betas, ``alphas_cumprod``, ``alpha_t``, ``sigma_t``) and the LCM timestep schedules.

Pure torch / numpy; the only copy of these formulas in the project. Conventions match diffusers' DDPM-family
schedulers so a Stable Diffusion ``scheduler_config.json`` gives the same tables.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]


def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: BetaSchedule = "scaled_linear",
    trained_betas: list[float] | np.ndarray | None = None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """The DDPM variance schedule ``beta_t``, float32 of shape ``(num_train_timesteps,)``.

    ``scaled_linear`` is Stable Diffusion's (linear in ``sqrt(beta)``, LDM); ``squaredcos_cap_v2`` is the cosine
    schedule (Nichol & Dhariwal 2021, Eq. 17, betas capped at 0.999); ``rescale_betas_zero_snr`` applies
    Lin et al. 2023, Algorithm 1 (terminal SNR zero).
    """
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = [(i / num_train_timesteps, (i + 1) / num_train_timesteps) for i in range(num_train_timesteps)]
        betas = torch.tensor([min(1 - alpha_bar(b) / alpha_bar(a), 0.999) for a, b in steps], dtype=torch.float32)
    else:
        raise ValueError(
            f"beta_schedule must be 'linear', 'scaled_linear' or 'squaredcos_cap_v2', got {beta_schedule!r}"
        )
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescales betas so the last timestep has zero SNR (Lin et al. 2023, arXiv:2305.08891, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """``alphas_cumprod[t] = prod_{s <= t} (1 - beta_s)`` (DDPM Eq. 4)."""
    return torch.cumprod(1.0 - betas, dim=0)


def alpha_sigma(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha_t = sqrt(alphas_cumprod[t])`` and ``sigma_t = sqrt(1 - alphas_cumprod[t])`` (LCM Eq. 1).

    ``timesteps`` may be an int, a 0-d or a ``(B,)`` long tensor; the result has its shape, on the table's device.
    """
    ac = alphas_cumprod[timesteps]
    return ac.sqrt(), (1 - ac).sqrt()


def skipping_step_timesteps(num_train_timesteps: int, num_steps: int, strength: float = 1.0) -> np.ndarray:
    """The skipping-step grid ``[k-1, 2k-1, ..., n*k-1]`` with ``k = num_train_timesteps // num_steps`` (ascending).

    This is the DDIM solver's grid used in distillation (``num_ddim_timesteps``, LCM Sec. 4.3 "skipping-step") and
    the grid LCM inference picks its steps from (``original_inference_steps``); ``strength < 1`` keeps its first
    ``int(num_steps * strength)`` points (img2img). 1000 // 50 = 20 gives ``[19, 39, ..., 999]``.
    """
    if not 0 < num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    k = num_train_timesteps // num_steps
    return np.arange(1, int(num_steps * strength) + 1, dtype=np.int64) * k - 1


def solver_step_ends(num_train_timesteps: int, num_ddim_timesteps: int) -> np.ndarray:
    """For each point ``grid[i]`` of the skipping-step grid, where the DDIM solver step from it ends: ``grid[i - 1]``,
    and 0 for ``i = 0`` (as diffusers' ``DDIMSolver``, ``ddim_timesteps_prev``; LCM Sec. 4.3). Ascending, int64."""
    grid = skipping_step_timesteps(num_train_timesteps, num_ddim_timesteps)
    return np.concatenate([np.zeros(1, dtype=np.int64), grid[:-1]])


def check_num_phases(num_phases: int, num_ddim_timesteps: int) -> None:
    """``ValueError`` naming ``num_phases`` unless it is an int in ``[1, num_ddim_timesteps]`` (one phase per grid
    point at most)."""
    is_int = isinstance(num_phases, (int, np.integer)) and not isinstance(num_phases, bool)
    if not is_int or not 1 <= num_phases <= num_ddim_timesteps:
        raise ValueError(f"num_phases must be an int in [1, num_ddim_timesteps={num_ddim_timesteps}], "
                         f"got {num_phases!r}")  # fmt: skip


def phase_edges(num_train_timesteps: int, num_ddim_timesteps: int, num_phases: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``num_phases`` phases of a Phased Consistency Model on the skipping-step grid (PCM, Wang et al. 2024,
    arXiv:2405.18407, Sec. 3.1 / Eq. 5: ``s_0 = 0 < s_1 < ... < s_M = T``).

    Phase ``m`` holds the grid indices ``[first[m], first[m + 1])`` with ``first = floor(linspace(0, N, M,
    endpoint=False))``; its lower edge is the grid point just below its first index (0 for the first phase), so
    ``edges[m] = solver_step_ends(...)[first[m]]``. 50 points, 4 phases: ``first = [0, 12, 25, 37]``, edges
    ``[0, 239, 499, 739]``. Returns ``(first, edges)``, each ``(num_phases,)`` int64, ascending.

    Raises:
        ValueError: unless ``1 <= num_phases <= num_ddim_timesteps``.
    """
    check_num_phases(num_phases, num_ddim_timesteps)
    first = np.floor(np.linspace(0, num_ddim_timesteps, num=num_phases, endpoint=False)).astype(np.int64)
    return first, solver_step_ends(num_train_timesteps, num_ddim_timesteps)[first]


def phase_sampling_timesteps(num_train_timesteps: int, num_ddim_timesteps: int, num_phases: int) -> np.ndarray:
    """PCM's deterministic schedule: the top of the grid, then each phase edge but 0 (descending). Each step jumps
    to the next edge; the last to edge 0. 50 points, 4 phases: ``[999, 739, 499, 239]``."""
    _, edges = phase_edges(num_train_timesteps, num_ddim_timesteps, num_phases)
    top = skipping_step_timesteps(num_train_timesteps, num_ddim_timesteps)[-1]
    return np.concatenate([[top], edges[1:][::-1]]).astype(np.int64)


def lcm_inference_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    original_inference_steps: int = 50,
    strength: float = 1.0,
) -> np.ndarray:
    """The LCM inference schedule: ``num_inference_steps`` points evenly spaced in index over the descending
    skipping-step grid (LCM Algorithm 3). 4 of 50 -> ``[999, 759, 499, 259]``; strength 0.5 ->
    ``[499, 379, 259, 139]``.

    Raises:
        ValueError: if the (strength-cut) grid has fewer points than ``num_inference_steps``.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if original_inference_steps > num_train_timesteps:
        raise ValueError(
            f"original_inference_steps ({original_inference_steps}) cannot exceed num_train_timesteps "
            f"({num_train_timesteps})"
        )
    grid = skipping_step_timesteps(num_train_timesteps, original_inference_steps, strength)[::-1]
    if num_inference_steps > len(grid):
        raise ValueError(
            f"num_inference_steps ({num_inference_steps}) is larger than the {len(grid)} points of the schedule "
            f"(original_inference_steps={original_inference_steps} x strength={strength}); lower num_inference_steps "
            f"or raise original_inference_steps / strength"
        )
    idx = np.floor(np.linspace(0, len(grid), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return grid[idx].copy()


def check_custom_timesteps(
    timesteps: list[int] | np.ndarray, num_train_timesteps: int = 1000, original_inference_steps: int = 50
) -> np.ndarray:
    """Validates a user timestep list: strictly descending, inside ``[0, num_train_timesteps)``.

    Points off the skipping-step grid (e.g. ``[999, 749, 499, 249]`` used by other few-step models) are accepted
    with a warning, as is a first step other than ``num_train_timesteps - 1``.
    """
    ts = np.asarray(timesteps, dtype=np.int64)
    if ts.ndim != 1 or len(ts) == 0:
        raise ValueError(f"timesteps must be a non-empty list of ints, got {timesteps!r}")
    if np.any(np.diff(ts) >= 0):
        raise ValueError(f"timesteps must be strictly descending, got {list(ts)}")
    if ts[0] >= num_train_timesteps or ts[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}), got {list(ts)}")
    grid = set(skipping_step_timesteps(num_train_timesteps, original_inference_steps).tolist())
    off_grid = [int(t) for t in ts[1:] if int(t) not in grid]
    if off_grid:
        logger.warning(
            "custom timesteps %s are not on the %d-step distillation grid", off_grid, original_inference_steps
        )
    if ts[0] != num_train_timesteps - 1:
        logger.warning("custom timesteps start at %d, not %d", ts[0], num_train_timesteps - 1)
    return ts


def strength_cut(timesteps: np.ndarray, strength: float) -> np.ndarray:
    """Keeps the last ``int(len * strength)`` steps of a custom schedule (img2img), as diffusers does."""
    n = len(timesteps)
    keep = min(int(n * strength), n)
    return timesteps[n - keep :]


# --- Consistency training (no teacher): the noise levels of the VE view of the teacher's VP schedule ---------------


def vp_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``sigma_t = sqrt(1 - alphas_cumprod[t]) / sqrt(alphas_cumprod[t])``, float64 ``(num_train_timesteps,)``.

    The VE noise level of the VP/DDPM schedule: ``z_t = alpha_t (x0 + sigma_t eps)`` (EDM, Karras et al. 2022,
    arXiv:2206.00364, Table 1, VP column with ``s(t) = alpha_t``). Increasing in ``t``; its first and last entries are
    the range consistency training samples in (not EDM's ``[0.002, 80]``).
    """
    ac = alphas_cumprod.double()
    return ((1 - ac) / ac).sqrt()


def sigma_to_timestep(sigma: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The fractional DDPM timestep of each VE noise level ``sigma``: ``log sigma`` interpolated linearly between the
    integer timesteps of :func:`vp_sigmas` (as k-diffusion's discrete-schedule wrappers), clipped to
    ``[0, num_train_timesteps - 1]``. Integer-timestep sigmas map back to their integer exactly. Float64, shape of
    ``sigma``."""
    table = vp_sigmas(alphas_cumprod).to(sigma.device).log()
    log_sigma = sigma.double().log().clamp(table[0], table[-1])
    idx = torch.searchsorted(table, log_sigma).clamp(1, len(table) - 1)
    lo, hi = table[idx - 1], table[idx]
    return (idx - 1).double() + (log_sigma - lo) / (hi - lo)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The ``n`` noise levels ``sigma_i = (s_min^(1/rho) + (i-1)/(n-1) (s_max^(1/rho) - s_min^(1/rho)))^rho``,
    ``i = 1..n``, ``s_min = sigma_min``, ``s_max = sigma_max``, ascending,
    float64 (EDM Eq. 5, the discretisation of CM, Song et al. 2023, Sec. 5, and of iCT)."""
    if n < 2:
        raise ValueError(f"the discretisation needs n >= 2 noise levels, got {n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


def ict_doubling_interval(total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's ``K' = floor(K / (log2 floor(s1 / s0) + 1))``: the steps between two doublings of the discretisation
    (Song & Dhariwal 2023, arXiv:2310.14189, Sec. 3.4, "improved curriculum"); at least 1."""
    return max(1, math.floor(total_steps / (math.log2(s1 // s0) + 1)))


def ict_num_noise_levels(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's exponential curriculum ``N(k) = min(s0 * 2^floor(k / K'), s1) + 1`` (arXiv:2310.14189, Sec. 3.4): the
    number of noise levels at global optimizer step ``k`` of ``K = total_steps``. A pure function of the global step,
    so every rank (and a resumed run) uses the same discretisation. ``N(0) = s0 + 1``; capped at ``s1 + 1``."""
    return min(s0 * 2 ** (step // ict_doubling_interval(total_steps, s0, s1)), s1) + 1
