"""The README's main job (examples/distill_emoji.py) end to end on the committed teacher, shortened."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_main_job_runs_end_to_end(tmp_path):
    out = tmp_path / "lora"
    cmd = [sys.executable, str(ROOT / "examples" / "distill_emoji.py"), "--data_dir", str(tmp_path / "emoji32"),
           "--output_dir", str(out), "--max_train_steps", "3", "--num_eval", "8"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "emoji32" / "test" / "metadata.jsonl").exists()  # the dataset was rendered
    assert (out / "comparison.png").exists()
    lora = load_file(out / "pytorch_lora_weights.safetensors")  # the one LoRA file, in the kohya-ss layout
    assert lora and all(k.startswith("lora_unet_") for k in lora)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["pytorch_lora_weights.safetensors"]
    table = (out / "metrics.md").read_text().splitlines()
    # header, separator, DDIM-50 reference, 5 teacher few-step rows, teacher + LCM sampler (1, 2, 4 steps; TCD γ=0
    # and, because the LoRA's contract samples with it, γ=0.3 at 2, 4), LCM-LoRA at 1, 2, 4 steps (its contract)
    assert len(table) == 2 + 1 + 5 + 7 + 3 and "| LCM-LoRA, TCD γ=0.3 (its contract) | 4 | 4 |" in table[-1]
    assert table[-1] in result.stdout
