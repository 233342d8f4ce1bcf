"""Tests of the CLIP BPE -> CLIPTokenizer conversion (lcm_kit.tokenizer)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from lcm_kit.tokenizer import bytes_to_unicode, convert_clip_bpe


def test_bytes_to_unicode_is_a_bijection() -> None:
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("a")] == "a"


def test_small_vocab_layout(tmp_path: Path) -> None:
    bpe = tmp_path / "bpe.txt.gz"
    with gzip.open(bpe, "wt", encoding="utf-8") as f:
        f.write("header\nc a\nca t</w>\nd o\ndo g</w>\n")
    out = convert_clip_bpe(bpe, tmp_path / "tok", num_merges=4)
    vocab = json.loads((out / "vocab.json").read_text())
    assert len(vocab) == 512 + 4 + 2
    assert vocab["cat</w>"] == 513 and vocab["<|endoftext|>"] == 517
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(out)
    assert tok("cat dog").input_ids == [516, 513, 515, 517]
    with pytest.raises(ValueError, match="num_merges"):
        convert_clip_bpe(bpe, tmp_path / "bad", num_merges=0)


BPE = os.environ.get("CLIP_BPE_PATH", "/tmp/x/bpe_simple_vocab_16e6.txt.gz")


@pytest.mark.skipif(not Path(BPE).exists(), reason="set CLIP_BPE_PATH to bpe_simple_vocab_16e6.txt.gz")
def test_full_vocab_matches_sd_ids(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(convert_clip_bpe(BPE, tmp_path))
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
