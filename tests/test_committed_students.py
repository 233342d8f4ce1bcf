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


# state_digest (lcm_kit.distill.outputs: sha256 over sorted keys and float32 bytes) of each committed LoRA as it was
# committed before the default file became the kohya-ss layout (commit 0f58ed4, keys unet.<path>.lora_{A,B}.weight)
PEFT_LAYOUT_DIGESTS = {
    LORA: "1fdf117995abd019d3f7eab23ce7c3aebae87d846ec96b6fa212d6b14f31df9c",
    LORA_SEED1: "ad5191256993f052dc98056c11d2c5b6a46a59bf4dcda0664e626929b37b601b",
}


@pytest.mark.parametrize("lora", [LORA, LORA_SEED1], ids=["seed0", "seed1"])
def test_committed_lora_is_the_kohya_layout_of_the_trained_tensors(lora: Path) -> None:
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file
    from test_lora import check_kohya_layout

    from lcm_kit.contract import read_lora_contract
    from lcm_kit.distill.outputs import state_digest

    path = lora / "pytorch_lora_weights.safetensors"
    state = load_file(path)
    teacher = UNet2DConditionModel.from_pretrained(TEACHER, subfolder="unet")
    modules = check_kohya_layout(state, teacher, rank=16, alpha=16.0)
    # the keys mapped back by the rule, through the teacher's module paths: bit for bit the tensors committed before
    paths = {"lora_unet_" + n.replace(".", "_"): n for n, _ in teacher.named_modules()}
    peft = {f"unet.{paths[m]}.lora_{ab}.weight": state[f"{m}.lora_{ud}.weight"]
            for m in modules for ab, ud in (("A", "down"), ("B", "up"))}  # fmt: skip
    assert all(v.dtype == torch.float32 for v in state.values())
    assert state_digest(peft) == PEFT_LAYOUT_DIGESTS[lora]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert (meta["lcm_kit.rank"], meta["lcm_kit.alpha"], meta["format"]) == ("16", "16.0", "pt")
    assert read_lora_contract(path).scheduler["gamma"] == 0.3 and "lora_adapter_metadata" not in meta


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
    from peft import get_peft_model_state_dict

    from lcm_kit.distill.outputs import state_digest

    loaded = get_peft_model_state_dict(stock.unet, adapter_name="default_0")  # every tensor, bit for bit
    assert state_digest({f"unet.{k}": v for k, v in loaded.items()}) == PEFT_LAYOUT_DIGESTS[lora]
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
