"""Tiny Stable-Diffusion-format models built in code, for tests, benchmarks and offline demos.

Nothing here downloads anything: the tokenizer is a byte-level CLIP BPE vocabulary with no merges written to disk,
and all models are randomly initialised with a seed. Folders are written with ``save_pretrained`` exactly like a
user's SD folder, so they are loaded back with ``from_pretrained``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .tokenizer import write_clip_vocab

SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def write_byte_clip_tokenizer(path: str | os.PathLike, model_max_length: int = 77):
    """Writes a CLIP tokenizer with a byte-level vocabulary and no merges (514 tokens) and returns it loaded.

    Every text tokenizes (one token per byte, the last byte of a word carrying ``</w>``), which is all a tiny
    random text encoder needs.
    """
    from transformers import CLIPTokenizer

    write_clip_vocab(path, [], model_max_length)
    return CLIPTokenizer.from_pretrained(str(path))


def tiny_unet_config(
    block_out_channels: Sequence[int] = (8, 16),
    sample_size: int = 8,
    cross_attention_dim: int = 16,
    time_cond_proj_dim: int | None = None,
) -> dict:
    """Config of a small SD-shaped ``UNet2DConditionModel`` (cross-attention in all but the deepest block)."""
    n = len(block_out_channels)
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=4,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def tiny_vae(latent_size: int, **config):
    """A small random ``AutoencoderKL``, factor 2, 4 latent channels (``config`` adds keys, e.g. SDXL's)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=latent_size * 2,
        **config,
    )


def tiny_text_config(tokenizer, width: int, **config):
    """A two-layer ``CLIPTextConfig`` of ``width`` over ``tokenizer``'s vocabulary (``config`` adds keys)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )


def build_tiny_sd(
    time_cond_proj_dim: int | None = None,
    prediction_type: str = "epsilon",
    unet_block_out_channels: Sequence[int] = (8, 16),
    latent_size: int = 8,
    seed: int = 0,
    tokenizer_dir: str | os.PathLike | None = None,
    cross_attention_dim: int = 16,
) -> dict:
    """Builds the components of a tiny SD1.x pipeline (random weights, VAE factor 2) as a dict of modules.

    Args:
        time_cond_proj_dim: Give the UNet a guidance-scale embedding of this width (an LCM UNet), or none.
        prediction_type: The scheduler's ``prediction_type`` (``epsilon``, ``v_prediction``, ``sample``).
        unet_block_out_channels: UNet widths.
        latent_size: UNet ``sample_size`` (images are twice as large).
        seed: Seed of the random initialisation.
        tokenizer_dir: Where to write the tokenizer files (a temp folder if omitted).
        cross_attention_dim: Text-encoder width (768: SD1.5's 77 x 768 caption embeddings, for memory benchmarks).
    """
    import tempfile

    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = write_byte_clip_tokenizer(tokenizer_dir or tempfile.mkdtemp(prefix="lcm_kit_tok_"))
    cross_dim = cross_attention_dim
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **tiny_unet_config(unet_block_out_channels, latent_size, cross_dim, time_cond_proj_dim)
    )
    vae = tiny_vae(latent_size)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, cross_dim))
    scheduler = PNDMScheduler(**SD15_SCHEDULER_CONFIG, prediction_type=prediction_type)
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
    )


def save_tiny_sd_folder(path: str | os.PathLike, **kwargs) -> Path:
    """Builds a tiny SD pipeline (see :func:`build_tiny_sd`) and saves it as a diffusers folder at ``path``.

    The folder is a plain ``StableDiffusionPipeline`` folder (PNDM scheduler, as SD1.5 ships), so it exercises the
    same loading path as a real SD checkpoint.
    """
    import tempfile

    from diffusers import StableDiffusionPipeline

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="lcm_kit_tok_") as tok_dir:
        components = build_tiny_sd(tokenizer_dir=tok_dir, **kwargs)
        pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
        pipe.save_pretrained(path, safe_serialization=True)
    return path


def synthetic_blobs(n: int, seed: int) -> torch.Tensor:
    """Synthetic 'emoji': coloured discs on white, float (n, 3, 32, 32) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    centre = 10 + 12 * torch.rand(n, 2, generator=g)
    radius = 6 + 6 * torch.rand(n, generator=g)
    mask = ((yy - centre[:, :1, None]) ** 2 + (xx - centre[:, 1:, None]) ** 2) < radius[:, None, None] ** 2
    colour = torch.rand(n, 3, generator=g)
    return torch.where(mask[:, None], colour[:, :, None, None], torch.ones(1))


SDXL_EULER_KEYS = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "steps_offset")
# SDXL base's scheduler_config.json (EulerDiscreteScheduler), the keys Euler takes as arguments
SDXL_SCHEDULER_CONFIG = {k: SD15_SCHEDULER_CONFIG[k] for k in SDXL_EULER_KEYS} | {"timestep_spacing": "leading"}


def build_tiny_sdxl(time_cond_proj_dim: int | None = None, latent_size: int = 8, seed: int = 0,
                    tokenizer_dir: str | os.PathLike | None = None) -> dict:  # fmt: skip
    """Builds the components of a tiny SDXL pipeline (random weights, VAE factor 2) as a dict of modules.

    SDXL's shape in miniature: a ``CLIPTextModel`` (width 16) and a ``CLIPTextModelWithProjection`` (width 16,
    projection 8), two layers each (SDXL reads the penultimate one); the UNet has SDXL's block pattern (two layers
    per block, attention only in the deeper block, two transformer layers there), cross-attends to both encoders,
    concatenated (32), and takes ``addition_embed_type="text_time"``: the pooled embedding (8) plus 6 time ids of 8
    dims each.

    Args:
        time_cond_proj_dim: Give the UNet a guidance-scale embedding of this width (an LCM-SDXL UNet), or none.
        latent_size: UNet ``sample_size`` (images are twice as large).
        seed: Seed of the random initialisation.
        tokenizer_dir: Where to write the (shared) byte-level tokenizer files (a temp folder if omitted).
    """
    import tempfile

    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = write_byte_clip_tokenizer(tokenizer_dir or tempfile.mkdtemp(prefix="lcm_kit_tok_"))
    width, projection_dim, time_embed_dim = 16, 8, 8
    torch.manual_seed(seed)
    unet_config = {  # SDXL's block pattern: no attention in the first block, 2 layers per block
        **tiny_unet_config((8, 16), latent_size, 2 * width, time_cond_proj_dim), "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "transformer_layers_per_block": (1, 2),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    }  # fmt: skip
    unet = UNet2DConditionModel(
        **unet_config, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim, use_linear_projection=True,
    )  # fmt: skip
    vae = tiny_vae(latent_size, scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE scaling and upcast flag
    text_config = tiny_text_config(tokenizer, width, projection_dim=projection_dim)
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
    scheduler.register_to_config(set_alpha_to_one=False)  # in SDXL base's file, not an Euler argument
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=CLIPTextModel(text_config).eval(),
        text_encoder_2=CLIPTextModelWithProjection(text_config).eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=scheduler,
    )


def save_tiny_sdxl_folder(path: str | os.PathLike, **kwargs) -> Path:
    """Builds a tiny SDXL pipeline (see :func:`build_tiny_sdxl`) and saves it as a ``StableDiffusionXLPipeline``
    folder at ``path`` (Euler scheduler, as SDXL base ships)."""
    import tempfile

    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="lcm_kit_tok_") as tok_dir:
        pipe = StableDiffusionXLPipeline(**build_tiny_sdxl(tokenizer_dir=tok_dir, **kwargs), add_watermarker=False)
        pipe.save_pretrained(path, safe_serialization=True)
    return path
