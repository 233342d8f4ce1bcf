"""``LCMXLPipeline``: few-step SDXL text-to-image and image-to-image sampling with a Latent Consistency Model.

A :class:`diffusers.StableDiffusionXLPipeline` whose ``__call__`` is :class:`lcm_kit.LCMPipeline`'s: the same
:class:`lcm_kit.guidance.Guidance` decision (an LCM-SDXL UNet with a w-embedding: one pass a step; a plain SDXL UNet
with an LCM-LoRA: no CFG, or cond and uncond batched in one call), the same argument checks
(:mod:`lcm_kit.pipeline_inputs`), the same :class:`LCMKitScheduler` loop and noise order. What SDXL adds comes from
diffusers' SDXL pipeline, reused as is: ``encode_prompt`` (two text encoders, penultimate hidden states concatenated,
the pooled embedding of the second, zeroed unconditional embeddings with ``force_zeros_for_empty_prompt``),
``_get_add_time_ids`` (original size, crop offsets, target size), ``from_pretrained`` / ``from_pipe`` /
``from_single_file`` and SDXL's ``load_lora_weights`` (plus the sampling contract of a distilled LoRA). An fp16 VAE
whose config sets ``force_upcast`` encodes and decodes in fp32 (:func:`lcm_kit.pipeline_utils.vae_upcast`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipeline, StableDiffusionXLPipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from . import pipeline_inputs as inputs
from . import pipeline_utils as U
from . import pipeline_xl_inputs as xl_inputs
from .contract import ContractLoading
from .loading import checked_pipeline_kwargs
from .pipeline import LCMPipeline, OutputType
from .scheduler import LCMKitScheduler

Size = tuple[int, int]


class LCMXLPipeline(ContractLoading, StableDiffusionXLPipeline):
    """Latent Consistency Model sampling for SDXL folders: text-to-image, and image-to-image with ``image=``.

    Args:
        vae: The SDXL autoencoder (``force_upcast`` in its config: fp16 weights run in fp32).
        text_encoder: The first CLIP text encoder.
        text_encoder_2: The second CLIP text encoder, with projection (gives the pooled embedding).
        tokenizer: Tokenizer of ``text_encoder``.
        tokenizer_2: Tokenizer of ``text_encoder_2``.
        unet: An LCM-SDXL UNet (with ``time_cond_proj_dim``) or a plain SDXL UNet (LCM-LoRA).
        scheduler: An :class:`LCMKitScheduler`; any other scheduler is replaced by
            ``LCMKitScheduler.from_config(scheduler.config)`` (same betas and prediction type).
        image_encoder: Optional CLIP vision model, kept when a folder lists one (IP-Adapter is not used here).
        feature_extractor: Optional CLIP image processor, kept likewise.
        force_zeros_for_empty_prompt: SDXL's rule: without a negative prompt, CFG's unconditional embeddings are zeros.
        add_watermarker: Apply SDXL's invisible watermark (default: when ``invisible-watermark`` is installed).
    """

    _callback_tensor_inputs = ["latents", "denoised", "prompt_embeds", "negative_prompt_embeds", "w_embedding",
                               "add_text_embeds", "add_time_ids"]  # fmt: skip

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ) -> None:
        if vae is not None and getattr(vae.config, "latents_mean", None) is not None:
            raise ValueError("vae: LCMXLPipeline does not support a VAE with latents_mean / latents_std in its config")
        if not isinstance(scheduler, LCMKitScheduler):
            scheduler = LCMKitScheduler.from_config(scheduler.config)
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
                         feature_extractor, force_zeros_for_empty_prompt, add_watermarker)  # fmt: skip

    # ---- loading and saving -----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> LCMXLPipeline:
        """Loads an SDXL diffusers folder (or one saved by :meth:`save_pretrained`); the scheduler as in
        :meth:`LCMPipeline.from_pretrained` (the folder's Euler config read into an :class:`LCMKitScheduler`).

        Raises:
            ValueError: If the folder is not an SDXL folder (an SD 1.x/2.x one: use ``LCMPipeline``), read from its
                JSON configs before any weights load; or if a UNet, VAE or text encoder weight does not load
                (:mod:`lcm_kit.loading`).
        """
        kwargs = checked_pipeline_kwargs(pretrained_model_name_or_path, kwargs, sdxl=True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs: Any):
        """Saves a folder that loads with :meth:`from_pretrained` and in stock diffusers' ``StableDiffusionXLPipeline``
        (which runs an LCM-SDXL UNet's w-embedding itself), with the scheduler saved as ``LCMScheduler``."""
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub=True is not supported: save the folder, then upload it")
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        U.write_stock_diffusers_index(save_directory, self.has_w_embedding, "StableDiffusionXLPipeline")

    has_w_embedding = LCMPipeline.has_w_embedding
    default_guidance_scale = LCMPipeline.default_guidance_scale

    # ---- call -------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: PipelineImageInput | None = None,
        strength: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: OutputType = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
        target_size: Size | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> StableDiffusionXLPipelineOutput | tuple:
        """Generates images in ``num_inference_steps`` consistency steps; the arguments shared with
        :meth:`LCMPipeline.__call__` mean the same (image-to-image included: ``num_inference_steps`` steps on the
        ``strength``-cut grid), defaults included (guidance 8.5 with a w-embedding, else 1.0).

        Args:
            prompt_2: Prompt(s) for ``tokenizer_2`` / ``text_encoder_2`` (``prompt`` if omitted), as in diffusers.
            negative_prompt_2: Negative prompt(s) for the second encoder (``negative_prompt`` if omitted).
            pooled_prompt_embeds: ``(B, projection_dim)``, required with ``prompt_embeds``.
            negative_pooled_prompt_embeds: Required with ``negative_prompt_embeds``.
            original_size: SDXL size conditioning ``(height, width)``; the output size if omitted.
            crops_coords_top_left: SDXL crop conditioning ``(top, left)``.
            target_size: SDXL target-size conditioning; the output size if omitted.

        Returns:
            ``StableDiffusionXLPipelineOutput(images)`` or ``(images,)``; the image is the last step's ``denoised``.
        """
        guidance, args = inputs.start_call(
            self, guidance_scale, num_inference_steps, original_inference_steps, timesteps, cross_attention_kwargs,
            prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, image=image, strength=strength, height=height, width=width,
            latents=latents, num_images_per_prompt=num_images_per_prompt, generator=generator, output_type=output_type,
            callback=callback_on_step_end, callback_inputs=callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        batch_size, height, width, strength, cb_inputs, image = args
        xl_inputs.check_xl_args(prompt_2, negative_prompt_2, prompt_embeds, pooled_prompt_embeds,
                                negative_prompt_embeds, negative_pooled_prompt_embeds, batch_size)  # fmt: skip
        device = self._execution_device
        guidance.warn_if_negative_unused(negative_prompt is not None or negative_prompt_embeds is not None, 3)
        text = self._encode_text(
            (prompt, prompt_2, negative_prompt, negative_prompt_2),
            (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds),
            num_images_per_prompt, guidance.do_cfg, clip_skip, device,
        )  # fmt: skip
        total = batch_size * num_images_per_prompt
        cond = text["prompt_embeds"]
        sizes = (original_size or (height, width), tuple(crops_coords_top_left), target_size or (height, width))
        text["add_time_ids"] = self._time_ids(sizes, text["add_text_embeds"], total, guidance.do_cfg)
        if latents is None:
            with U.vae_upcast(self.vae):
                latents = U.initial_latents(self, image, total, num_images_per_prompt, height, width, cond, generator)
        w_embedding = guidance.embedding(total)
        state = {
            "latents": latents.to(device=device, dtype=cond.dtype),
            "denoised": None,
            "w_embedding": None if w_embedding is None else w_embedding.to(device=device, dtype=cond.dtype),
            **text,
        }
        denoised = self._denoise(state, guidance.w, generator, callback_on_step_end, cb_inputs)
        watermark = None if self.watermark is None else self.watermark.apply_watermark
        with U.vae_upcast(self.vae):
            images, _ = U.decode_output(self, denoised, output_type, device, cond.dtype, project=watermark)
        self.maybe_free_model_hooks()
        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)

    # ---- steps of __call__ ------------------------------------------------------------------------------------------
    def _encode_text(self, prompts: tuple, embeds: tuple, num_images_per_prompt: int, do_cfg: bool, clip_skip,
                     device) -> dict[str, torch.Tensor | None]:  # fmt: skip
        """diffusers' SDXL ``encode_prompt``; returns the loop's text tensors, in the UNet's dtype.

        ``add_text_embeds`` is the pooled embedding ``(N, P)``; with CFG it is ``[uncond, cond]`` batched as the UNet
        call (diffusers' convention for the callback tensors), and ``negative_prompt_embeds`` is ``None`` otherwise.
        """
        prompt, prompt_2, negative_prompt, negative_prompt_2 = prompts
        if not do_cfg:
            negative_prompt = negative_prompt_2 = None
            embeds = (embeds[0], None, embeds[2], None)
        lora_scale = (self._cross_attention_kwargs or {}).get("scale")
        cond, uncond, pooled, uncond_pooled = self.encode_prompt(
            prompt, prompt_2, device, num_images_per_prompt, do_cfg, negative_prompt, negative_prompt_2, *embeds,
            lora_scale=lora_scale, clip_skip=clip_skip,
        )  # fmt: skip
        dtype = self.unet.dtype  # the UNet's dtype rules the loop, as in LCMPipeline
        pooled = torch.cat([uncond_pooled, pooled]) if do_cfg else pooled
        return {"prompt_embeds": cond.to(dtype), "negative_prompt_embeds": uncond.to(dtype) if do_cfg else None,
                "add_text_embeds": pooled.to(device=device, dtype=dtype)}  # fmt: skip

    def _time_ids(self, sizes: tuple[Size, Size, Size], pooled: torch.Tensor, total: int, do_cfg: bool):
        """SDXL's ``(original_size, crops_coords_top_left, target_size)`` ids from diffusers' ``_get_add_time_ids``,
        ``(total, 6)`` (``(2 * total, 6)`` with CFG: the unconditional branch gets the same ids)."""
        dim = self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else pooled.shape[-1]
        ids = self._get_add_time_ids(*(tuple(s) for s in sizes), dtype=pooled.dtype, text_encoder_projection_dim=dim)
        return ids.to(pooled.device).repeat(2 * total if do_cfg else total, 1)

    _model_output = LCMPipeline._model_output  # one UNet call (SDXL's added_cond_kwargs come from the state)
    _denoise = LCMPipeline._denoise  # the LCM loop


__all__ = ["LCMXLPipeline"]
