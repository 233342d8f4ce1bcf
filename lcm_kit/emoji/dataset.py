"""Captioned emoji images: a small, offline text-to-image dataset rendered from Noto Color Emoji, and its reader.

Each image is one emoji rendered with Pillow from the Noto Color Emoji font (a CBDT bitmap font with a single
strike at 109 ppem: glyphs are drawn at that size, composited on white and downsampled with LANCZOS). Captions are
CLDR short names: from Unicode's ``emoji-test.txt`` when the emoji is listed there ("thumbs up: dark skin tone",
"flag: Japan"), else from the PyPI ``emoji`` package's English name ("face with bags under eyes"). ``group`` and
``subgroup`` come from ``emoji-test.txt`` ("unknown" for emoji newer than that file). Glyphs that the font lacks
(empty render) or lays out as several glyphs (an unsupported ZWJ sequence) are skipped; captions are unique.

The output is a ``datasets`` imagefolder with ``train/`` and ``test/`` folders, each with a ``metadata.jsonl``
(``file_name``, ``text``, ``group``, ``subgroup``); the test split is a fixed, seeded sample of the captions::

    python -m lcm_kit.emoji --out data/emoji64 --size 64
    datasets.load_dataset("imagefolder", data_dir="data/emoji64")  # DatasetDict(train=..., test=...)
    lcm_kit.emoji.read_split("data/emoji64", "test")  # [EmojiExample(text, path, group, subgroup), ...]

:func:`read_split` is the one reader of a split (teacher training, feature-network training, sample grids and
the held-out evaluation set of :func:`held_out` all use it).

Debian/Ubuntu: ``apt-get install fonts-noto-color-emoji unicode-data``. The font is SIL OFL: rebuild the images,
don't commit them.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, ImageDraw, ImageFont

from ..eval import to_unit_tensor
from ..images import to_rgb

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST_PATH = "/usr/share/unicode/emoji/emoji-test.txt"
STRIKE_PPEM = 109  # the font's only bitmap size
SKIN_TONES = (
    "light skin tone",
    "medium-light skin tone",
    "medium skin tone",
    "medium-dark skin tone",
    "dark skin tone",
)


@dataclass(frozen=True)
class EmojiRecord:
    """One emoji: its character sequence, caption and emoji-test.txt labels."""

    chars: str
    text: str
    group: str
    subgroup: str

    @property
    def code(self) -> str:
        """Hyphen-joined hex code points, e.g. ``1f44d-1f3ff``."""
        return "-".join(f"{ord(c):x}" for c in self.chars)


def parse_emoji_test(path: str | Path = EMOJI_TEST_PATH) -> dict[str, tuple[str, str, str]]:
    """Read ``emoji-test.txt`` into ``{chars: (name, group, subgroup)}`` for fully-qualified and component entries."""
    table: dict[str, tuple[str, str, str]] = {}
    group = subgroup = ""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            codes, rest = line.split(";", 1)
            status, comment = rest.split("#", 1)
            if status.strip() not in ("fully-qualified", "component"):
                continue
            chars = "".join(chr(int(c, 16)) for c in codes.split())
            name = comment.strip().split(" ", 2)[2]  # "<emoji> E1.0 <name>"
            table[chars] = (name, group, subgroup)
    return table


def _package_name(chars: str) -> str | None:
    """English name from the PyPI ``emoji`` package (fully-qualified entries only), or None."""
    import emoji  # lazy: an optional dependency

    data = emoji.EMOJI_DATA.get(chars)
    if data is None or data["status"] != emoji.STATUS["fully_qualified"]:
        return None
    return data["en"].strip(":").replace("_", " ")


def list_emoji(emoji_test_path: str | Path = EMOJI_TEST_PATH) -> list[EmojiRecord]:
    """All candidate emoji (union of emoji-test.txt and the ``emoji`` package), sorted by code, captions unique."""
    import emoji  # lazy: an optional dependency

    table = parse_emoji_test(emoji_test_path)
    candidates = set(table) | {c for c in emoji.EMOJI_DATA if _package_name(c) is not None}
    records, seen = [], set()
    for chars in sorted(candidates, key=lambda c: [ord(x) for x in c]):
        if chars in table:
            name, group, subgroup = table[chars]
        else:
            base = "".join(c for c in chars if not 0x1F3FB <= ord(c) <= 0x1F3FF)
            name = _package_name(chars) or ""
            group, subgroup = table.get(base, ("", "unknown", "unknown"))[1:]
        if name and name not in seen:
            seen.add(name)
            records.append(EmojiRecord(chars, name, group, subgroup))
    return records


def render_emoji(font: ImageFont.FreeTypeFont, chars: str, size: int) -> Image.Image | None:
    """Render one emoji at the font's strike, composite on white, downsample to ``size`` x ``size`` RGB.

    Returns:
        The image, or None when the font has no single glyph for ``chars`` (empty render, or several glyphs).
    """
    left, top, right, bottom = font.getbbox(chars)
    if right - left > 1.5 * STRIKE_PPEM or bottom - top <= 0:
        return None
    canvas = Image.new("RGBA", (right + 4, bottom + 4), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((2, 2), chars, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    side = max(canvas.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(canvas, ((side - canvas.width) // 2, (side - canvas.height) // 2))
    return square.convert("RGB").resize((size, size), Image.LANCZOS)


def split_captions(texts: list[str], test_fraction: float = 0.05, min_test: int = 64, seed: int = 0) -> set[str]:
    """Seeded hold-out of captions: ``max(min_test, round(test_fraction * n))`` of them, at most half the set."""
    n_test = min(max(min_test, round(test_fraction * len(texts))), len(texts) // 2)
    return set(random.Random(seed).sample(sorted(texts), n_test))


def build_emoji_dataset(
    out_dir: str | Path,
    size: int = 64,
    limit: int | None = None,
    test_fraction: float = 0.05,
    min_test: int = 64,
    seed: int = 0,
    font_path: str | Path = FONT_PATH,
    emoji_test_path: str | Path = EMOJI_TEST_PATH,
) -> dict[str, int]:
    """Render the emoji set into an imagefolder dataset with ``train/`` and ``test/`` splits.

    Args:
        out_dir: Output folder (created; existing ``metadata.jsonl`` files are overwritten).
        size: Image side in pixels.
        limit: Keep only the first ``limit`` renderable emoji (for tests); None keeps all.
        test_fraction: Fraction of captions held out for evaluation.
        min_test: Minimum number of held-out captions (capped at half the set).
        seed: Seed of the train/test split.
        font_path: Noto Color Emoji font file.
        emoji_test_path: Unicode ``emoji-test.txt``.

    Returns:
        Counts: ``{"train": n, "test": n, "skipped": n}``.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    font = ImageFont.truetype(str(font_path), STRIKE_PPEM, layout_engine=ImageFont.Layout.RAQM)
    rendered, skipped = [], 0
    for rec in list_emoji(emoji_test_path):
        if limit is not None and len(rendered) >= limit:
            break
        image = render_emoji(font, rec.chars, size)
        if image is None:
            skipped += 1
        else:
            rendered.append((rec, image))
    test = split_captions([r.text for r, _ in rendered], test_fraction, min_test, seed)
    out, counts = Path(out_dir), {"train": 0, "test": 0, "skipped": skipped}
    rows: dict[str, list[str]] = {"train": [], "test": []}
    for i, (rec, image) in enumerate(rendered):
        split = "test" if rec.text in test else "train"
        (out / split).mkdir(parents=True, exist_ok=True)
        file_name = f"{i:05d}_{rec.code}.png"
        image.save(out / split / file_name)
        row = {"file_name": file_name, "text": rec.text, "group": rec.group, "subgroup": rec.subgroup}
        rows[split].append(json.dumps(row, ensure_ascii=False))
        counts[split] += 1
    for split, lines in rows.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / split / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return counts


@dataclass(frozen=True)
class EmojiExample:
    """One row of a split's ``metadata.jsonl``: caption, image file and emoji-test.txt labels."""

    text: str
    path: Path
    group: str
    subgroup: str

    def image(self) -> Image.Image:
        """The image, loaded as RGB."""
        with Image.open(self.path) as im:
            return to_rgb(im)


def read_split(data_dir: str | Path, split: Literal["train", "test"]) -> list[EmojiExample]:
    """The rows of ``data_dir/split/metadata.jsonl`` in file order (the builder writes them sorted by code point).

    Raises:
        ValueError: If ``split`` is not ``"train"`` or ``"test"``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(data_dir) / split
    lines = (root / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [EmojiExample(r["text"], root / r["file_name"], r["group"], r["subgroup"]) for r in rows]


def held_out(data_dir: str | Path, n: int | None = None) -> tuple[list[str], torch.Tensor]:
    """The evaluation set: the first ``n`` test captions (``None``: all) and all test images, ``(N, 3, H, W)`` in
    [0, 1] (the real images of FID/KID)."""
    examples = read_split(data_dir, "test")
    return [e.text for e in examples[:n]], to_unit_tensor([e.image() for e in examples])


def main(argv: list[str] | None = None) -> dict[str, int]:
    """CLI: ``python -m lcm_kit.emoji --out data/emoji64 --size 64``."""
    parser = argparse.ArgumentParser(description="Render Noto Color Emoji into a captioned imagefolder dataset.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--limit", type=int, default=None, help="render only the first N emoji")
    parser.add_argument("--test_fraction", type=float, default=0.05)
    parser.add_argument("--min_test", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--font", default=FONT_PATH)
    parser.add_argument("--emoji_test", default=EMOJI_TEST_PATH)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts = build_emoji_dataset(
        args.out, args.size, args.limit, args.test_fraction, args.min_test, args.seed, args.font, args.emoji_test
    )
    print(json.dumps({**counts, "seconds": round(time.perf_counter() - start, 1)}))
    return counts


__all__ = [
    "EmojiExample",
    "EmojiRecord",
    "build_emoji_dataset",
    "held_out",
    "list_emoji",
    "main",
    "parse_emoji_test",
    "read_split",
    "render_emoji",
    "split_captions",
]
