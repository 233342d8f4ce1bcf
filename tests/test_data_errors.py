"""Bad data is skipped and counted, or refused with a ValueError that names the file (and line) or shard."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from test_data import _img, make_image_folder, make_shards

from lcm_kit.data import DataConfig, build_dataset, open_source


def _captions(ds) -> list[str]:
    return sorted(ds[i]["caption"] for i in range(len(ds)))


def test_null_or_missing_captions_are_skipped_and_counted(tmp_path, caplog):
    folder = make_image_folder(tmp_path / "imgs", n=4)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[1]["text"] = None  # "text": null
    del rows[2]["text"]  # no caption key in this row (the column exists through the other rows)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING"):
        ds, skipped = build_dataset(DataConfig(train_data_dir=str(folder), resolution=16))
    assert (skipped, _captions(ds)) == (2, ["caption 0", "caption 3"])  # never the literal caption "None"
    assert "skipped 2" in caplog.text


def test_empty_csv_caption_is_skipped(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", n=3, fmt="csv")
    lines = (folder / "metadata.csv").read_text().splitlines()
    lines[2] = "1.png,"  # an empty field: pandas reads it as missing
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    ds, skipped = build_dataset(DataConfig(train_data_dir=str(folder), resolution=16))
    assert (skipped, _captions(ds)) == (1, ["caption 0", "caption 2"])


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_shard_json_caption_null_or_malformed_is_skipped(tmp_path):
    pattern = make_shards(tmp_path / "shards", n_per_shard=(2,), caption="json")
    buf = io.BytesIO()
    _img(7).save(buf, format="PNG")
    image = buf.getvalue()
    _tar(tmp_path / "shards" / "shard-00001.tar", {
        "a.png": image, "a.json": b'{"text": null}', "b.png": image, "b.json": b'{"text": "cut',
        "c.png": image, "c.txt": b"\xff\xfe not utf-8",
    })  # fmt: skip
    ds, skipped = build_dataset(DataConfig(train_shards=pattern, resolution=16))
    assert (skipped, _captions(ds)) == (3, ["shard caption 0", "shard caption 1"])


def test_csv_with_unquoted_commas_names_file_and_line(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", n=6, fmt="csv")
    lines = (folder / "metadata.csv").read_text().splitlines()
    lines[3] = lines[3].replace("caption", "a red, round caption")  # file line 4
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metadata\.csv.* line 4 has 3 fields.* header has 2"):
        open_source(DataConfig(train_data_dir=str(folder), resolution=16))
    # every row with an unquoted comma (what read as "6 unreadable images"): the first bad line is named
    lines = [lines[0]] + [line.replace("caption", "a, b") for line in lines[1:]]
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metadata\.csv.* line 2 has 3 fields"):
        open_source(DataConfig(train_data_dir=str(folder), resolution=16))


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", n=3)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-3]  # cut: no closing quote and brace
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl.* line 2 is not valid JSON"):
        open_source(DataConfig(train_data_dir=str(folder), resolution=16))
    lines[1] = '["not", "an object"]'
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl.* line 2 is not a JSON object"):
        open_source(DataConfig(train_data_dir=str(folder), resolution=16))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "header_cut"])
def test_bad_tar_shard_is_named(tmp_path, damage):
    pattern = make_shards(tmp_path / "shards")
    shard = tmp_path / "shards" / "shard-00001.tar"
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        last_header = tar.getmembers()[-1].offset
    # header_cut: the file ends inside the last member's header, where tarfile stops without a word
    cut = {"garbage": b"garbage" * 100, "truncated": data[: len(data) // 2], "empty": b"",
           "header_cut": data[: last_header + 100]}  # fmt: skip
    shard.write_bytes(cut[damage])
    with pytest.raises(ValueError, match=r"train_shards: .*shard-00001\.tar is not a readable tar"):
        open_source(DataConfig(train_shards=pattern, resolution=16))
