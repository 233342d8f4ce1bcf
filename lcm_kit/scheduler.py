"""``LCMKitScheduler``: a diffusers scheduler for consistency sampling, a thin adapter over
:mod:`lcm_kit.functional` and :mod:`lcm_kit.schedules`.

Its config keys are a superset of ``diffusers.LCMScheduler``'s (plus ``sigma_data``, ``gamma`` and a distilled
student's ``sampling_contract``, :mod:`lcm_kit.contract`), so configs move
both ways with ``from_config``, and so does a Stable Diffusion DDPM / PNDM / DDIM scheduler config. It offers every
public method and attribute of ``diffusers.LCMScheduler`` with the same behaviour: the plain helpers (step index,
``previous_timestep``, ...) are diffusers' own functions; the formulas are :mod:`lcm_kit.functional`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import LCMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import functional as F
from . import schedules


@dataclass
class LCMKitSchedulerOutput(BaseOutput):
    """Output of :meth:`LCMKitScheduler.step`.

    Args:
        prev_sample: The latent to feed the next step, ``(B, C, H, W)`` (re-noised unless this was the last step).
        denoised: The clean-latent estimate of this step, ``(B, C, H, W)``: the consistency output ``f(z_t, t)``
            (``gamma = None``), or TCD's ``x_s`` (``gamma`` set). Decode this one after the last step.
    """

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class LCMKitScheduler(SchedulerMixin, ConfigMixin):
    """Multistep consistency sampling (LCM, Luo et al. 2023, Algorithm 3) with optional TCD strategic stochastic
    sampling (Zheng et al. 2024, arXiv:2402.19159, Eq. 13).

    Each step maps ``z_t`` to a clean estimate, then re-noises it with fresh noise to the next timestep:

    * ``gamma = None`` (default): ``denoised = c_skip(t) z_t + c_out(t) pred_x0`` and ``z_next = alpha(t') denoised
      + sigma(t') eps`` -- exactly ``diffusers.LCMScheduler``.
    * ``gamma`` in ``[0, 1]``: the model's DDIM prediction is taken to ``s = floor((1 - gamma) t')``, ``x_s = alpha(s)
      pred_x0 + sigma(s) pred_eps``, then forward-diffused from ``s`` to ``t'`` -- exactly ``diffusers.TCDScheduler``
      with ``eta = gamma``. ``gamma = 1`` re-noises from ``pred_x0`` itself; ``gamma = 0`` draws no noise at all
      (deterministic: every step stays on the trajectory of the initial noise, like DDIM).

    Args:
        num_train_timesteps: Length of the DDPM schedule the model was trained with.
        beta_start: First beta of the schedule.
        beta_end: Last beta of the schedule.
        beta_schedule: ``"linear"``, ``"scaled_linear"`` (Stable Diffusion) or ``"squaredcos_cap_v2"``.
        trained_betas: Explicit betas, overriding the three above.
        original_inference_steps: Size of the skipping-step grid the model was distilled on (50 in LCM).
        clip_sample: Clip ``pred_x0`` to ``[-clip_sample_range, clip_sample_range]``.
        clip_sample_range: Clip range for ``clip_sample``.
        set_alpha_to_one: Sets ``final_alpha_cumprod`` as in DDIM / LCM configs (never used by LCM's step).
        steps_offset: Kept for config compatibility.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        thresholding: Dynamic thresholding of ``pred_x0`` (Imagen); not for latent models.
        dynamic_thresholding_ratio: Quantile of dynamic thresholding.
        sample_max_value: Upper bound of the dynamic threshold.
        timestep_spacing: Kept for config compatibility (LCM always uses its own grid).
        timestep_scaling: Multiplier of ``t`` in the boundary scalings (10 in LCM).
        rescale_betas_zero_snr: Rescale betas to zero terminal SNR.
        sigma_data: Data standard deviation in the boundary scalings (0.5 in LCM).
        gamma: ``None`` for plain LCM sampling, or TCD's stochasticity ``gamma`` in ``[0, 1]`` (0: deterministic).
        sampling_contract: The :class:`lcm_kit.contract.SamplingContract` (as a dict) of the student this scheduler
            belongs to: ``LCMPipeline`` takes its default steps / timesteps from it. Not used by ``step``.
    """

    _compatibles = [
        "LCMScheduler",
        "TCDScheduler",
        "DDIMScheduler",
        "DDPMScheduler",
        "PNDMScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "LMSDiscreteScheduler",
        "HeunDiscreteScheduler",
        "UniPCMultistepScheduler",
    ]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: schedules.BetaSchedule = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: F.PredictionType = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
        sigma_data: float = 0.5,
        gamma: float | None = None,
        sampling_contract: dict | None = None,
    ) -> None:
        if prediction_type not in F.PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {F.PREDICTION_TYPES}, got {prediction_type!r}")
        if sampling_contract is not None:
            from .contract import SamplingContract

            SamplingContract.from_dict(sampling_contract)  # ValueError on a malformed contract
        if gamma is not None and not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be None (LCM) or in [0, 1] (TCD), got {gamma}")
        if original_inference_steps < 1 or original_inference_steps > num_train_timesteps:
            raise ValueError(
                f"original_inference_steps must be in [1, {num_train_timesteps}], got {original_inference_steps}"
            )
        betas = schedules.make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = schedules.alphas_cumprod_from_betas(betas)
        # the alpha of "t = -1" in DDIM's step; kept for API parity, LCM's step never uses it
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.long)
        self.custom_timesteps = False
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # ---- diffusers' plain helpers, reused as they are: step_index / begin_index (properties), set_begin_index,
    # index_for_timestep (a repeated first timestep starts from its second occurrence), previous_timestep (-1 after
    # the last step), scale_model_input (identity) and __len__ (num_train_timesteps).
    step_index = LCMScheduler.step_index
    begin_index = LCMScheduler.begin_index
    set_begin_index = LCMScheduler.set_begin_index
    index_for_timestep = LCMScheduler.index_for_timestep
    previous_timestep = LCMScheduler.previous_timestep
    scale_model_input = LCMScheduler.scale_model_input
    __len__ = LCMScheduler.__len__

    def _init_step_index(self, timestep: torch.Tensor | int) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        if int(timestep) not in self.timesteps.tolist():
            raise ValueError(f"timestep {int(timestep)} is not in the schedule {self.timesteps.tolist()}")
        self._step_index = self.index_for_timestep(int(timestep))

    def get_scalings_for_boundary_condition_discrete(self, timestep: int | torch.Tensor) -> tuple:
        """``(c_skip, c_out)`` at ``timestep`` (:func:`lcm_kit.functional.boundary_scalings`, LCM Eq. 9) with the
        config's ``sigma_data`` and ``timestep_scaling`` (diffusers' method always uses ``sigma_data = 0.5``)."""
        return F.boundary_scalings(timestep, self.config.sigma_data, self.config.timestep_scaling)

    # ---- schedule ---------------------------------------------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        strength: float = 1.0,
    ) -> None:
        """Sets the sampling schedule: ``num_inference_steps`` points of the skipping-step grid, or ``timesteps``.

        Args:
            num_inference_steps: Number of consistency steps (1-8 typical). Exclusive with ``timesteps``.
            device: Device of ``self.timesteps``.
            original_inference_steps: Size of the distillation grid (defaults to the config's, 50).
            timesteps: A custom descending schedule; points off the grid are accepted with a warning.
            strength: img2img strength in ``(0, 1]``; cuts the grid to its first ``strength`` fraction (so
                ``num_inference_steps`` steps are still run), or keeps the last ``strength`` fraction of custom
                ``timesteps``.
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        n_train = self.config.num_train_timesteps
        original = original_inference_steps or self.config.original_inference_steps
        if timesteps is not None:
            ts = schedules.check_custom_timesteps(timesteps, n_train, original)
            ts = schedules.strength_cut(ts, strength)
            self.custom_timesteps = True
        else:
            ts = schedules.lcm_inference_timesteps(num_inference_steps, n_train, original, strength)
            self.custom_timesteps = False
        self.timesteps = torch.from_numpy(ts).to(device=device, dtype=torch.long)
        self.num_inference_steps = len(ts)
        self._step_index = None
        self._begin_index = None

    # ---- one step ---------------------------------------------------------------------------------------------------
    def _postprocess_x0(self, pred_x0: torch.Tensor) -> torch.Tensor:
        if self.config.thresholding:
            return F.dynamic_threshold(pred_x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        if self.config.clip_sample:
            return pred_x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return pred_x0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> LCMKitSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One consistency step from ``timestep`` to the next point of the schedule.

        Args:
            model_output: UNet output at ``(sample, timestep)``, ``(B, C, H, W)``.
            timestep: The current timestep (an element of ``self.timesteps``).
            sample: The current noisy latent ``z_t``, ``(B, C, H, W)``.
            generator: RNG for the fresh noise of the re-noising.
            return_dict: Return an :class:`LCMKitSchedulerOutput` rather than a tuple.

        Returns:
            ``(prev_sample, denoised)``.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        t = int(timestep)
        is_last = self._step_index >= len(self.timesteps) - 1
        ac = self.alphas_cumprod
        alpha_t, sigma_t = schedules.alpha_sigma(ac, t)
        pred_x0, pred_eps = F.predict_x0_eps(model_output, sample, alpha_t, sigma_t, self.config.prediction_type)
        gamma = self.config.gamma
        if gamma is None:
            c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(t)
            denoised = F.consistency_output(sample, self._postprocess_x0(pred_x0), c_skip, c_out)
            t_next, t_from = (None if is_last else int(self.timesteps[self._step_index + 1])), None
        else:
            t_next = 0 if is_last else int(self.timesteps[self._step_index + 1])
            t_from = int(np.floor((1 - gamma) * t_next))
            denoised = F.diffuse(pred_x0, pred_eps, *schedules.alpha_sigma(ac, t_from))
        if is_last or t_from == t_next:  # last step, or TCD with gamma = 0 (x_s is already at t')
            prev_sample = denoised
        else:
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=denoised.dtype
            )
            # forward diffusion from t_from (x0 itself when None) to t_next: ratio of the cumulative alphas.
            ratio = ac[t_next] / (ac[t_from] if t_from is not None else 1.0)
            prev_sample = F.diffuse(denoised, noise, ratio.sqrt(), (1 - ratio).sqrt())
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return LCMKitSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    # ---- training-time helpers --------------------------------------------------------------------------------------
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward noising ``z_t = alpha_t x0 + sigma_t eps`` (LCM Eq. 1) at per-sample ``timesteps`` ``(B,)``."""
        ac = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
        alpha, sigma = schedules.alpha_sigma(ac, timesteps.to(original_samples.device))
        return F.diffuse(original_samples, noise, alpha, sigma)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``v = alpha_t eps - sigma_t x0`` (Salimans & Ho 2022, Eq. 10)."""
        ac = self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
        alpha, sigma = schedules.alpha_sigma(ac, timesteps.to(sample.device))
        return F.diffuse(noise, sample, alpha, -sigma)
