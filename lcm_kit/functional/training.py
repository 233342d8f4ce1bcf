"""Consistency training without a teacher (iCT / ECT / latent CT): noise levels, pair weights, distances."""

from __future__ import annotations

import math

import torch

from .core import append_dims

# --- Consistency training (iCT, Song & Dhariwal 2023, arXiv:2310.14189; ECT, Geng et al. 2024, arXiv:2406.14548;
# latent CT, Dao et al. 2025, arXiv:2502.01441) -------------------------------------------------------------------


def vp_alpha_sigma(ve_sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, sigma) = (1 / sqrt(1 + s^2), s / sqrt(1 + s^2))`` for a VE noise level ``s``: the VP point
    ``alpha x0 + sigma eps = alpha (x0 + s eps)`` (EDM, arXiv:2206.00364, Table 1, VP column). Shape of
    ``ve_sigma``."""
    alpha = (1 + ve_sigma**2).rsqrt()
    return alpha, ve_sigma * alpha


def lognormal_level_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT's lognormal distribution over the pairs ``(sigma_i, sigma_{i+1})`` of an ascending discretisation
    ``sigmas (N,)``: ``p(i) ∝ erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_i - P_mean) /
    (sqrt(2) P_std))`` (arXiv:2310.14189, Sec. 3.5, "improved noise schedule"). Returns ``(N-1,)`` float64, sum 1."""
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2.0) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def ct_weight(sigma_lo: torch.Tensor, sigma_hi: torch.Tensor) -> torch.Tensor:
    """iCT's loss weight ``lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i)`` (arXiv:2310.14189, Sec. 3.1; ECT uses the
    same ``1 / (t - r)``, arXiv:2406.14548, Sec. 3)."""
    return 1.0 / (sigma_hi - sigma_lo)


def ect_lower_sigma(sigma_t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """ECT's mapping from ``t`` to the nearer point ``r``: ``r = t (1 - n(t) / q^a)``, ``n(t) = 1 + k sigmoid(-b t)``,
    clipped at 0 (Geng et al. 2024, arXiv:2406.14548, Sec. 3.3, the mapping function ``p(r | t)`` of stage ``a``).
    ``t - r`` halves (``q = 2``) from one stage to the next, so the pair tightens towards the continuous limit."""
    n = 1 + k * torch.sigmoid(-b * sigma_t)
    return (sigma_t * (1 - n / q**stage)).clamp(min=0)


def ict_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber constant ``c = 0.00054 sqrt(d)`` for a sample of ``d`` elements (arXiv:2310.14189,
    Sec. 3.3); ``d`` is the latent's ``C * H * W`` here."""
    return 0.00054 * math.sqrt(dim)


def whole_sample_distance(a: torch.Tensor, b: torch.Tensor, loss_type: str, c: float) -> torch.Tensor:
    """The consistency-training distance of each sample, over the whole sample (not per element), ``(B,)``:

    * ``huber``: pseudo-Huber ``sqrt(||a - b||^2 + c^2) - c`` (iCT, arXiv:2310.14189, Sec. 3.3);
    * ``cauchy``: ``log(1 + ||a - b||^2 / (2 c^2))``, robust to the impulsive outliers of latents (Dao et al.,
      arXiv:2502.01441, Sec. 4, Cauchy loss);
    * ``l2``: the mean squared error ``||a - b||^2 / d``.

    ``||.||`` is the L2 norm over all ``d = C * H * W`` elements of a sample; computed in at least float32.
    """
    diff = (a - b).flatten(1)
    if diff.dtype in (torch.float16, torch.bfloat16):
        diff = diff.float()
    sq = (diff**2).sum(1)
    if loss_type == "huber":
        return torch.sqrt(sq + c**2) - c
    if loss_type == "cauchy":
        return torch.log1p(sq / (2 * c**2))
    if loss_type == "l2":
        return sq / diff.shape[1]
    raise ValueError(f"loss_type must be 'huber', 'cauchy' or 'l2', got {loss_type!r}")


def drop_condition(embeds: torch.Tensor, uncond: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Caption dropout: the text embedding ``embeds (B,L,D)`` of each example with ``drop (B,)`` true becomes the
    empty prompt's ``uncond (1,L,D)``, so one network learns the conditional and the unconditional model and can
    be sampled with classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598, Algorithm 1)."""
    return torch.where(append_dims(drop.to(embeds.device), embeds.ndim), uncond.to(embeds).expand_as(embeds), embeds)
