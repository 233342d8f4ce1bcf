"""With the real OpenAI BPE file, the converted tokenizer gives Stable Diffusion 1.x's ids (skipped without it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lcm_kit.tokenizer import convert_clip_bpe

BPE = os.environ.get("CLIP_BPE_PATH", "/tmp/x/bpe_simple_vocab_16e6.txt.gz")


@pytest.mark.skipif(not Path(BPE).exists(), reason="set CLIP_BPE_PATH to bpe_simple_vocab_16e6.txt.gz")
def test_full_vocab_matches_sd_ids(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(convert_clip_bpe(BPE, tmp_path))
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
