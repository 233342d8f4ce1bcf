"""The committed students (models/tiny-emoji-lcm, -lcm-lora, -lcm-lora-seed1, -pcm) load with stock diffusers and with
LCMPipeline, and both give the same images when stock diffusers is given the student's sampling contract; they are
the defaults of bench/quality.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

MODELS = Path(__file__).resolve().parent.parent / "models"
TEACHER, FULL, LORA = MODELS / "tiny-emoji-sd", MODELS / "tiny-emoji-lcm", MODELS / "tiny-emoji-lcm-lora"
LORA_SEED1, PCM = MODELS / "tiny-emoji-lcm-lora-seed1", MODELS / "tiny-emoji-pcm"


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


@pytest.mark.parametrize("lora", [LORA, LORA_SEED1], ids=["seed0", "seed1"])
def test_lora_loads_into_stock_sd_pipeline_and_matches_ours(lora: Path) -> None:
    # The LoRA's contract says: TCD sampling with gamma 0.3. Stock diffusers does that with TCDScheduler(eta=0.3);
    # LCMPipeline reads it from the file's metadata on load.
    from diffusers import StableDiffusionPipeline, TCDScheduler

    from lcm_kit.contract import read_lora_contract
    from lcm_kit.pipeline import LCMPipeline

    contract = read_lora_contract(lora / "pytorch_lora_weights.safetensors")
    assert contract.objective == "lcm" and contract.scheduler["gamma"] == 0.3 and contract.num_inference_steps == 4
    stock = StableDiffusionPipeline.from_pretrained(TEACHER, safety_checker=None)
    stock.scheduler = TCDScheduler.from_config(stock.scheduler.config)
    before = _images(stock, guidance_scale=1.0, eta=0.3)
    stock.load_lora_weights(lora)
    expected = _images(stock, guidance_scale=1.0, eta=0.3)
    assert np.abs(expected - before).max() > 0.05  # the adapter is actually applied
    ours = LCMPipeline.from_pretrained(TEACHER, safety_checker=None)
    ours.load_lora_weights(lora)
    assert ours.scheduler.config.gamma == 0.3
    np.testing.assert_allclose(_images(ours), expected, atol=1e-4)


def test_pcm_folder_samples_deterministically_on_its_phase_edges() -> None:
    from diffusers import DiffusionPipeline, LatentConsistencyModelPipeline

    from lcm_kit.pipeline import LCMPipeline

    assert type(DiffusionPipeline.from_pretrained(PCM)) is LatentConsistencyModelPipeline
    ours = LCMPipeline.from_pretrained(PCM)
    ours.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def sample(seed: int, **kwargs):
        return ours("red apple", guidance_scale=5.0, output_type="np", latents=noise.clone(),
                    generator=torch.Generator().manual_seed(seed), **kwargs).images  # fmt: skip

    a = sample(0)
    assert ours.scheduler.timesteps.tolist() == [999, 739, 499, 239] and ours.scheduler.config.gamma == 0.0
    b, c = sample(1), sample(0, num_inference_steps=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # no fresh noise between steps; explicit steps win
