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
