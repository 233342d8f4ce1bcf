"""Consistency training in SD latent space: a consistency model learnt from data alone, no teacher UNet.

The pair of points comes from one noise draw ``eps`` at two adjacent VE noise levels ``sigma_lo < sigma_hi``
(iCT, Song & Dhariwal 2023, arXiv:2310.14189, Sec. 2): ``x_hi = x0 + sigma_hi eps`` and ``x_lo = x0 + sigma_lo eps``,
mapped to the teacher's VP/DDPM parameterisation ``alpha (x0 + sigma eps)`` (:func:`lcm_kit.functional.vp_alpha_sigma`)
at the fractional timestep of each level (:func:`lcm_kit.schedules.sigma_to_timestep`), with noise levels confined to
the teacher schedule's range (:func:`lcm_kit.schedules.vp_sigmas`). The network sees ``x_hi`` with gradients; the
target is the same network at ``x_lo`` under ``no_grad`` with the same dropout RNG state (iCT Sec. 3.2: no EMA
target). Both outputs are LCM's boundary-scaled consistency function ``c_skip z + c_out x0`` (LCM Eq. 9), so the
student samples with the LCM scheduler like a distilled one.

The levels come from iCT's curriculum (``ict``: ``N(k)`` Karras levels, lognormal pair index, weight
``1 / (sigma_hi - sigma_lo)``) or from ECT's continuous mapping (``ect``: ``t`` lognormal, ``r`` by
:func:`lcm_kit.functional.ect_lower_sigma`, Geng et al. 2024, arXiv:2406.14548). Both depend on the global step only.
The loss is a whole-sample pseudo-Huber (``c = 0.00054 sqrt(d)``) or Cauchy distance (Dao et al. 2025,
arXiv:2502.01441), plus an optional denoising loss at small noise levels (ibid.).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch

from .functional import (
    boundary_scalings,
    consistency_output,
    ct_weight,
    diffuse,
    ect_lower_sigma,
    ict_huber_c,
    lognormal_level_probs,
    predict_x0_eps,
    vp_alpha_sigma,
    whole_sample_distance,
)
from .loss import DistillLossOutput
from .schedules import ict_doubling_interval, ict_num_noise_levels, karras_sigmas, sigma_to_timestep, vp_sigmas

StudentFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ConsistencyTrainingConfig:
    """Hyper-parameters of ``--objective ct`` (the other objectives ignore them)."""

    ct_schedule: Literal["ict", "ect"] = field(
        default="ict",
        metadata={"help": "ct: ict = iCT's discretisation N(k) = min(s0 2^floor(k/K'), s1) + 1 with lognormal pair "
                  "sampling (arXiv 2310.14189); ect = ECT's continuous mapping r = t (1 - n(t) / q^a) (arXiv "
                  "2406.14548)."},
    )  # fmt: skip
    ct_s0: int = field(default=10, metadata={"help": "ct (ict): initial discretisation s0 (iCT: 10); N(0) = s0 + 1."})
    ct_s1: int = field(default=1280, metadata={"help": "ct (ict): final discretisation s1 (iCT: 1280)."})
    ct_total_steps: int | None = field(
        default=None,
        metadata={"help": "ct: K of the curriculum (N doubles every K' = K / (log2(s1/s0) + 1) steps; ect: the "
                  "stage a = floor(k/K') + 1); None = max_train_steps. Give it explicitly to extend a run on "
                  "resume without changing the curriculum."},
    )  # fmt: skip
    ct_p_mean: float = field(default=-1.1, metadata={"help": "ct: lognormal P_mean of the noise levels (iCT: -1.1)."})
    ct_p_std: float = field(default=2.0, metadata={"help": "ct: lognormal P_std of the noise levels (iCT: 2.0)."})
    ct_rho: float = field(default=7.0, metadata={"help": "ct (ict): rho of the Karras discretisation (iCT: 7)."})
    ct_ect_q: float = field(default=2.0, metadata={"help": "ct (ect): q, t - r shrinks by q per stage (ECT: 2)."})
    ct_ect_k: float = field(default=8.0, metadata={"help": "ct (ect): k of n(t) = 1 + k sigmoid(-b t) (ECT: 8)."})
    ct_ect_b: float = field(default=1.0, metadata={"help": "ct (ect): b of n(t) = 1 + k sigmoid(-b t) (ECT: 1)."})
    ct_diffusion_weight: float = field(
        default=0.0,
        metadata={"help": "ct: weight of an extra denoising loss ||f(x_hi) - x0||^2 at small noise levels (Dao et "
                  "al., arXiv 2502.01441); 0 = off."},
    )  # fmt: skip
    ct_diffusion_max_sigma: float = field(
        default=1.0, metadata={"help": "ct: the denoising loss applies where sigma_hi <= this VE noise level."}
    )
    caption_dropout: float | None = field(
        default=None,
        metadata={"help": "Probability of training on the empty prompt instead of the caption (so the student can "
                  "be sampled with CFG); None = the objective's default: ct 0.1, lcm / pcm / tcd 0."},
    )  # fmt: skip

    def __post_init__(self):
        super_post = getattr(super(), "__post_init__", None)
        if super_post is not None:
            super_post()
        if self.ct_schedule not in ("ict", "ect"):
            raise ValueError(f"ct_schedule must be 'ict' or 'ect', got {self.ct_schedule!r}")
        if not 1 <= self.ct_s0 <= self.ct_s1:
            raise ValueError(f"ct_s0 / ct_s1 must satisfy 1 <= ct_s0 <= ct_s1, got {self.ct_s0} / {self.ct_s1}")
        if self.ct_total_steps is not None and self.ct_total_steps < 1:
            raise ValueError(f"ct_total_steps must be >= 1 (or None = max_train_steps), got {self.ct_total_steps}")
        for name in ("ct_p_std", "ct_rho", "ct_ect_k", "ct_ect_b", "ct_diffusion_max_sigma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.ct_ect_q > 1:
            raise ValueError(f"ct_ect_q must be > 1, got {self.ct_ect_q}")
        if self.ct_diffusion_weight < 0:
            raise ValueError(f"ct_diffusion_weight must be >= 0, got {self.ct_diffusion_weight}")
        if self.caption_dropout is not None and not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")


@dataclass(frozen=True)
class CTPoints:
    """One draw of consistency-training pairs: VE noise levels ``sigma_lo < sigma_hi`` ``(B,)`` (float64), their
    loss weights ``(B,)`` and the pair index on the iCT grid (``-1`` for ECT)."""

    sigma_lo: torch.Tensor
    sigma_hi: torch.Tensor
    weight: torch.Tensor
    index: torch.Tensor


def ict_levels(alphas_cumprod: torch.Tensor, config: ConsistencyTrainingConfig, step: int) -> torch.Tensor:
    """The ``N(step)`` ascending Karras noise levels between the schedule's first and last VE sigma (float64)."""
    table = vp_sigmas(alphas_cumprod)
    n = ict_num_noise_levels(step, config.ct_total_steps, config.ct_s0, config.ct_s1)
    return karras_sigmas(n, float(table[0]), float(table[-1]), config.ct_rho)


def ct_points(batch: int, alphas_cumprod: torch.Tensor, config: ConsistencyTrainingConfig, step: int,
              generator: torch.Generator | None = None) -> CTPoints:  # fmt: skip
    """Draws ``batch`` pairs for global step ``step``, as CPU tensors (``generator``: a CPU generator, as the loop's).

    ``ict``: pair index ``i ~ p(i)`` (:func:`lcm_kit.functional.lognormal_level_probs`) on :func:`ict_levels`.
    ``ect``: ``t = exp(P_mean + P_std n)`` clipped to the schedule's range, ``r`` = ECT's mapping at stage
    ``floor(step / K') + 1`` clipped below at the schedule's first level (the boundary, timestep 0); the weight
    ``1 / (t - r)`` uses ECT's own ``r >= 0``. A ``t`` clipped to the first level gives a pair with both points on
    the boundary (distance 0): about 11 % of draws with the default ``P_mean, P_std`` on SD's schedule.
    """
    if config.ct_total_steps is None:
        raise ValueError("ct_total_steps must be resolved (None = max_train_steps) before drawing pairs")
    if config.ct_schedule == "ict":
        sigmas = ict_levels(alphas_cumprod, config, step)
        probs = lognormal_level_probs(sigmas, config.ct_p_mean, config.ct_p_std)
        index = torch.multinomial(probs, batch, replacement=True, generator=generator)
        lo, hi = sigmas[index], sigmas[index + 1]
        return CTPoints(lo, hi, ct_weight(lo, hi), index)
    table = vp_sigmas(alphas_cumprod)
    n = torch.randn(batch, generator=generator, dtype=torch.float64)
    t = (config.ct_p_mean + config.ct_p_std * n).exp().clamp(float(table[0]), float(table[-1]))
    stage = step // ict_doubling_interval(config.ct_total_steps, config.ct_s0, config.ct_s1) + 1
    r = ect_lower_sigma(t, stage, config.ct_ect_q, config.ct_ect_k, config.ct_ect_b)
    return CTPoints(r.clamp(min=float(table[0])), t, ct_weight(r, t), torch.full((batch,), -1, dtype=torch.long))


def rng_replay(device: torch.device) -> Callable[[], AbstractContextManager]:
    """Records the RNG state of the CPU (and of ``device`` if it is a GPU) now; ``with replay():`` later runs its block
    with that state again and leaves the RNGs as they were. The student and its no-grad target then draw the same
    dropout masks (iCT Sec. 3.2, "we use the same random seed for dropout")."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay() -> Iterator[None]:
        with torch.random.fork_rng(devices=[device] if cuda is not None else []):
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, device)
            yield

    return replay


def consistency_training_loss(student: StudentFn, latents: torch.Tensor, alphas_cumprod: torch.Tensor,
                              config: ConsistencyTrainingConfig, step: int, *, noise: torch.Tensor | None = None,
                              generator: torch.Generator | None = None) -> DistillLossOutput:  # fmt: skip
    """The consistency-training loss of one micro-batch at global step ``step`` (module docstring).

    Args:
        student: ``(z (B,C,H,W), t (B,) fractional timesteps, w (B,) zeros) -> (B,C,H,W)`` raw model output, in the
            parameterisation ``config.prediction_type``; called twice, the second time under ``no_grad``.
        latents: Clean latents ``x0`` times the VAE scaling factor, ``(B,C,H,W)``.
        alphas_cumprod: The teacher's ``(num_train_timesteps,)`` noise table.
        config: An objective config with the :class:`ConsistencyTrainingConfig` and the boundary-scaling fields
            (``sigma_data``, ``timestep_scaling``, ``loss_type``, ``prediction_type``), ``ct_total_steps`` resolved.
        step: The global optimizer step ``k`` (the curriculum's clock).
        noise: Override of the shared ``eps ~ N(0, I)``.
        generator: Source of the draws (order: pair, noise).

    Returns:
        A :class:`lcm_kit.loss.DistillLossOutput`: ``t_start`` / ``t_end`` are the fractional timesteps of
        ``sigma_hi`` / ``sigma_lo``, ``w`` zeros, ``index`` the iCT pair index (-1 for ECT).
    """
    dtype = torch.promote_types(latents.dtype, torch.float32)
    x0, device = latents.to(dtype), latents.device
    p = ct_points(x0.shape[0], alphas_cumprod, config, step, generator)
    if noise is None:
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=torch.float32)
    noise = noise.to(device, dtype)
    def on(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, dtype)

    (a_lo, s_lo), (a_hi, s_hi) = map(on, vp_alpha_sigma(p.sigma_lo)), map(on, vp_alpha_sigma(p.sigma_hi))
    t_lo, t_hi = on(sigma_to_timestep(p.sigma_lo, alphas_cumprod)), on(sigma_to_timestep(p.sigma_hi, alphas_cumprod))
    z_lo, z_hi = diffuse(x0, noise, a_lo, s_lo), diffuse(x0, noise, a_hi, s_hi)  # one eps for both points
    w = torch.zeros(x0.shape[0], device=device, dtype=dtype)
    scalings = dict(sigma_data=config.sigma_data, timestep_scaling=config.timestep_scaling)

    def consistency_fn(z, t, a, s):
        x0_pred, _ = predict_x0_eps(student(z, t, w).to(dtype), z, a, s, config.prediction_type)
        return consistency_output(z, x0_pred, *boundary_scalings(t, **scalings))  # LCM Eq. 9

    replay = rng_replay(device)
    denoised = consistency_fn(z_hi, t_hi, a_hi, s_hi)
    with torch.no_grad(), replay():  # the same network, stop-gradient, same dropout masks
        target = consistency_fn(z_lo, t_lo, a_lo, s_lo)
    c = ict_huber_c(x0[0].numel())
    per_sample = p.weight.to(device, dtype) * whole_sample_distance(denoised, target, config.loss_type, c)
    if config.ct_diffusion_weight > 0:
        early = (p.sigma_hi <= config.ct_diffusion_max_sigma).to(device, dtype)
        per_sample = per_sample + config.ct_diffusion_weight * early * (denoised - x0).flatten(1).pow(2).mean(1)
    return DistillLossOutput(per_sample.mean(), t_hi, t_lo, w, p.index.to(device), per_sample.detach(),
                             denoised.detach(), target)  # fmt: skip
