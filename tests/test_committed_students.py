"""The committed students (models/tiny-emoji-lcm, models/tiny-emoji-lcm-lora) load with stock diffusers and with
LCMPipeline, and both give the same images; they are the defaults of bench/quality.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

MODELS = Path(__file__).resolve().parent.parent / "models"
TEACHER, FULL, LORA = MODELS / "tiny-emoji-sd", MODELS / "tiny-emoji-lcm", MODELS / "tiny-emoji-lcm-lora"


def _images(pipe, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("red apple", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0),
                **kwargs).images  # fmt: skip


def test_full_lcm_folder_is_plain_lcm_and_matches_stock_diffusers() -> None:
    from diffusers import DiffusionPipeline, LatentConsistencyModelPipeline, LCMScheduler

    from lcm_kit.pipeline import LCMPipeline

    config = json.loads((FULL / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "LCMScheduler" and config.get("gamma") is None  # plain LCM sampling
    assert not (FULL / "unet_online").exists()  # only the EMA UNet is committed
    stock = DiffusionPipeline.from_pretrained(FULL)
    assert type(stock) is LatentConsistencyModelPipeline and type(stock.scheduler) is LCMScheduler
    ours = LCMPipeline.from_pretrained(FULL)
    assert ours.has_w_embedding and ours.unet.config.time_cond_proj_dim == 256
    expected = _images(stock, guidance_scale=5.0)
    np.testing.assert_allclose(_images(ours, guidance_scale=5.0), expected, atol=1e-4)
    assert expected.shape == (1, 32, 32, 3)


def test_lora_loads_into_stock_sd_pipeline_and_matches_ours() -> None:
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from lcm_kit.pipeline import LCMPipeline

    stock = StableDiffusionPipeline.from_pretrained(TEACHER, safety_checker=None)
    stock.scheduler = LCMScheduler.from_config(stock.scheduler.config)
    before = _images(stock, guidance_scale=1.0)
    stock.load_lora_weights(LORA)
    expected = _images(stock, guidance_scale=1.0)
    assert np.abs(expected - before).max() > 0.05  # the adapter is actually applied
    ours = LCMPipeline.from_pretrained(TEACHER, safety_checker=None)
    ours.load_lora_weights(LORA)
    np.testing.assert_allclose(_images(ours), expected, atol=1e-4)
