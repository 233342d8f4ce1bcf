"""``LCMEditPipeline``: training-free editing with a consistency model (Song et al. 2023, Consistency Models,
arXiv:2303.01469, Algorithm 4): inpainting, super-resolution, colorization and interpolation in 1-4 steps.

One constrained consistency loop serves every task: it is :class:`lcm_kit.LCMPipeline`'s own loop (same guidance,
sampling contract, generators, progress bar and callbacks), and after each step the clean estimate is projected onto
the constraint and the re-noised sample is moved with it, so the whole sample is re-noised with one fresh noise draw
(:func:`lcm_kit.functional.reproject_renoised`). The constraint operators are :mod:`lcm_kit.constraints`; each step
projects through the VAE (decode, project the pixels, encode). The returned image is projected once
more, exactly, in pixel space (``exact_projection=True``, the default): known pixels unchanged, box means equal to
the low-resolution input, luma equal to the grey input, within 1/255 after 8-bit rounding. Interpolation slerps the
initial noise (and the text embeddings between two prompts) and shares each step's fresh noise across frames.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from . import edit_inputs as EI
from . import functional as F
from . import guidance as G
from . import pipeline_inputs as PI
from . import pipeline_utils as U
from . import schedules
from .constraints import Colorization, Constraint, Inpaint, SuperResolution, vae_encode
from .contract import call_schedule
from .pipeline import LCMPipeline, OutputType

Callback = Callable[..., dict[str, Any]] | PipelineCallback | MultiPipelineCallbacks


class LCMEditPipeline(LCMPipeline):
    """Zero-shot editing with any student :class:`LCMPipeline` runs (a full LCM with a w-embedding, or a teacher
    with an LCM-LoRA, with or without CFG). Load it like ``LCMPipeline`` (``from_pretrained``, ``load_lora_weights``)
    or share a loaded pipeline's components with ``LCMEditPipeline.from_pipe(pipe)``; calling it is text-to-image.

    Every edit method takes ``prompt`` and the sampling arguments of :meth:`LCMPipeline.__call__` as keywords
    (``num_inference_steps`` = UNet passes, CFG batching cond and uncond in one pass; ``guidance_scale``,
    ``negative_prompt``, ``num_images_per_prompt``, ``generator``, ``latents``, ``prompt_embeds``, ``timesteps``,
    ``cross_attention_kwargs``, ``clip_skip``), and ``output_type``, ``return_dict``, ``callback_on_step_end`` (it
    sees the projected ``latents`` / ``denoised``). ``strength=None`` (default) starts from pure noise (CM Algorithm
    4); a ``strength`` in (0, 1] starts from the task's initial guess noised to the first of the cut schedule, as
    LCM image-to-image does. ``exact_projection=False`` returns the decoded last estimate without the final
    pixel-space projection (its constraint then holds only as well as the VAE reproduces it);
    ``output_type="latent"`` returns the last step's projected latents (the exact projection needs pixels).
    """

    # ---- the four tasks -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def inpaint(self, prompt: str | list[str] | None = None, image: PipelineImageInput = None,
                mask_image: PipelineImageInput = None, strength: float | None = None, exact_projection: bool = True,
                latent_projection: bool = False, **kwargs: Any) -> StableDiffusionPipelineOutput | tuple:  # fmt: skip
        """Repaints the white part of ``mask_image`` (diffusers' convention: 1 = repaint, 0 = keep).

        Args:
            prompt: Text prompt(s).
            image: The image(s) to edit (PIL, numpy in [0, 1], tensors in [0, 1]); height and width multiples of
                ``vae_scale_factor``. Its known pixels are the returned image's, exactly.
            mask_image: Same size; PIL, numpy ``(H, W)`` / ``(B, H, W)``, tensor ``(B, 1, H, W)`` in [0, 1],
                binarized at 0.5. An all-white mask is the identity constraint: text-to-image, bit for bit.
            strength: ``None``: start from noise; else start from ``image`` with the repainted pixels set to grey
                (0 in [-1, 1], CM Algorithm 4's initial ``y``), noised.
            exact_projection: Paste the known pixels into the decoded output.
            latent_projection: Project each step in latent space (paste the encoded image's latents where a whole
                latent cell is known: no VAE pass, but the decoder mixes the cells, so the known pixels drift) instead
                of through the VAE (decode, paste the known pixels, encode; the default). An all-white mask skips
                the projection either way (the identity).
            **kwargs: As :meth:`LCMPipeline.__call__` (see the class docstring).
        """
        known = EI.to_pixels(self.image_processor, image, "image", self.vae_scale_factor)
        mask = EI.to_mask(mask_image, tuple(known.shape[-2:]))
        if mask.shape[0] != known.shape[0] and 1 not in (mask.shape[0], known.shape[0]):
            raise ValueError(f"got {mask.shape[0]} mask_image(s) for {known.shape[0]} image(s); pass 1 or as many")
        n = max(mask.shape[0], known.shape[0])
        known, mask = (x.expand(n, *x.shape[1:]).to(self._execution_device) for x in (known, mask))
        constraint = Inpaint.build(known, mask, self.vae, self.vae_scale_factor, latent_projection)
        guess = F.project_known(torch.zeros_like(known), known, mask)  # CM Algorithm 4: the unknown pixels are 0
        return self._edit(constraint, guess, prompt, strength, exact_projection, **kwargs)

    @torch.no_grad()
    def super_resolve(self, prompt: str | list[str] | None = None, image: PipelineImageInput = None,
                      scale_factor: int = 4, strength: float | None = None, exact_projection: bool = True,
                      height: int | None = None, width: int | None = None,
                      **kwargs: Any) -> StableDiffusionPipelineOutput | tuple:  # fmt: skip
        """An image ``scale_factor`` times larger whose ``scale_factor x scale_factor`` box means equal ``image``.

        Args:
            prompt: Text prompt(s).
            image: The low-resolution image(s) (PIL, numpy or tensors in [0, 1]), any size.
            scale_factor: Integer upscaling factor; the output size must be a multiple of ``vae_scale_factor``.
            strength: ``None``: start from noise; else from the bicubic upsampling of ``image``, noised (SDEdit).
            exact_projection: Shift each output block to its low-resolution pixel (then fit it into range).
            height: Output height (default ``scale_factor`` x the input's); must be that if given.
            width: Output width, as ``height``.
            **kwargs: As :meth:`LCMPipeline.__call__` (see the class docstring).
        """
        size = EI.output_size(EI.image_size(image, "image"), scale_factor, height, width, self.vae_scale_factor)
        low = EI.to_pixels(self.image_processor, image, "image", 1).to(self._execution_device)
        guess = torch.nn.functional.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
        return self._edit(SuperResolution(low, scale_factor), guess, prompt, strength, exact_projection, **kwargs)

    @torch.no_grad()
    def colorize(self, prompt: str | list[str] | None = None, image: PipelineImageInput = None,
                 strength: float | None = None, exact_projection: bool = True,
                 **kwargs: Any) -> StableDiffusionPipelineOutput | tuple:  # fmt: skip
        """Colours a greyscale image: the output's ITU-R 601 luma (PIL's ``convert("L")``) equals ``image``.

        Args:
            prompt: Text prompt(s).
            image: Greyscale image(s): PIL mode ``L``, 1-channel numpy / tensors in [0, 1], or RGB with equal
                channels; a colour image is a ``ValueError``.
            strength: ``None``: start from noise; else from the grey image, noised.
            exact_projection: Set each output pixel's luma to the input's (the nearest colour, then fit into range).
            **kwargs: As :meth:`LCMPipeline.__call__` (see the class docstring).
        """
        grey = EI.to_grey(self.image_processor, image, self.vae_scale_factor).to(self._execution_device)
        return self._edit(Colorization(grey), grey.expand(-1, 3, -1, -1), prompt, strength, exact_projection, **kwargs)

    @torch.no_grad()
    def interpolate(self, prompt: str | list[str], num_frames: int = 8, image: list[PipelineImageInput] | None = None,
                    strength: float | None = None, negative_prompt: str | None = None,
                    generator: torch.Generator | None = None, clip_skip: int | None = None,
                    cross_attention_kwargs: dict[str, Any] | None = None,
                    **kwargs: Any) -> StableDiffusionPipelineOutput | tuple:  # fmt: skip
        """``num_frames`` images between two ends: the initial noises of the ends (drawn from ``generator``, or
        the two encoded ``image`` ends noised with them) and the text embeddings of two prompts are slerped
        (:func:`lcm_kit.functional.slerp`, per token for the embeddings); all frames share each step's fresh noise.

        Args:
            prompt: One prompt, or two (the ends).
            num_frames: Frames, ends included (>= 2).
            image: ``None`` (text ends), or two images (the ends; ``strength`` defaults to 0.8 then).
            strength: With ``image``: how much of the schedule is re-run from the slerped image latents.
            negative_prompt: One negative prompt for all frames (CFG only).
            generator: One generator (a list is a ``ValueError``): the two end noises, then a seed for the shared
                per-step noise.
            clip_skip: As :meth:`LCMPipeline.__call__`.
            cross_attention_kwargs: As :meth:`LCMPipeline.__call__`.
            **kwargs: As :meth:`LCMPipeline.__call__`, but ``num_images_per_prompt`` is 1.
        """
        prompts = EI.check_interpolation(prompt, image, num_frames)
        if isinstance(generator, list):
            raise ValueError("generator: interpolate takes one torch.Generator (the frames share their noise)")
        device, fractions = self._execution_device, torch.linspace(0, 1, num_frames).tolist()
        self._cross_attention_kwargs = cross_attention_kwargs
        cond, _ = self._encode_text(prompts, None, None, None, 1, G.Guidance("none", 1.0), clip_skip, device)
        embeds = torch.stack([F.slerp(cond[0], cond[-1], f, dim=-1) for f in fractions])
        ends, h, w = self._interpolation_ends(image, kwargs)
        shape = (2, self.unet.config.in_channels, h // self.vae_scale_factor, w // self.vae_scale_factor)
        noise_ends = randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype)
        latents = torch.stack([F.slerp(noise_ends[0], noise_ends[1], f) for f in fractions])
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        generators = [torch.Generator(generator.device if generator else "cpu").manual_seed(seed) for _ in fractions]
        if ends is not None:
            strength = PI.DEFAULT_STRENGTH if strength is None else strength
            kwargs["image"] = torch.stack([F.slerp(ends[0], ends[1], f) for f in fractions])
            latents = self.scheduler.add_noise(kwargs["image"], latents, self._first_timestep(strength, kwargs))
        negative = None if negative_prompt is None else [negative_prompt] * num_frames
        return LCMPipeline.__call__(
            self, prompt_embeds=embeds, negative_prompt=negative, strength=strength, generator=generators,
            latents=latents, height=h, width=w, clip_skip=clip_skip, cross_attention_kwargs=cross_attention_kwargs,
            **kwargs,
        )  # fmt: skip

    def _interpolation_ends(self, image: list | None, kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, int, int]:
        """The two encoded image ends ``(2, C, h, w)`` (``None`` without images) and the output height and width
        (the images', else ``height`` / ``width`` popped from ``kwargs``, else the UNet sample size)."""
        if image is None:
            default = self.unet.config.sample_size * self.vae_scale_factor
            return None, kwargs.pop("height", None) or default, kwargs.pop("width", None) or default
        first, last = (EI.to_pixels(self.image_processor, im, "image", self.vae_scale_factor) for im in image)
        if first.shape != last.shape:
            raise ValueError(f"image: the two ends must have the same size, got {tuple(first.shape[-2:])} and "
                             f"{tuple(last.shape[-2:])}")  # fmt: skip
        ends = vae_encode(self.vae, torch.cat([first, last]).to(self._execution_device)).to(self.unet.dtype)
        return ends, first.shape[-2], first.shape[-1]

    # ---- the shared loop ----------------------------------------------------------------------------------------
    def _edit(self, constraint: Constraint, guess: torch.Tensor, prompt: Any, strength: float | None,
              exact_projection: bool, output_type: OutputType = "pil", return_dict: bool = True,
              callback_on_step_end: Callback | None = None,
              callback_on_step_end_tensor_inputs: list[str] | None = None,
              **kwargs: Any) -> StableDiffusionPipelineOutput | tuple:  # fmt: skip
        """LCMPipeline's loop with ``constraint`` projected after each step, then decoded and projected exactly.

        ``guess`` ``(n, 3, H, W)`` in [-1, 1] is the initial guess used with ``strength`` (encoded, noised by
        LCMPipeline's image-to-image path) and gives the output size.
        """
        if self.scheduler.config.gamma is not None:
            gamma = self.scheduler.config.gamma
            raise ValueError(f"LCMEditPipeline needs plain LCM sampling, but the scheduler has gamma={gamma} "
                             "(TCD); set pipe.scheduler to one with gamma=None")  # fmt: skip
        PI.check_prompt_args(prompt, kwargs.get("negative_prompt"), kwargs.get("prompt_embeds"),
                             kwargs.get("negative_prompt_embeds"), self.unet.config)  # fmt: skip
        constraint = constraint.expand(PI.batch_size_of(prompt, kwargs.get("prompt_embeds")),
                                       kwargs.get("num_images_per_prompt", 1))  # fmt: skip
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        user_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
        step_end = self._projecting_callback(constraint, callback_on_step_end, user_inputs)
        init = None if strength is None else vae_encode(self.vae, guess).to(self.unet.dtype)
        denoised, _ = LCMPipeline.__call__(
            self, prompt=prompt, image=init, strength=strength, height=guess.shape[-2], width=guess.shape[-1],
            output_type="latent", return_dict=False, callback_on_step_end=step_end,
            callback_on_step_end_tensor_inputs=sorted({"latents", "denoised", *user_inputs}), **kwargs,
        )  # fmt: skip
        project = constraint.pixels if exact_projection else None
        images, nsfw = U.decode_output(self, denoised, output_type, self._execution_device, self.unet.dtype, project)
        self.maybe_free_model_hooks()
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw) if return_dict else (
            images, nsfw)  # fmt: skip

    def _projecting_callback(self, constraint: Constraint, user_callback: Callback | None,
                             user_inputs: list[str]) -> Callable[..., dict[str, Any]]:  # fmt: skip
        """The step-end hook of the loop: projects ``denoised`` (CM Algorithm 4), moves the re-noised ``latents``
        with it (same noise), then calls the user's callback on the projected tensors. The last step is projected
        too (measured on the emoji students: the decoded image then agrees better with the constraint before the
        exact pixel projection, e.g. colorization FID-emoji 92 -> 83 at 2 steps)."""

        def step_end(pipe: LCMEditPipeline, i: int, t: torch.Tensor, tensors: dict[str, Any]) -> dict[str, Any]:
            timesteps, ac = pipe.scheduler.timesteps, pipe.scheduler.alphas_cumprod
            last = i == len(timesteps) - 1
            projected = constraint.latents(tensors["denoised"], pipe.vae)
            alpha_next = 1.0 if last else float(schedules.alpha_sigma(ac, int(timesteps[i + 1]))[0])
            tensors["latents"] = F.reproject_renoised(tensors["latents"], tensors["denoised"], projected, alpha_next)
            tensors["denoised"] = projected
            if user_callback is not None:
                tensors.update(user_callback(pipe, i, t, {k: tensors[k] for k in user_inputs}) or {})
            return tensors

        return step_end

    def _first_timestep(self, strength: float, kwargs: dict[str, Any]) -> torch.Tensor:
        """The first timestep ``(1,)`` of the schedule a call with these arguments runs (sets the schedule)."""
        steps, timesteps = call_schedule(self.scheduler, kwargs.get("num_inference_steps"), kwargs.get("timesteps"))
        self.scheduler.set_timesteps(None if timesteps is not None else steps, self._execution_device,
                                     kwargs.get("original_inference_steps"), timesteps, strength)  # fmt: skip
        return self.scheduler.timesteps[:1]


__all__ = ["LCMEditPipeline"]
