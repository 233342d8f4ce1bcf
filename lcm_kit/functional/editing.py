"""Zero-shot editing with a consistency model: slerp, luma and the constraint projections."""

from __future__ import annotations

import torch

from .core import append_dims

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
