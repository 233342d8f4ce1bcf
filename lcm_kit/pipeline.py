"""``LCMPipeline``: few-step text-to-image and image-to-image sampling with a Latent Consistency Model.

Works with an LCM UNet (``unet.config.time_cond_proj_dim`` set: guidance enters as a ``w`` embedding, one UNet pass
a step) and with a plain SD1.x/2.x UNet plus an LCM-LoRA (classic classifier-free guidance, cond and uncond in one
batched pass, only when ``guidance_scale > 1``); :class:`lcm_kit.guidance.Guidance` makes that decision once per
call. Each step is :meth:`LCMKitScheduler.step` (LCM Algorithm 3); all formulas come from :mod:`lcm_kit.functional`.
Argument checks, defaults and image conversion are in :mod:`lcm_kit.pipeline_inputs` (all run before any model);
VAE encoding / decoding and the save format in :mod:`lcm_kit.pipeline_utils`.
Noise is drawn in the same order as diffusers' LCM pipelines, so the same seed gives the same images.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.loaders import FromSingleFileMixin, TextualInversionLoaderMixin
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput, StableDiffusionSafetyChecker
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from . import functional as F
from . import guidance as G
from . import pipeline_inputs as inputs
from . import pipeline_utils as U
from .contract import ContractLoraLoaderMixin
from .loading import checked_pipeline_kwargs
from .scheduler import LCMKitScheduler

OutputType = Literal["pil", "np", "pt", "latent"]


class LCMPipeline(
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    ContractLoraLoaderMixin,
    FromSingleFileMixin,
):
    """Latent Consistency Model sampling for SD1.x/2.x folders: text-to-image, and image-to-image with ``image=``.

    Args:
        vae: The SD autoencoder.
        text_encoder: CLIP text encoder.
        tokenizer: CLIP tokenizer.
        unet: An LCM UNet (with ``time_cond_proj_dim``) or a plain SD UNet (LCM-LoRA).
        scheduler: An :class:`LCMKitScheduler`; any other scheduler is replaced by
            ``LCMKitScheduler.from_config(scheduler.config)`` (same betas and prediction type).
        safety_checker: Optional SD safety checker (needs ``feature_extractor``).
        feature_extractor: Optional CLIP image processor for the safety checker.
        image_encoder: Optional CLIP vision model, kept when an SD folder lists one (IP-Adapter is not used here).
        requires_safety_checker: Stored in the config, as in diffusers' SD pipelines.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "denoised", "prompt_embeds", "negative_prompt_embeds", "w_embedding"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        requires_safety_checker: bool = True,
    ) -> None:
        super().__init__()
        if safety_checker is not None and feature_extractor is None:
            raise ValueError("a safety_checker needs a feature_extractor; pass safety_checker=None to disable it")
        if not isinstance(scheduler, LCMKitScheduler):
            scheduler = LCMKitScheduler.from_config(scheduler.config)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ---- loading and saving -----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> LCMPipeline:
        """Loads any SD1.x/2.x diffusers folder (or one saved by :meth:`save_pretrained`).

        Unless ``scheduler=`` is passed, the folder's scheduler config (DDPM, PNDM, DDIM, LCM ...) is read and an
        :class:`LCMKitScheduler` is built from it with ``from_config``: betas, ``prediction_type`` and SD's
        ``set_alpha_to_one: false`` carry over, and so do ``sigma_data`` / ``gamma`` of a folder we saved. Other
        keyword arguments are those of ``DiffusionPipeline.from_pretrained``. :mod:`lcm_kit.loading` checks the folder.
        """
        kwargs = checked_pipeline_kwargs(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs: Any):
        """Saves a folder that loads both with :meth:`from_pretrained` and in stock diffusers.

        ``model_index.json`` names ``LatentConsistencyModelPipeline`` when the UNet has ``time_cond_proj_dim``, else
        ``StableDiffusionPipeline``; the scheduler is saved as diffusers' ``LCMScheduler`` with our extra keys
        (``sigma_data``, ``gamma``) kept in its config. ``push_to_hub`` is not supported (save, then upload).
        """
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub=True is not supported: save the folder, then upload it")
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        U.write_stock_diffusers_index(save_directory, self.has_w_embedding)

    # ---- properties -------------------------------------------------------------------------------------------------
    @property
    def has_w_embedding(self) -> bool:
        """Whether the UNet takes the guidance strength as an embedding (an LCM UNet) rather than needing CFG."""
        return G.has_w_embedding(self.unet.config)

    def default_guidance_scale(self) -> float:
        """8.5 for an LCM UNet (diffusers' LCM default, ``w = 7.5``); 1.0 (no CFG, one pass a step) otherwise."""
        return G.default_guidance_scale(self.unet.config)

    # ---- call -------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput | None = None,
        strength: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: OutputType = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> StableDiffusionPipelineOutput | tuple:
        """Generates images in ``num_inference_steps`` consistency steps.

        Image-to-image: pass ``image`` and ``strength``. We follow diffusers' LCM img2img meaning: the skipping-step
        grid of ``original_inference_steps`` points is cut to its first ``strength`` fraction and
        ``num_inference_steps`` steps are taken on it, so ``num_inference_steps`` UNet passes always run (at strength
        0.5, 4 steps are ``[499, 379, 259, 139]``). SD img2img with an LCMScheduler instead drops steps (2 of 4 at
        strength 0.5).

        Args:
            prompt: Text prompt(s); exclusive with ``prompt_embeds``.
            image: Init image(s), 1, one per prompt or one per output image: PIL, numpy ``(H, W, 3)`` / ``(B, H, W,
                3)`` in [0, 1], a tensor ``(B, 3, H, W)``, or a list (conversions: :mod:`lcm_kit.pipeline_inputs`).
            strength: How much of the schedule is re-run on ``image``, in ``(0, 1]``; 0.8 if ``image`` is given
                without it. Passing it without ``image`` is an error.
            height: Output height in pixels, a multiple of ``vae_scale_factor``; defaults to the UNet sample size
                (text-to-image) or the image's height (image-to-image).
            width: Output width, as ``height``.
            num_inference_steps: Number of consistency steps (= UNet passes). Ignored with ``timesteps``. Default: the
                sampling contract of a distilled student (its steps, or a phased student's fixed ``timesteps``,
                :mod:`lcm_kit.contract`), else 4.
            original_inference_steps: Size of the skipping-step grid (the scheduler config's, 50, if omitted).
            timesteps: Custom descending timesteps (off-grid values are accepted with a warning).
            guidance_scale: Guidance in the usual convention (``w = guidance_scale - 1``). Defaults to 8.5 for an LCM
                UNet (fed as the ``w`` embedding, one pass a step; ``negative_prompt`` has no effect there and warns)
                and to 1.0 for a plain UNet (no CFG; a ``negative_prompt`` warns); above 1 a plain UNet runs CFG with
                ``negative_prompt``, cond and uncond batched in one UNet call.
            negative_prompt: Prompt(s) for the unconditional branch of CFG (plain UNet, ``guidance_scale > 1``).
            num_images_per_prompt: Images per prompt.
            generator: RNG(s), one per output image if a list; draws initial noise, then the VAE sample (img2img),
                then each step's re-noising, in diffusers' order.
            latents: Initial latents ``(B * num_images_per_prompt, C, h, w)``, the noisy ``z`` at the first timestep
                (also for image-to-image, where ``image`` is then not encoded).
            prompt_embeds: Precomputed text embeddings ``(B, L, D)``.
            negative_prompt_embeds: Precomputed negative text embeddings ``(B, L, D)``.
            output_type: ``"pil"``, ``"np"`` (``(N, H, W, 3)`` in [0, 1]), ``"pt"`` (``(N, 3, H, W)``) or
                ``"latent"`` (the last ``denoised``, ``(N, C, h, w)``).
            return_dict: Return a ``StableDiffusionPipelineOutput`` rather than ``(images, nsfw)``.
            cross_attention_kwargs: Passed to the UNet's attention processors (``scale`` also scales text-encoder
                LoRA).
            clip_skip: Number of final CLIP layers to skip.
            callback_on_step_end: ``f(pipe, i, t, tensors) -> dict`` called after each step; returned tensors among
                ``_callback_tensor_inputs`` replace the pipeline's.
            callback_on_step_end_tensor_inputs: Names of the tensors passed to the callback (default ``["latents"]``).

        Returns:
            ``StableDiffusionPipelineOutput(images, nsfw_content_detected)`` (or the tuple); the decoded image is the
            last step's ``denoised``, as in diffusers' LCM pipelines.
        """
        guidance, args = inputs.start_call(
            self, guidance_scale, num_inference_steps, original_inference_steps, timesteps, cross_attention_kwargs,
            prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, image=image, strength=strength, height=height, width=width,
            latents=latents, num_images_per_prompt=num_images_per_prompt, generator=generator, output_type=output_type,
            callback=callback_on_step_end, callback_inputs=callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        batch_size, height, width, strength, cb_inputs, image = args
        device = self._execution_device
        cond, uncond = self._encode_text(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt, guidance, clip_skip,
            device,
        )  # fmt: skip
        total = batch_size * num_images_per_prompt
        if latents is None:
            latents = U.initial_latents(self, image, total, num_images_per_prompt, height, width, cond, generator)
        w_embedding = guidance.embedding(total)
        state = {
            "latents": latents.to(device=device, dtype=cond.dtype),
            "denoised": None,
            "prompt_embeds": cond,
            "negative_prompt_embeds": uncond,
            "w_embedding": None if w_embedding is None else w_embedding.to(device=device, dtype=cond.dtype),
        }
        denoised = self._denoise(state, guidance.w, generator, callback_on_step_end, cb_inputs)
        images, nsfw = U.decode_output(self, denoised, output_type, device, cond.dtype)
        self.maybe_free_model_hooks()
        output = StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw)
        return output if return_dict else (images, nsfw)

    # ---- steps of __call__ ------------------------------------------------------------------------------------------
    def _encode_text(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
                     guidance: G.Guidance, clip_skip, device) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """``(cond, uncond)`` embeddings ``(B * num_images_per_prompt, L, D)``; ``uncond`` is ``None`` unless CFG."""
        do_cfg = guidance.do_cfg
        guidance.warn_if_negative_unused(negative_prompt is not None or negative_prompt_embeds is not None, 3)
        if isinstance(prompt, list) and isinstance(negative_prompt, str):  # one negative prompt for all prompts
            negative_prompt = [negative_prompt] * len(prompt)
        lora_scale = (self._cross_attention_kwargs or {}).get("scale")
        # diffusers' SD prompt encoding (textual inversion, LoRA scale of the text encoder, clip_skip), reused as is.
        cond, uncond = StableDiffusionPipeline.encode_prompt(
            self, prompt, device, num_images_per_prompt, do_cfg, negative_prompt if do_cfg else None, prompt_embeds,
            negative_prompt_embeds if do_cfg else None, lora_scale=lora_scale, clip_skip=clip_skip,
        )  # fmt: skip
        # the UNet's dtype rules the loop (a bf16 text encoder beside an fp32 UNet is common in training validation)
        dtype = self.unet.dtype
        return cond.to(dtype), (uncond.to(dtype) if do_cfg else None)

    def _model_output(self, state: dict[str, torch.Tensor | None], t: torch.Tensor, w: float) -> torch.Tensor:
        """One UNet call: conditional only, or ``[uncond, cond]`` batched and combined by :func:`F.cfg_combine`."""
        latents, cond, uncond = state["latents"], state["prompt_embeds"], state["negative_prompt_embeds"]
        kwargs = dict(
            timestep_cond=state["w_embedding"], cross_attention_kwargs=self._cross_attention_kwargs, return_dict=False
        )
        if "add_time_ids" in state:  # LCMXLPipeline: SDXL's pooled text embeddings and size ids, batched as the call
            kwargs["added_cond_kwargs"] = {"text_embeds": state["add_text_embeds"], "time_ids": state["add_time_ids"]}
        if uncond is None:
            return self.unet(self.scheduler.scale_model_input(latents, t), t, encoder_hidden_states=cond, **kwargs)[0]
        both = self.scheduler.scale_model_input(torch.cat([latents, latents]), t)
        out = self.unet(both, t, encoder_hidden_states=torch.cat([uncond, cond]), **kwargs)[0]
        out_uncond, out_cond = out.chunk(2)
        return F.cfg_combine(out_cond, out_uncond, w)

    def _denoise(self, state: dict, w: float, generator, callback, cb_inputs: list[str]) -> torch.Tensor:
        """The LCM sampling loop (LCM Algorithm 3); returns the last step's ``denoised``."""
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                model_output = self._model_output(state, t, w)
                state["latents"], state["denoised"] = self.scheduler.step(
                    model_output, t, state["latents"], generator=generator, return_dict=False
                )
                if callback is not None:
                    outputs = callback(self, i, t, {k: state[k] for k in cb_inputs}) or {}
                    state.update({k: v for k, v in outputs.items() if k in state})
                progress_bar.update()
        return state["denoised"]


__all__ = ["LCMPipeline", "OutputType"]
