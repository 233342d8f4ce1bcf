"""lcm_kit.data / lcm_kit.latent_cache: sources, corrupt-image skipping, transforms, the latent cache."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcm_kit.data import DataConfig, EpochSampler, build_dataset, open_source, transform_image
from lcm_kit.latent_cache import cache_path, cached_latents, load_cache


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


def test_cache_round_trip(tmp_path, tiny_sd_dir, caplog):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(tiny_sd_dir, subfolder="vae")
    te = CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(tiny_sd_dir, subfolder="tokenizer")
    folder = make_image_folder(tmp_path / "imgs", n=3, corrupt=1)
    cfg = DataConfig(train_data_dir=str(folder), resolution=16, center_crop=True, random_flip=True,
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    source = open_source(cfg)
    tensors, skipped, path = cached_latents(cfg, tiny_sd_dir, source, vae, te, tok)
    assert skipped == 1 and path.exists() and path.parent == tmp_path / "cache"
    assert tensors["latent_mean"].shape == (3, 4, 8, 8) and tensors["latent_std_flip"].shape == (3, 4, 8, 8)
    assert tensors["prompt_embeds"].shape == (3, 77, 16)
    # the cached mean equals a direct encode (times the scaling factor) of the same center-cropped image
    ds, _ = build_dataset(DataConfig(train_data_dir=str(folder), resolution=16, center_crop=True))
    with torch.no_grad():
        direct = vae.encode(ds[0]["pixel_values"][None]).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(tensors["latent_mean"][0:1], direct)
    assert not torch.equal(tensors["latent_mean"], tensors["latent_mean_flip"])
    # reused as is by a later run: no re-encode (the VAE is not even needed)
    again, skipped2, path2 = cached_latents(cfg, tiny_sd_dir, open_source(cfg), None, None, None)
    assert path2 == path and skipped2 == 1
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert load_cache(path)[1] == 1
    # another resolution -> another file
    other = DataConfig(**{**cfg.__dict__, "resolution": 32})
    assert cache_path(other, tiny_sd_dir, source) != path
    assert not list((tmp_path / "cache").glob("*.tmp"))
    # a truncated or garbled cache file is rebuilt, with a warning that names it
    good = path.read_bytes()
    for damaged in (good[: len(good) // 2], b"\x00" * 8 + good[8:], b"garbage"):
        path.write_bytes(damaged)
        with caplog.at_level("WARNING"):
            rebuilt, skipped3, path3 = cached_latents(cfg, tiny_sd_dir, open_source(cfg), vae, te, tok)
        assert path3 == path and skipped3 == 1 and load_cache(path)[1] == 1  # rewritten whole
        assert all(torch.equal(rebuilt[k], tensors[k]) for k in tensors)
        assert f"latent cache {path} is unreadable" in caplog.text and "rebuilding" in caplog.text
        caplog.clear()


def _rewrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """Replaces a file's bytes; same size and mtime (what rsync -t / tar / cp -p replacements look like)."""
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    _rewrite_keeping_size_and_mtime(path, bytes(data))


@pytest.mark.parametrize("changed", ["image", "caption", "shard", "teacher"])
def test_cache_key_follows_content_not_size_and_mtime(tmp_path, tiny_sd_dir, changed):
    teacher = shutil.copytree(tiny_sd_dir, tmp_path / "teacher")
    if changed == "shard":
        cfg = DataConfig(train_shards=make_shards(tmp_path / "shards"), resolution=16, center_crop=True,
                         cache_dir=str(tmp_path / "cache"))  # fmt: skip
    else:
        folder = make_image_folder(tmp_path / "imgs", n=3)
        _img(0).save(folder / "0.png", compress_level=0)  # uncompressed: another image has the same file size
        cfg = DataConfig(train_data_dir=str(folder), resolution=16, center_crop=True, cache_dir=str(tmp_path / "c"))
    before = cache_path(cfg, teacher, open_source(cfg))
    assert cache_path(cfg, teacher, open_source(cfg)) == before  # stable
    if changed == "image":
        buf = io.BytesIO()
        _img(9).save(buf, format="PNG", compress_level=0)
        _rewrite_keeping_size_and_mtime(folder / "0.png", buf.getvalue())
    elif changed == "caption":  # "caption 1" -> "caption 7": same size; datasets keeps its own table (mtime key)
        meta = folder / "metadata.jsonl"
        _rewrite_keeping_size_and_mtime(meta, meta.read_bytes().replace(b"caption 1", b"caption 7"))
    elif changed == "shard":
        shard = tmp_path / "shards" / "shard-00000.tar"
        data = shard.read_bytes()
        start = data.index(b"shard caption 0")
        _rewrite_keeping_size_and_mtime(shard, data[:start] + b"shard caption X" + data[start + 15 :])
    else:
        _flip_last_byte(next((teacher / "vae").glob("*.safetensors")))
    assert cache_path(cfg, teacher, open_source(cfg)) != before
    if changed == "caption":  # and the new caption is what training reads, with or without a cache
        assert sorted(open_source(cfg).raw(i)[1] for i in range(3)) == ["caption 0", "caption 2", "caption 7"]


def test_unwritable_cache_dir_fails_before_any_encoding(tmp_path, tiny_sd_dir):
    folder = make_image_folder(tmp_path / "imgs", n=2)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder's parent should be")
    folders = [blocker / "cache"]
    if os.geteuid() != 0:  # root writes through permission bits; the file in the way covers that case too
        (tmp_path / "ro").mkdir(mode=0o555)
        folders.append(tmp_path / "ro")
    for cache_dir in folders:
        cfg = DataConfig(train_data_dir=str(folder), resolution=16, center_crop=True, cache_dir=str(cache_dir))
        # no VAE / text encoder at all: the check must come before the scan and the encoding
        with pytest.raises(ValueError, match=f"cache_dir {re.escape(repr(str(cache_dir)))} is not writable"):
            cached_latents(cfg, tiny_sd_dir, open_source(cfg), None, None, None)
