"""Convert OpenAI CLIP's BPE vocabulary into a `transformers.CLIPTokenizer` folder.

OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence; shipped inside the PyPI wheels of clip-anytorch and
open-clip-torch) holds only merges. CLIP's ``SimpleTokenizer`` builds the vocabulary from them: the 256-symbol
byte-to-unicode alphabet, the same symbols with ``</w>``, one token per merge, then ``<|startoftext|>`` and
``<|endoftext|>``. With all ``49152 - 256 - 2`` merges the ids equal Stable Diffusion 1.x's tokenizer; with fewer
merges the vocabulary is smaller and the two special ids shift (fine for a text encoder trained from scratch).

Get the file without installing anything (those wheels depend on torchvision)::

    pip download --no-deps clip-anytorch==2.6.0 -d /tmp/x
    unzip -j /tmp/x/clip_anytorch-2.6.0-py3-none-any.whl clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/x
    python -m lcm_kit.tokenizer /tmp/x/bpe_simple_vocab_16e6.txt.gz out_dir --num_merges 4000
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

SD_NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 reversible map from the 256 byte values to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_clip_vocab(out_dir: str | os.PathLike, merges: list[tuple[str, str]], model_max_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` of a CLIP BPE tokenizer with ``merges``.

    The vocabulary is CLIP's: the byte alphabet, the same symbols with ``</w>``, one token per merge, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (so ``512 + len(merges) + 2`` tokens). No merges gives a byte-level
    tokenizer that still encodes any text.
    """
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    merge_lines = "".join(" ".join(m) + "\n" for m in merges)
    (out / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def convert_clip_bpe(bpe_path: str | os.PathLike, out_dir: str | os.PathLike, num_merges: int = SD_NUM_MERGES) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and tokenizer configs for `transformers.CLIPTokenizer`.

    Args:
        bpe_path: Path of ``bpe_simple_vocab_16e6.txt.gz``.
        out_dir: Folder to write (created if missing).
        num_merges: Number of merges to keep, 1..49152-256-2; the vocabulary has ``512 + num_merges + 2`` tokens.

    Returns:
        The output folder.
    """
    if not 1 <= num_merges <= SD_NUM_MERGES:
        raise ValueError(f"num_merges must be in [1, {SD_NUM_MERGES}], got {num_merges}")
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    return write_clip_vocab(out_dir, [tuple(m.split()) for m in lines[1 : num_merges + 1]])


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m lcm_kit.tokenizer BPE_GZ OUT_DIR [--num_merges N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_path")
    parser.add_argument("out_dir")
    parser.add_argument("--num_merges", type=int, default=SD_NUM_MERGES)
    args = parser.parse_args(argv)
    print(convert_clip_bpe(args.bpe_path, args.out_dir, args.num_merges))


if __name__ == "__main__":
    main()
