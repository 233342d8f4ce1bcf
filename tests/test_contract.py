"""The sampling contract: round trips through JSON, LoRA metadata and scheduler configs; malformed input fails."""

from __future__ import annotations

import pytest
import torch

from lcm_kit.atomic import save_safetensors
from lcm_kit.contract import SamplingContract, find_lora_file, read_lora_contract
from lcm_kit.scheduler import LCMKitScheduler

PCM = SamplingContract("pcm", 2, (999, 499), {"gamma": 0.0, "original_inference_steps": 50}, (3.0, 5.0))


def test_round_trips(tmp_path):
    assert SamplingContract.from_json(PCM.to_json()) == PCM == SamplingContract.from_dict(PCM.to_dict())
    path = save_safetensors({"x": torch.zeros(1)}, tmp_path / "l.safetensors", {"format": "pt", **PCM.as_metadata()})
    assert read_lora_contract(path) == PCM
    plain = save_safetensors({"x": torch.zeros(1)}, tmp_path / "p.safetensors", {"format": "pt"})
    assert read_lora_contract(plain) is None  # other tools' LoRAs carry none
    sched = LCMKitScheduler(sampling_contract=PCM.to_dict())
    sched.save_pretrained(tmp_path / "s")
    assert SamplingContract.from_dict(LCMKitScheduler.from_pretrained(tmp_path / "s").config.sampling_contract) == PCM
    assert find_lora_file(tmp_path, "l.safetensors") == path and find_lora_file({"a": 1}) is None


@pytest.mark.parametrize(
    "bad, match",
    [({"objective": "pcm"}, "not a sampling contract"), ([1, 2], "not a sampling contract"),
     ({"objective": "pcm", "num_inference_steps": 3, "timesteps": [999, 499]}, "2 timesteps but 3 steps"),
     ({"objective": "lcm", "num_inference_steps": 4, "scheduler": {"beta": 1}}, "unknown scheduler keys")],
)  # fmt: skip
def test_malformed_contracts_are_value_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingContract.from_dict(bad)
    with pytest.raises(ValueError, match=match):
        LCMKitScheduler(sampling_contract=bad)
    with pytest.raises(ValueError, match="not a sampling contract"):
        SamplingContract.from_json("{not json")


def _lora_with(tmp_path, tiny_sd_dir, contract: SamplingContract | None):
    from diffusers import UNet2DConditionModel

    from lcm_kit.lora import add_lcm_lora, save_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    torch.manual_seed(0)  # LoRA A is drawn from the global RNG: the same adapter both times
    add_lcm_lora(unet, rank=4)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    out = tmp_path / ("lora" if contract else "plain")
    save_lora(unet, out, metadata=contract.as_metadata() if contract else None)
    return out


def _sample(pipe, **kw):
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images


def test_lcm_pipeline_applies_the_lora_contract_and_explicit_arguments_override_it(tmp_path, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    from lcm_kit.pipeline import LCMPipeline

    contract = SamplingContract("pcm", 2, (999, 499), {"gamma": 0.0, "original_inference_steps": 50}, (4.0, 4.0))
    lora = _lora_with(tmp_path, tiny_sd_dir, contract)
    pipe = LCMPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    plain_default = _sample(pipe)
    before = pipe.scheduler
    pipe.load_lora_weights(lora)
    assert pipe.scheduler.config.gamma == 0.0 and pipe.scheduler.config.sampling_contract == contract.to_dict()
    default = _sample(pipe)
    assert pipe.scheduler.timesteps.tolist() == [999, 499]
    # the reference: the same pipeline with the contract's settings passed by hand, no contract stored
    manual = LCMPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    manual.set_progress_bar_config(disable=True)
    manual.load_lora_weights(_lora_with(tmp_path, tiny_sd_dir, None))
    assert manual.scheduler.config.gamma is None  # a LoRA without a contract leaves the scheduler alone
    manual.scheduler = LCMKitScheduler.from_config(manual.scheduler.config, gamma=0.0)
    torch.testing.assert_close(default, _sample(manual, timesteps=[999, 499]), rtol=0, atol=0)
    one = _sample(pipe, num_inference_steps=1)  # explicit arguments win
    assert pipe.scheduler.timesteps.tolist() == [999] and not torch.equal(one, default)
    pipe.unload_lora_weights()
    assert pipe.scheduler is before
    torch.testing.assert_close(_sample(pipe), plain_default, rtol=0, atol=0)
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)  # stock diffusers still loads
    stock.load_lora_weights(lora)
    assert sum(1 for n, _ in stock.unet.named_parameters() if "lora_" in n) > 0


def test_a_full_student_folder_samples_with_its_contract(tmp_path, tiny_lcm_dir):
    from lcm_kit.pipeline import LCMPipeline

    pipe = LCMPipeline.from_pretrained(tiny_lcm_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert _sample(pipe).shape[0] == 1 and len(pipe.scheduler.timesteps) == 4  # no contract: 4 steps
    pipe.scheduler = LCMKitScheduler.from_config(pipe.scheduler.config, gamma=0.0, sampling_contract=PCM.to_dict())
    pipe.save_pretrained(tmp_path / "student")
    loaded = LCMPipeline.from_pretrained(tmp_path / "student", safety_checker=None)
    loaded.set_progress_bar_config(disable=True)
    _sample(loaded)
    assert loaded.scheduler.timesteps.tolist() == [999, 499] and loaded.scheduler.config.gamma == 0.0
