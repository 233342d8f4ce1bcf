"""Helpers of :class:`lcm_kit.LCMPipeline`: batch expansion, the initial latents, VAE decoding and the
stock-diffusers save format. Argument checks and image conversion are :mod:`lcm_kit.pipeline_inputs`; the guidance
decision is :mod:`lcm_kit.guidance`.

A folder written by ``LCMPipeline.save_pretrained`` is a plain diffusers folder: ``model_index.json`` names
``LatentConsistencyModelPipeline`` (UNet with a guidance-scale embedding) or ``StableDiffusionPipeline`` (plain SD
UNet, e.g. an LCM-LoRA base), and the scheduler is saved under diffusers' ``LCMScheduler`` class name. Our extra
scheduler keys (``sigma_data``, ``gamma``) stay in ``scheduler_config.json``: diffusers keeps unknown keys as hidden
config, and ``LCMPipeline.from_pretrained`` reads them back.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor

from .atomic import write_json

logger = logging.getLogger(__name__)

# Keyword arguments of DiffusionPipeline.from_pretrained that locate a file, forwarded to the scheduler's load_config.
HUB_KWARGS: tuple[str, ...] = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


def expand_batch(x: torch.Tensor, batch_size: int, num_images_per_prompt: int) -> torch.Tensor:
    """Expands ``(n, ...)`` to ``(batch_size * num_images_per_prompt, ...)`` in prompt order.

    ``n`` may be 1 (one image for all prompts), ``batch_size`` (one per prompt: each repeated
    ``num_images_per_prompt`` times, like the prompt embeddings) or already the full batch.
    """
    total = batch_size * num_images_per_prompt
    if x.shape[0] == total:
        return x
    if x.shape[0] == 1:
        return x.expand(total, *x.shape[1:]).contiguous()
    if x.shape[0] == batch_size:
        return x.repeat_interleave(num_images_per_prompt, dim=0)
    raise ValueError(
        f"got {x.shape[0]} images for {batch_size} prompt(s) x {num_images_per_prompt} image(s) per prompt; "
        f"pass 1, {batch_size} or {total} images"
    )


def encode_images(
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    batch_size: int,
    num_images_per_prompt: int,
    generator: torch.Generator | list[torch.Generator] | None,
) -> torch.Tensor:
    """Scaled VAE latent samples of init images, ``(batch_size * num_images_per_prompt, C, h, w)``.

    ``pixels`` is ``(n, 3, H, W)`` in [-1, 1] (or already latents, ``(n, C, h, w)``, returned expanded). A single
    generator draws the posterior samples of the ``n`` images at once (then the batch is expanded, as diffusers'
    LCM img2img does); a list draws one sample per output image from its own generator.
    """
    if pixels.shape[1] == vae.config.latent_channels:
        return expand_batch(pixels, batch_size, num_images_per_prompt)
    if isinstance(generator, list):
        pixels = expand_batch(pixels, batch_size, num_images_per_prompt)
        pairs = zip(pixels, generator, strict=True)
        x0 = torch.cat([retrieve_latents(vae.encode(p[None]), generator=g) for p, g in pairs])
    else:
        x0 = expand_batch(retrieve_latents(vae.encode(pixels), generator=generator), batch_size, num_images_per_prompt)
    return x0 * vae.config.scaling_factor


def initial_latents(
    pipe: Any,
    image: Any,
    total: int,
    num_images_per_prompt: int,
    height: int,
    width: int,
    cond: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None,
) -> torch.Tensor:
    """Text-to-image: pure noise ``(total, C, h, w)``. Image-to-image: the encoded image noised to the first
    timestep, ``alpha_t x0 + sigma_t eps`` (VAE sample first, then ``eps``, as diffusers draws them)."""
    device, dtype = cond.device, cond.dtype
    if image is None:
        f = pipe.vae_scale_factor
        shape = (total, pipe.unet.config.in_channels, height // f, width // f)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return noise * pipe.scheduler.init_noise_sigma
    batch_size = total // num_images_per_prompt
    pixels = pipe.image_processor.preprocess(image, height=height, width=width).to(device, pipe.vae.dtype)
    x0 = encode_images(pipe.vae, pixels, batch_size, num_images_per_prompt, generator).to(dtype)
    noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=dtype)
    return pipe.scheduler.add_noise(x0, noise, pipe.scheduler.timesteps[:1])


def decode_output(
    pipe: Any, denoised: torch.Tensor, output_type: str, device, dtype, project: Callable | None = None
) -> tuple[Any, list[bool] | None]:
    """VAE-decodes ``denoised``, applies ``project`` to the decoded images in [-1, 1] (an editing constraint, if
    any), runs the pipeline's safety checker if any, and converts to ``output_type``."""
    if output_type == "latent":
        return denoised, None
    vae = pipe.vae
    image = vae.decode(denoised.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    image = project(image) if project is not None else image
    nsfw = None  # SDXL pipelines have no safety checker
    if getattr(pipe, "safety_checker", None) is not None:
        image, nsfw = StableDiffusionPipeline.run_safety_checker(pipe, image, device, dtype)
    do_denormalize = None if nsfw is None else [not flagged for flagged in nsfw]
    images = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
    return images, nsfw


@contextmanager
def vae_upcast(vae: AutoencoderKL) -> Iterator[None]:
    """Runs the block with an fp16 VAE whose config sets ``force_upcast`` in fp32, then puts it back in fp16.

    diffusers' SDXL rule (its pipelines cast the VAE, encode or decode, and cast back): SDXL's VAE overflows in fp16.
    Here the fp16 weights come back even when the block raises.
    """
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(torch.float16)


def write_stock_diffusers_index(save_directory: str | os.PathLike, has_w_embedding: bool,
                                class_name: str | None = None) -> None:  # fmt: skip
    """Rewrites the class names of a saved ``LCMPipeline`` folder so stock diffusers loads it without lcm_kit.

    ``model_index.json`` gets ``_class_name`` ``class_name`` if given, else ``LatentConsistencyModelPipeline`` (if
    ``has_w_embedding``) or ``StableDiffusionPipeline``, and ``["diffusers", "LCMScheduler"]`` for the scheduler;
    the scheduler config's ``_class_name`` becomes ``LCMScheduler``. All other keys are kept.
    """
    root = Path(save_directory)
    index_path, sched_path = root / "model_index.json", root / "scheduler" / "scheduler_config.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    sd_name = "LatentConsistencyModelPipeline" if has_w_embedding else "StableDiffusionPipeline"
    index["_class_name"] = class_name or sd_name
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    write_json(index_path, index)
    sched = json.loads(sched_path.read_text(encoding="utf-8"))
    if sched.get("sigma_data", 0.5) != 0.5 or sched.get("gamma") is not None:
        logger.warning(
            "scheduler has sigma_data=%s, gamma=%s: stock diffusers' LCMScheduler ignores these keys (only "
            "LCMPipeline.from_pretrained uses them)",
            sched.get("sigma_data"),
            sched.get("gamma"),
        )
    sched["_class_name"] = "LCMScheduler"
    write_json(sched_path, sched)
