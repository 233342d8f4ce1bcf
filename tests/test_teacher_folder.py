"""The committed tiny teacher (models/tiny-emoji-sd) loads with stock diffusers and samples at its resolution."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TEACHER = Path(__file__).resolve().parent.parent / "models" / "tiny-emoji-sd"


def test_scheduler_config_is_sd15_like() -> None:
    config = json.loads((TEACHER / "scheduler" / "scheduler_config.json").read_text())
    assert config["beta_schedule"] == "scaled_linear"
    assert (config["beta_start"], config["beta_end"], config["num_train_timesteps"]) == (0.00085, 0.012, 1000)
    assert config["set_alpha_to_one"] is False and config["steps_offset"] == 1
    assert config.get("prediction_type", "epsilon") == "epsilon"


def test_folder_size_under_30_mb() -> None:
    assert sum(p.stat().st_size for p in TEACHER.rglob("*") if p.is_file()) < 30e6


def test_stock_pipeline_two_steps() -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TEACHER)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = pipe(
        "red apple", num_inference_steps=2, guidance_scale=5.0, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert size == 32 and out.shape == (1, size, size, 3)
    assert np.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
    assert pipe.tokenizer("a photo of a cat").input_ids[1:-1] == [320, 1125, 539, 320, 2368]
