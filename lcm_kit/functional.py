"""The consistency-model math, as small pure functions of tensors (torch only, no diffusers import).

Every formula of the project lives here once (or in :mod:`lcm_kit.schedules` for the noise tables and timestep
grids); the scheduler, the pipeline and the distillation loss all call these functions.

Glossary (the symbols of the LCM paper, Luo et al. 2023, arXiv:2310.04378, and of DDIM / consistency models):

* ``timesteps`` -- integer DDPM indices ``t`` in ``[0, num_train_timesteps)``.
* ``alpha``, ``sigma`` -- ``alpha(t) = sqrt(alphas_cumprod[t])``, ``sigma(t) = sqrt(1 - alphas_cumprod[t])``, so
  ``z_t = alpha(t) * x0 + sigma(t) * eps`` (LCM Eq. 1).
* ``model_output`` -- the raw UNet output (epsilon, v or x0 depending on ``prediction_type``).
* ``pred_x0`` / ``pred_eps`` -- the model's estimate of the clean latent and of the noise.
* ``denoised`` -- the consistency output ``f(z, t) = c_skip(t) * z + c_out(t) * pred_x0`` (LCM Eq. 9).
* ``w`` -- guidance strength in the LCM convention, ``eps = eps_c + w * (eps_c - eps_u)`` (LCM Eq. 8), which is
  ``guidance_scale - 1`` in the usual (Imagen / diffusers) convention.
* ``t_start`` is the noisier point ``t_{n+k}`` of a skipping-step pair, ``t_end`` is ``t_n``.

Shapes: ``sample``-like tensors are ``(B, C, H, W)``; per-sample scalars (``alpha``, ``c_skip`` ...) are either
Python floats, 0-d tensors, or ``(B,)`` tensors, which :func:`append_dims` broadcasts to the sample.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


def append_dims(x: torch.Tensor | float, ndim: int) -> torch.Tensor | float:
    """Appends trailing singleton dims to a ``(B,)`` tensor so it broadcasts against an ``ndim``-d sample.

    Python floats and 0-d tensors are returned unchanged (they broadcast already).
    """
    if not isinstance(x, torch.Tensor) or x.ndim == 0:
        return x
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def boundary_scalings(
    timesteps: torch.Tensor | float, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """Boundary-condition scalings ``(c_skip, c_out)`` of the consistency function (LCM Eq. 9, CM Eq. 21).

    With ``s = timestep_scaling * t``: ``c_skip = sigma_data^2 / (s^2 + sigma_data^2)`` and
    ``c_out = s / sqrt(s^2 + sigma_data^2)``, so ``c_skip(0) = 1`` and ``c_out(0) = 0`` (``f(x, 0) = x``).

    Args:
        timesteps: DDPM indices, a number or a tensor of any shape.
        sigma_data: The data standard deviation of the consistency parameterisation (0.5 in LCM).
        timestep_scaling: Multiplier of the discrete timestep (10 in LCM), which sharpens the boundary.

    Returns:
        ``(c_skip, c_out)`` with the shape of ``timesteps``.
    """
    scaled = timesteps * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_output(
    sample: torch.Tensor, pred_x0: torch.Tensor, c_skip: torch.Tensor | float, c_out: torch.Tensor | float
) -> torch.Tensor:
    """The consistency function ``f(z_t, t) = c_skip(t) * z_t + c_out(t) * pred_x0`` (LCM Eq. 9)."""
    return append_dims(c_skip, sample.ndim) * sample + append_dims(c_out, sample.ndim) * pred_x0


def predict_x0_eps(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha: torch.Tensor | float,
    sigma: torch.Tensor | float,
    prediction_type: PredictionType = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Converts a model output to ``(pred_x0, pred_eps)`` for any parameterisation.

    Inverts ``z_t = alpha * x0 + sigma * eps`` (LCM Eq. 1); for ``v_prediction`` the target is
    ``v = alpha * eps - sigma * x0`` (Salimans & Ho 2022, Eq. 10), so ``x0 = alpha * z - sigma * v`` and
    ``eps = alpha * v + sigma * z`` (``alpha^2 + sigma^2 = 1``).

    Args:
        model_output: UNet output, ``(B, C, H, W)``.
        sample: The noisy latent ``z_t`` the model saw, ``(B, C, H, W)``.
        alpha: ``sqrt(alphas_cumprod[t])``, a number or ``(B,)``.
        sigma: ``sqrt(1 - alphas_cumprod[t])``, a number or ``(B,)``.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.

    Returns:
        ``(pred_x0, pred_eps)``, each ``(B, C, H, W)``.
    """
    alpha, sigma = append_dims(alpha, sample.ndim), append_dims(sigma, sample.ndim)
    if prediction_type == "epsilon":
        pred_eps = model_output
        pred_x0 = (sample - sigma * model_output) / alpha
    elif prediction_type == "v_prediction":
        pred_x0 = alpha * sample - sigma * model_output
        pred_eps = alpha * model_output + sigma * sample
    elif prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (sample - alpha * model_output) / sigma
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return pred_x0, pred_eps


def diffuse(
    x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float
) -> torch.Tensor:
    """``alpha * x0 + sigma * eps`` (LCM Eq. 1).

    The forward noising ``q(z_t | x0)``, the deterministic DDIM step (eta = 0, DDIM Eq. 12 with ``x0, eps`` the
    model's predictions at the previous point) and the LCM re-noising between steps (LCM Algorithm 3) are all this.
    """
    return append_dims(alpha, x0.ndim) * x0 + append_dims(sigma, x0.ndim) * eps


def guidance_w(guidance_scale: float | torch.Tensor) -> float | torch.Tensor:
    """Converts the usual ``guidance_scale`` (``uncond + s * (cond - uncond)``) to LCM's ``w = s - 1`` (Eq. 8).

    The only place the two conventions meet: ``guidance_scale = 1`` means no guidance, i.e. ``w = 0``.
    """
    return guidance_scale - 1


def guidance_scale_from_w(w: float | torch.Tensor) -> float | torch.Tensor:
    """The inverse of :func:`guidance_w`: LCM's ``w`` (Eq. 8) as the usual ``guidance_scale = w + 1``."""
    return w + 1


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance in the LCM convention: ``cond + w * (cond - uncond)`` (LCM Eq. 8).

    ``w`` is a number or a per-sample ``(B,)`` tensor (training samples one ``w`` per example).
    """
    return cond + append_dims(w, cond.ndim) * (cond - uncond)


def guidance_scale_embedding(
    w: torch.Tensor, embedding_dim: int = 512, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Sinusoidal embedding of the guidance strength ``w`` (LCM Sec. 4.1, after VDM / Transformer embeddings).

    ``w`` is scaled by 1000 (to the range of DDPM timesteps), then embedded as ``[sin(w f_i), cos(w f_i)]`` with
    ``f_i = exp(-i * log(10000) / (embedding_dim/2 - 1))``; an odd ``embedding_dim`` is zero-padded. Numerically
    the same as ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``.

    Args:
        w: Guidance strengths in the LCM convention (``guidance_scale - 1``), shape ``(B,)``.
        embedding_dim: Output width (the UNet's ``time_cond_proj_dim``).
        dtype: Dtype of the computation and of the output.

    Returns:
        ``(B, embedding_dim)`` tensor.
    """
    if w.ndim != 1:
        raise ValueError(f"w must be a 1-d tensor of shape (B,), got shape {tuple(w.shape)}")
    half_dim = embedding_dim // 2
    freqs = torch.exp(torch.arange(half_dim, dtype=dtype, device=w.device) * -(math.log(10000.0) / (half_dim - 1)))
    angles = (w * 1000.0).to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding of ``pred_x0`` (Imagen, Saharia et al. 2022, Sec. 2.3).

    Per sample, ``s`` is the ``ratio`` quantile of ``|x0|`` clamped to ``[1, max_value]``; ``x0`` is clipped to
    ``[-s, s]`` and divided by ``s``. Computed in float32 (quantile needs it), returned in the input dtype.
    """
    flat = x0.reshape(x0.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


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


# ---- zero-shot editing: Song et al. 2023, Consistency Models (arXiv:2303.01469), Algorithm 4 ----------------------
# Each step maps z_t to a clean estimate x, replaces x by A^-1[(A y) (1 - Omega) + (A x) Omega] (the projection onto
# the images that satisfy the constraint), then re-noises the whole sample with one fresh noise draw. Images here are
# (B, 3, H, W) in [-1, 1]; each projection is exact and stays in [lo, hi] (8-bit output keeps the constraint).
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dim: int | None = None) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985), as used between initial noises (DDIM Sec. 5.3, CM Sec. 6):
    ``(sin((1 - t) theta) a + sin(t theta) b) / sin(theta)``, ``theta`` the angle between ``a`` and ``b`` taken over
    all elements (``dim=None``) or along ``dim``. Falls back to linear interpolation when ``a`` and ``b`` are
    (nearly) parallel; ``t = 0`` gives ``a`` and ``t = 1`` gives ``b``."""
    dims = tuple(range(a.ndim)) if dim is None else (dim,)
    norms = (a * a).sum(dims, keepdim=True) * (b * b).sum(dims, keepdim=True)
    dot = (a * b).sum(dims, keepdim=True) / norms.sqrt()
    theta = torch.arccos(dot.clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    safe = sin.abs() > 1e-6
    wa = torch.where(safe, torch.sin((1 - t) * theta) / torch.where(safe, sin, 1.0), torch.full_like(sin, 1 - t))
    wb = torch.where(safe, torch.sin(t * theta) / torch.where(safe, sin, 1.0), torch.full_like(sin, t))
    return wa * a + wb * b


def luma(images: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` of ``(B, 3, H, W)`` images, ``(B, 1, H, W)`` (the weights
    sum to 1, so it commutes with the affine map between [0, 1] and [-1, 1])."""
    w = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype, device=images.device).reshape(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


def box_downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean of each ``factor x factor`` block: ``(B, C, H, W) -> (B, C, H / factor, W / factor)``."""
    return torch.nn.functional.avg_pool2d(images, factor)


def _shrink_into_range(x: torch.Tensor, anchor: torch.Tensor, group_min, lo: float, hi: float) -> torch.Tensor:
    """``anchor + s (x - anchor)`` with the largest ``s <= 1`` per group that keeps it in ``[lo, hi]``. ``anchor``
    (in range) and ``x`` satisfy the same constraint and ``x - anchor`` is in its null space, so the result does too;
    ``group_min`` reduces the per-element bound ``s`` over each group of the constraint."""
    d = x - anchor
    bound = torch.where(d > 0, (hi - anchor) / d.clamp(min=1e-12), (lo - anchor) / d.clamp(max=-1e-12))
    s = group_min(torch.where(d == 0, torch.ones_like(d), bound)).clamp(0.0, 1.0)
    return anchor + s * d


def project_known(x: torch.Tensor, known: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inpainting projection (CM Algorithm 4, ``A = I``, ``Omega = mask``): ``mask * x + (1 - mask) * known``;
    ``mask`` is 1 where the image is repainted (diffusers' convention, white = repaint), 0 where it is known."""
    return mask * x + (1 - mask) * known


def project_box_mean(x: torch.Tensor, low: torch.Tensor, factor: int, lo: float = -1.0, hi: float = 1.0):
    """Super-resolution projection (CM Algorithm 4 with ``A`` the orthogonal block transform whose first row is the
    block mean): every ``factor x factor`` block of ``x`` is shifted so its mean equals the pixel of ``low``, i.e.
    ``x + up(low - box_downsample(x))`` with ``up`` nearest upsampling; then each block is shrunk towards its flat
    value until it fits ``[lo, hi]`` (which keeps its mean). ``box_downsample(result, factor) == low``."""
    anchor = torch.nn.functional.interpolate(low, scale_factor=factor, mode="nearest")
    shifted = x + torch.nn.functional.interpolate(low - box_downsample(x, factor), scale_factor=factor, mode="nearest")

    def block_min(s: torch.Tensor) -> torch.Tensor:
        smallest = -torch.nn.functional.max_pool2d(-s, factor)
        return torch.nn.functional.interpolate(smallest, scale_factor=factor, mode="nearest")

    return _shrink_into_range(shifted, anchor, block_min, lo, hi)


def project_luma(x: torch.Tensor, target: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    """Colorization projection (CM Algorithm 4 with ``A`` orthogonal, first row the unit luma vector ``w / |w|``):
    ``x + w (target - luma(x)) / |w|^2`` per pixel, the nearest colour with luma ``target`` ``(B, 1, H, W)``; then
    each pixel is shrunk towards the grey of the same luma until it fits ``[lo, hi]``. ``luma(result) == target``."""
    w = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
    shifted = x + w * (target - luma(x)) / (w * w).sum()
    return _shrink_into_range(shifted, target.expand_as(x), lambda s: s.amin(1, keepdim=True), lo, hi)


def reproject_renoised(
    renoised: torch.Tensor, denoised: torch.Tensor, projected: torch.Tensor, alpha_next: torch.Tensor | float
) -> torch.Tensor:
    """The re-noised sample of a projected estimate, from the one of the unprojected estimate and the same noise.

    LCM's re-noising ``z' = alpha(t') x + sigma(t') eps`` (:func:`diffuse`) is affine in ``x``, so replacing ``x`` by
    its projection (CM Algorithm 4) adds ``alpha(t') (projected - denoised)``; ``alpha_next = 1`` after the last
    step, where ``z' = x``. An identity projection leaves ``renoised`` bit for bit.
    """
    return renoised + append_dims(alpha_next, renoised.ndim) * (projected - denoised)
