"""The consistency-model math, as small pure functions of tensors (torch only, no diffusers import).

Every formula of the project lives here once (or in :mod:`lcm_kit.schedules` for the noise tables and timestep
grids); the scheduler, the pipeline, the losses and the editing pipeline all call these functions. One namespace,
three files: :mod:`.core` (LCM sampling and distillation), :mod:`.training` (teacher-free consistency training),
:mod:`.editing` (zero-shot editing projections).

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

from .core import (  # noqa: F401
    PREDICTION_TYPES,
    PredictionType,
    append_dims,
    boundary_scalings,
    cfg_combine,
    consistency_output,
    diffuse,
    dynamic_threshold,
    guidance_scale_embedding,
    guidance_scale_from_w,
    guidance_w,
    predict_x0_eps,
)
from .editing import (  # noqa: F401
    LUMA_WEIGHTS,
    box_downsample,
    luma,
    project_box_mean,
    project_known,
    project_luma,
    reproject_renoised,
    slerp,
)
from .training import (  # noqa: F401
    ct_weight,
    drop_condition,
    ect_lower_sigma,
    ict_huber_c,
    lognormal_level_probs,
    vp_alpha_sigma,
    whole_sample_distance,
)
