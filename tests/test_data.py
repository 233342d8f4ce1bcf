"""lcm_kit.data: sources, corrupt-image skipping, transforms (the latent cache: test_latent_cache.py)."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcm_kit.data import DataConfig, EpochSampler, build_dataset, open_source
from lcm_kit.transforms import transform_image


def _img(seed: int, size=(24, 20)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def make_image_folder(root: Path, n: int = 4, fmt: str = "jsonl", corrupt: int = 0) -> Path:
    """``n`` PNGs + ``corrupt`` garbage/truncated files, captions in metadata.jsonl or metadata.csv."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        _img(i).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"caption {i}"})
    for j in range(corrupt):
        name = f"bad{j}.png"
        buf = io.BytesIO()
        _img(100 + j).save(buf, format="PNG")
        (root / name).write_bytes(b"not an image" if j % 2 == 0 else buf.getvalue()[:60])  # garbage / truncated
        rows.append({"file_name": name, "text": f"bad {j}"})
    if fmt == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(root / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
    return root


def make_shards(root: Path, n_per_shard=(3, 2), caption="txt", corrupt: int = 0) -> str:
    """Webdataset tars: ``key.png`` / ``key.jpg`` + ``key.txt`` or ``key.json``; returns a glob."""
    root.mkdir(parents=True, exist_ok=True)
    k = 0
    for s, n in enumerate(n_per_shard):
        with tarfile.open(root / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(n + (corrupt if s == 0 else 0)):
                key, ext = f"sample{k:06d}", "png" if k % 2 else "jpg"
                buf = io.BytesIO()
                _img(k).save(buf, format="PNG" if ext == "png" else "JPEG")
                data = buf.getvalue() if i < n else b"\x00garbage"
                cap = f"shard caption {k}".encode()
                cap = cap if caption == "txt" else json.dumps({"text": cap.decode(), "other": 1}).encode()
                for name, payload in ((f"{key}.{ext}", data), (f"{key}.{caption}", cap)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                k += 1
    return str(root / "shard-*.tar")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_imagefolder_loads_and_normalises(tmp_path, fmt):
    folder = make_image_folder(tmp_path / "imgs", n=3, fmt=fmt)
    ds, skipped = build_dataset(DataConfig(train_data_dir=str(folder), resolution=16, center_crop=True))
    assert len(ds) == 3 and skipped == 0
    item = ds[0]
    assert item["pixel_values"].shape == (3, 16, 16)
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert sorted(ds[i]["caption"] for i in range(3)) == ["caption 0", "caption 1", "caption 2"]


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    folder = make_image_folder(tmp_path / "imgs", n=3, corrupt=2)
    with caplog.at_level("WARNING"):
        ds, skipped = build_dataset(DataConfig(train_data_dir=str(folder), resolution=16))
    assert (len(ds), skipped) == (3, 2)
    assert "skipped 2" in caplog.text
    assert all(ds[i]["pixel_values"].shape == (3, 16, 16) for i in range(len(ds)))


def test_all_corrupt_is_an_empty_dataset_error(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", n=0, corrupt=2)
    with pytest.raises(ValueError, match="empty"):
        build_dataset(DataConfig(train_data_dir=str(folder), resolution=16))


def test_missing_column_lists_available(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", n=2)
    with pytest.raises(ValueError, match=r"\['caption'\].*available columns: \['image', 'text'\]"):
        build_dataset(DataConfig(train_data_dir=str(folder), caption_column="caption", resolution=16))


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        DataConfig()
    with pytest.raises(ValueError, match="not a directory"):
        DataConfig(train_data_dir=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="resolution"):
        DataConfig(train_data_dir=str(tmp_path), resolution=12)
    with pytest.raises(ValueError, match="center_crop"):
        DataConfig(train_data_dir=str(tmp_path), cache_dir=str(tmp_path))


@pytest.mark.parametrize("caption", ["txt", "json"])
def test_webdataset_shards(tmp_path, caption):
    pattern = make_shards(tmp_path / "shards", caption=caption, corrupt=1)
    ds, skipped = build_dataset(DataConfig(train_shards=pattern, resolution=16))
    assert (len(ds), skipped) == (5, 1)
    captions = sorted(ds[i]["caption"] for i in range(len(ds)))
    assert captions[0] == "shard caption 0" and len(set(captions)) == 5
    assert ds[4]["pixel_values"].shape == (3, 16, 16)


def test_shards_missing_caption_lists_members(tmp_path):
    pattern = make_shards(tmp_path / "shards", caption="json")
    with pytest.raises(ValueError, match=r"available columns.*json\.other"):
        open_source(DataConfig(train_shards=pattern, caption_column="prompt", resolution=16))
    with pytest.raises(ValueError, match="matches no file"):
        open_source(DataConfig(train_shards=str(tmp_path / "none-*.tar"), resolution=16))


def test_crop_and_flip():
    # 32x16 image whose columns encode x: center crop keeps the middle, flip mirrors, random crop stays in range.
    x = np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (16, 1, 3))
    img = Image.fromarray(x)
    center = transform_image(img, 16, center_crop=True, flip=False)
    assert center.shape == (3, 16, 16)
    expected_first = (8 * 8) / 127.5 - 1  # columns 8..23 survive the center crop
    assert center[0, 0, 0].item() == pytest.approx(expected_first, abs=1e-5)
    flipped = transform_image(img, 16, center_crop=True, flip=True)
    assert torch.equal(flipped, center.flip(-1))
    lefts = set()
    for seed in range(20):
        out = transform_image(img, 16, center_crop=False, flip=False, generator=torch.Generator().manual_seed(seed))
        lefts.add(round((out[0, 0, 0].item() + 1) * 127.5 / 8))
    assert len(lefts) > 3 and min(lefts) >= 0 and max(lefts) <= 16
    # upscaling: a small image is resized so its short side is the resolution
    assert transform_image(Image.fromarray(x[:8, :12]), 16, True, False).shape == (3, 16, 16)


def test_sdxl_size_ids_say_where_the_crop_came_from():
    # A 48x32 image resized to 24x16, cropped to 16 at a random left: the ids (original h, w, top, left, 16, 16) name
    # the crop's corner in the resized image, and for a flipped sample its corner in the flipped resized image.
    from lcm_kit.transforms import crop_box, crop_image, size_ids

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
    lefts = set()
    for seed in range(8):
        box = crop_box(img.size, 16, center_crop=False, generator=torch.Generator().manual_seed(seed))
        resized = img.resize((box.width, box.height), Image.BILINEAR)
        for flip in (False, True):
            ids = size_ids(img.size, box, 16, flip).int().tolist()
            assert ids[:3] == [32, 48, box.top] and ids[4:] == [16, 16]
            src = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else resized
            seen = src.crop((ids[3], ids[2], ids[3] + 16, ids[2] + 16))
            expected = torch.from_numpy(np.asarray(seen, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
            assert torch.equal(crop_image(img, box, 16, flip), expected)
        lefts.add(box.left)
    assert len(lefts) > 2  # the random crops did move


def test_random_transforms_repeat_per_epoch_and_index(tmp_path):
    folder = make_image_folder(tmp_path / "imgs")
    ds, _ = build_dataset(DataConfig(train_data_dir=str(folder), resolution=16, random_flip=True), seed=3)
    a = [ds[i]["pixel_values"] for i in range(len(ds))]
    b = [ds[i]["pixel_values"] for i in range(len(ds))]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    sampler = EpochSampler(10, seed=1)
    first = list(sampler)
    assert list(sampler) == first and sorted(first) == list(range(10))
    sampler.set_epoch(1)
    assert list(sampler) != first
