"""lcm_kit.tokenizer: CLIP BPE merges -> a CLIPTokenizer folder (on a small merges file written in the test)."""

from __future__ import annotations

import gzip

import pytest
from transformers import CLIPTokenizer

from lcm_kit.tokenizer import bytes_to_unicode, convert_clip_bpe


def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(ch.isprintable() and not ch.isspace() for ch in table.values())


def test_convert_small_merges(tmp_path):
    # the header line of OpenAI's file, then merges in priority order
    merges = ["c a", "ca t</w>", "t h", "th e</w>"]
    bpe = tmp_path / "bpe.txt.gz"
    with gzip.open(bpe, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    out = convert_clip_bpe(bpe, tmp_path / "tok", num_merges=3)
    tok = CLIPTokenizer.from_pretrained(str(out))
    assert len(tok) == 512 + 3 + 2
    vocab = tok.get_vocab()
    # merged tokens follow the 512 alphabet tokens in merge order; the special tokens come last
    assert [vocab["ca"], vocab["cat</w>"], vocab["th"]] == [512, 513, 514]
    assert tok.bos_token_id == 515 and tok.eos_token_id == 516
    assert tok("cat").input_ids == [515, 513, 516]  # "cat" -> c a t</w> -> ca t</w> -> cat</w>
    assert tok("the").input_ids == [515, vocab["th"], vocab["e</w>"], 516]  # the 4th merge was not kept
    with pytest.raises(ValueError, match="num_merges"):
        convert_clip_bpe(bpe, tmp_path / "bad", num_merges=0)
