"""Tests of the emoji dataset builder (needs Debian fonts-noto-color-emoji + unicode-data and PyPI emoji)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lcm_kit import emoji as emoji_data

pytest.importorskip("emoji")
pytestmark = pytest.mark.skipif(
    not (Path(emoji_data.FONT_PATH).exists() and Path(emoji_data.EMOJI_TEST_PATH).exists()),
    reason="needs fonts-noto-color-emoji and unicode-data",
)


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("emoji")
    counts = emoji_data.build_emoji_dataset(out, size=16, limit=120, min_test=10)
    assert counts["train"] + counts["test"] == 120
    return out


def test_parse_emoji_test_names_and_labels() -> None:
    table = emoji_data.parse_emoji_test()
    assert table["\U0001f600"] == ("grinning face", "Smileys & Emotion", "face-smiling")
    assert table["\U0001f44d\U0001f3ff"][0] == "thumbs up: dark skin tone"
    assert len(table) > 3000


def test_list_emoji_captions_unique() -> None:
    records = emoji_data.list_emoji()
    texts = [r.text for r in records]
    assert len(texts) == len(set(texts)) > 3500
    assert {"red apple", "grinning face", "thumbs up: dark skin tone"} <= set(texts)


def test_load_with_datasets(subset: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(subset))
    assert set(ds) == {"train", "test"}
    assert len(ds["test"]) == 10 and len(ds["train"]) == 110
    row = ds["train"][0]
    assert row["image"].size == (16, 16) and row["image"].mode == "RGB"
    assert {"text", "group", "subgroup"} <= set(row)
    train, test = set(ds["train"]["text"]), set(ds["test"]["text"])
    assert not train & test
    assert len(train) == len(ds["train"])


def test_read_split_and_held_out(subset: Path) -> None:
    test = emoji_data.read_split(subset, "test")
    assert len(test) == 10 and all(isinstance(e, emoji_data.EmojiExample) for e in test)
    rows = [json.loads(line) for line in (subset / "test" / "metadata.jsonl").read_text().splitlines()]
    assert [e.text for e in test] == [r["text"] for r in rows] and test[0].group == rows[0]["group"]
    assert test[0].image().size == (16, 16) and test[0].image().mode == "RGB"
    prompts, images = emoji_data.held_out(subset, 3)
    assert prompts == [e.text for e in test[:3]] and images.shape == (10, 3, 16, 16)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert len(emoji_data.read_split(subset, "train")) == 110
    with pytest.raises(ValueError, match="split"):
        emoji_data.read_split(subset, "validation")


def test_split_is_seeded() -> None:
    texts = [f"caption {i}" for i in range(2000)]
    a, b = emoji_data.split_captions(texts, seed=0), emoji_data.split_captions(texts, seed=0)
    assert a == b and len(a) == 100
    assert emoji_data.split_captions(texts, seed=1) != a
    assert len(emoji_data.split_captions(texts[:500])) == 64  # min_test


def test_skin_tones_change_colour() -> None:
    from PIL import ImageFont

    font = ImageFont.truetype(emoji_data.FONT_PATH, emoji_data.STRIKE_PPEM, layout_engine=ImageFont.Layout.RAQM)
    light = np.asarray(emoji_data.render_emoji(font, "\U0001f44d\U0001f3fb", 32), dtype=np.float32)
    dark = np.asarray(emoji_data.render_emoji(font, "\U0001f44d\U0001f3ff", 32), dtype=np.float32)
    assert light.shape == dark.shape == (32, 32, 3)
    assert light.mean() - dark.mean() > 20  # the dark variant is clearly darker


def test_missing_glyph_is_skipped() -> None:
    from PIL import ImageFont

    font = ImageFont.truetype(emoji_data.FONT_PATH, emoji_data.STRIKE_PPEM, layout_engine=ImageFont.Layout.RAQM)
    assert emoji_data.render_emoji(font, "\ue000", 32) is None  # private use: no glyph
    assert emoji_data.render_emoji(font, "\U0001f600\U0001f600", 32) is None  # two glyphs


def test_cli_writes_metadata(tmp_path: Path) -> None:
    counts = emoji_data.main(["--out", str(tmp_path), "--size", "8", "--limit", "20", "--min_test", "2"])
    assert counts["test"] == 2
    rows = [json.loads(line) for line in (tmp_path / "train" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and all((tmp_path / "train" / r["file_name"]).exists() for r in rows)
