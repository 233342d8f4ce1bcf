"""The core consistency-model math (LCM, DDIM, CFG): see :mod:`lcm_kit.functional` for the glossary."""


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
