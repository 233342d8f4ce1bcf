"""lcm_kit.latent_cache / lcm_kit.cache_shards: the sharded latent cache (content key, memory-mapped rows, resumable
and parallel build, corrupt shards rebuilt, cache dtype)."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_data import _img, make_image_folder, make_shards

from lcm_kit.cache_shards import INDEX_NAME, CachedLatentDataset, shard_path
from lcm_kit.data import DataConfig, EpochSampler, build_dataset, open_source
from lcm_kit.latent_cache import cache_path, cached_latents

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoders(tiny_sd_dir):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from lcm_kit.conditioning import PromptEncoder

    return (AutoencoderKL.from_pretrained(tiny_sd_dir, subfolder="vae"),
            PromptEncoder([CLIPTokenizer.from_pretrained(tiny_sd_dir, subfolder="tokenizer")],
                          [CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder")]))  # fmt: skip


def cache_config(folder: Path, cache_dir: Path, **kw) -> DataConfig:
    """An fp32 cache (its batches equal encoding on the fly bit for bit), 2 samples a shard, flips encoded."""
    kw = {"resolution": 16, "center_crop": True, "random_flip": True, "cache_shard_size": 2, "cache_dtype": "fp32",
          **kw}  # fmt: skip
    return DataConfig(train_data_dir=str(folder), cache_dir=str(cache_dir), **kw)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a cache folder (temp files included: there must be none)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("shard-*")}


def test_cache_round_trip(tmp_path, tiny_sd_dir, encoders):
    vae = encoders[0]
    folder = make_image_folder(tmp_path / "imgs", n=3, corrupt=1)
    cfg = cache_config(folder, tmp_path / "cache")
    cache, skipped, path = cached_latents(cfg, tiny_sd_dir, open_source(cfg), *encoders)
    assert skipped == 1 and len(cache) == 3 and path.parent == tmp_path / "cache"
    # 4 source rows, 2 per shard; the corrupt image (row 3) leaves shard 1 with one row
    assert sorted(p.name for p in path.iterdir()) == [INDEX_NAME, "shard-00000.safetensors", "shard-00001.safetensors"]
    assert cache.index.row.tolist() == [0, 1, 0] and cache.index.shard.tolist() == [0, 0, 1]
    assert cache.row("latent_mean", 2).shape == (4, 8, 8) and cache.row("latent_std_flip", 0).shape == (4, 8, 8)
    assert cache.row("prompt_embeds", 1).shape == (77, 16) and cache.row("latent_mean", 1).dtype == torch.float32
    # a cached mean equals a direct encode (times the scaling factor) of the same center-cropped image
    ds, _ = build_dataset(DataConfig(train_data_dir=str(folder), resolution=16, center_crop=True))
    with torch.no_grad():
        direct = vae.encode(ds[2]["pixel_values"][None]).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(cache.row("latent_mean", 2), direct[0])
    assert not torch.equal(cache.row("latent_mean", 0), cache.row("latent_mean_flip", 0))
    # reused as is by a later run: no re-encode (the VAE is not even needed), no file rewritten
    before, files = stamps(path), folder_bytes(path)
    again, skipped2, path2 = cached_latents(cfg, tiny_sd_dir, open_source(cfg), None, None)
    assert path2 == path and skipped2 == 1 and stamps(path) == before and folder_bytes(path) == files
    assert all(torch.equal(again.row("prompt_embeds", i), cache.row("prompt_embeds", i)) for i in range(3))
    # another resolution, shard size or dtype -> another folder
    for change in ({"resolution": 32}, {"cache_shard_size": 3}, {"cache_dtype": "fp16"}):
        assert cache_path(cache_config(folder, tmp_path / "cache", **change), tiny_sd_dir, open_source(cfg)) != path



def test_shards_without_a_valid_sample_and_an_all_corrupt_data_set(tmp_path, tiny_sd_dir, encoders):
    folder = make_image_folder(tmp_path / "imgs", n=3, corrupt=2)  # rows 3 and 4 corrupt: shard 2 has no sample
    cfg = cache_config(folder, tmp_path / "cache")
    cache, skipped, path = cached_latents(cfg, tiny_sd_dir, open_source(cfg), *encoders)
    assert len(cache) == 3 and skipped == 2 and len(list(path.glob("shard-*"))) == 3
    before = stamps(path)
    (path / INDEX_NAME).unlink()  # killed before the index: the empty shard counts as written, nothing re-encoded
    assert cached_latents(cfg, tiny_sd_dir, open_source(cfg), None, None)[0].index.files == cache.index.files
    assert stamps(path) == before
    bad = cache_config(make_image_folder(tmp_path / "bad", n=0, corrupt=2), tmp_path / "cache")
    with pytest.raises(ValueError, match="the training dataset is empty: 2 sample"):
        cached_latents(bad, tiny_sd_dir, open_source(bad), *encoders)

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
            cached_latents(cfg, tiny_sd_dir, open_source(cfg), None, None)


@pytest.mark.parametrize("shard_size, batch_size, random_flip, teacher_dir",
                         [(1, 1, True, "tiny_sd_dir"), (8, 5, False, "tiny_sd_dir"), (1, 1, True, "tiny_sdxl_dir")])
def test_cached_batches_equal_encoding_on_the_fly(tmp_path, request, shard_size, batch_size, random_flip,
                                                  teacher_dir):  # fmt: skip
    # Same batches bit for bit, with the same noise, when the VAE sees the same images together (its floats depend
    # on the batch: one image per shard and per batch, or the whole data set in one shard and one batch). SDXL:
    # the pooled embeddings and the size / crop ids (of the flipped image too) as well.
    from lcm_kit.distill.networks import load_teacher

    teacher_dir = request.getfixturevalue(teacher_dir)
    teacher = load_teacher(teacher_dir, torch.device("cpu"), torch.float32)
    folder = make_image_folder(tmp_path / "imgs", n=5, corrupt=1)
    cfg = cache_config(folder, tmp_path / "cache", random_flip=random_flip, cache_shard_size=shard_size)
    cache, _, _ = cached_latents(cfg, teacher_dir, open_source(cfg), teacher.vae, teacher.text)
    datasets = [CachedLatentDataset(cache, random_flip, 3, teacher.xl), build_dataset(cfg, seed=3)[0]]
    assert len(datasets[0]) == len(datasets[1]) == 5
    for epoch in (0, 1):
        sampler = EpochSampler(5, seed=3, shuffle=batch_size == 1)
        sampler.set_epoch(epoch)
        loaders = []
        for ds in datasets:
            ds.set_epoch(epoch)
            loaders.append(torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler))
        for step, (cached, pixels) in enumerate(zip(*loaders, strict=True)):
            got = [teacher.latents_and_cond(b, torch.Generator().manual_seed(step)) for b in (cached, pixels)]
            assert torch.equal(got[0][0], got[1][0]), (epoch, step)
            pairs = zip(got[0][1], got[1][1], strict=True)
            assert all(a is b is None or torch.equal(a, b) for a, b in pairs), (epoch, step)


KILLED_BUILD = """
import sys, time, torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, CLIPTokenizer
from lcm_kit.data import DataConfig, open_source
from lcm_kit.conditioning import PromptEncoder
from lcm_kit.latent_cache import cached_latents
torch.set_num_threads(1)
teacher, images, cache_dir = sys.argv[1:]
vae = AutoencoderKL.from_pretrained(teacher, subfolder="vae")
encode = vae.encode
vae.encode = lambda *a, **k: (time.sleep(0.5), encode(*a, **k))[1]  # slow enough to be killed in the middle
te = CLIPTextModel.from_pretrained(teacher, subfolder="text_encoder")
tok = CLIPTokenizer.from_pretrained(teacher, subfolder="tokenizer")
cfg = DataConfig(train_data_dir=images, cache_dir=cache_dir, resolution=16, center_crop=True, random_flip=True,
                 cache_shard_size=1, cache_dtype="fp32")
cached_latents(cfg, teacher, open_source(cfg), vae, PromptEncoder([tok], [te]))
"""


@pytest.mark.slow
def test_kill9_during_build_then_restart_gives_the_same_cache(tmp_path, tiny_sd_dir, encoders):
    folder = make_image_folder(tmp_path / "imgs", n=8)
    cfg = cache_config(folder, tmp_path / "cache", cache_shard_size=1)
    path = cache_path(cfg, tiny_sd_dir, open_source(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(tiny_sd_dir), str(folder), cfg.cache_dir],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(path.glob("shard-*"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = stamps(path)
    assert 3 <= len(written) < 8 and not (path / INDEX_NAME).exists()  # killed in the middle of the build
    cached_latents(cfg, tiny_sd_dir, open_source(cfg), *encoders)  # the restart
    assert {k: v for k, v in stamps(path).items() if k in written} == written  # shards on disk kept, not re-encoded
    fresh = cache_config(folder, tmp_path / "fresh", cache_shard_size=1)
    cached_latents(fresh, tiny_sd_dir, open_source(fresh), *encoders)
    assert folder_bytes(path) == folder_bytes(tmp_path / "fresh" / path.name)  # no temp file left either


def test_corrupt_shard_or_index_is_detected_and_rebuilt(tmp_path, tiny_sd_dir, encoders, caplog):
    folder = make_image_folder(tmp_path / "imgs", n=4)
    cfg = cache_config(folder, tmp_path / "cache")
    _, _, path = cached_latents(cfg, tiny_sd_dir, open_source(cfg), *encoders)
    good, shard1 = folder_bytes(path), shard_path(path, 1)
    damages = {  # a flipped bit in a tensor (header intact, same size), a shard cut short, a garbled index
        shard1: bytes(b ^ 0xFF if i == len(good[shard1.name]) - 3 else b for i, b in enumerate(good[shard1.name])),
        shard_path(path, 0): good["shard-00000.safetensors"][:-100],
        path / INDEX_NAME: b"garbage",
    }
    for damaged, data in damages.items():
        damaged.write_bytes(data)
        kept = {k: v for k, v in stamps(path).items() if k != damaged.name}
        with caplog.at_level("WARNING"):
            cached_latents(cfg, tiny_sd_dir, open_source(cfg), *encoders)
        assert str(damaged) in caplog.text and "rebuilding" in caplog.text
        assert folder_bytes(path) == good  # the damaged file is rebuilt the same; the others are not rewritten
        assert {k: v for k, v in stamps(path).items() if k != damaged.name} == kept
        caplog.clear()


def test_fp16_cache_is_the_default_halves_the_size_and_barely_moves_the_loss(tmp_path, tiny_sd_dir):
    # The training loss of one batch (the real objective on the real student, full float precision) from an fp32, an
    # fp16 and a default cache, each under two noise draws.
    from test_train import base_args

    from lcm_kit.distill import parse_config
    from lcm_kit.distill.loop import batch_loss, setup, step_generator
    from lcm_kit.distill.setup import make_accelerator

    images = make_image_folder(tmp_path / "imgs", n=4)
    losses, sizes = {}, {}
    for dtype in ("fp32", "fp16", "default"):
        flags = ("--cache_dtype", dtype) if dtype != "default" else ()
        argv = base_args(tiny_sd_dir, images, tmp_path / "out", 2, "--cache_dir", str(tmp_path / dtype),
                         "--center_crop", *flags)  # fmt: skip
        config = parse_config(argv)
        accelerator = make_accelerator(config)
        state = setup(config, accelerator)
        batch, student = next(iter(state.loader)), accelerator.unwrap_model(state.nets.student)
        with torch.no_grad():
            losses[dtype] = [batch_loss(state, student, batch, step_generator(1, 0, s)).loss.item() for s in (0, 1)]
        sizes[dtype] = sum(p.stat().st_size for p in (tmp_path / dtype).rglob("shard-*"))
    assert losses["default"] == losses["fp16"] and sizes["default"] == sizes["fp16"]  # fp16 is the default
    assert sizes["fp16"] < 0.55 * sizes["fp32"]
    # the fp16 cache holds the fp32 values rounded once (read back as fp32)
    (half,), (full,) = (list((tmp_path / d).rglob("shard-00000.safetensors")) for d in ("fp16", "fp32"))
    half, full = load_file(half), load_file(full)
    assert half["prompt_embeds"].dtype == torch.float16
    assert not torch.equal(half["prompt_embeds"].float(), full["prompt_embeds"])
    assert all(torch.equal(half[k], full[k].half()) for k in full if k != "source_index")
    # Negligible: fp16 keeps 11 significant bits, so each cached value moves by at most 2**-11 = 0.05 % of itself,
    # and a loss at most quadratic in them by at most about twice that at first order: < 0.1 % (measured ~1e-5, the
    # rounding errors cancel). And < 1 % of what another noise draw (eps, w, timesteps) does to the same batch's loss.
    (a32, b32), (a16, b16) = losses["fp32"], losses["fp16"]
    assert a16 != a32 and abs(a16 - a32) < 1e-3 * a32 and abs(b16 - b32) < 1e-3 * b32
    assert max(abs(a16 - a32), abs(b16 - b32)) < 0.01 * abs(a32 - b32)


@pytest.mark.slow
def test_two_process_build_equals_one_process_build(tmp_path, tiny_sd_dir, encoders):
    # accelerate launch with 2 CPU ranks: each encodes every other shard, rank 0 writes the index, both train on it
    from test_train import base_args, two_process_digests

    images, out = make_image_folder(tmp_path / "imgs", n=6, corrupt=1), tmp_path / "out"
    extra = ("--cache_dir", str(tmp_path / "two"), "--center_crop", "--random_flip", "--cache_shard_size", "2")
    d0, d1 = two_process_digests(out, base_args(tiny_sd_dir, images, out, 2, *extra))
    log = (out / "launch.log").read_text()
    assert d0 == d1 and "encoding the latent cache [0/2]" in log and "encoding the latent cache [1/2]" in log
    cfg = cache_config(images, tmp_path / "one", random_flip=True, cache_shard_size=2, cache_dtype="fp16")  # default
    _, _, path = cached_latents(cfg, tiny_sd_dir, open_source(cfg), *encoders)
    assert len(list(path.glob("shard-*"))) == 4  # 7 rows (one corrupt), 2 per shard: ranks 0 and 1 wrote 2 each
    assert folder_bytes(tmp_path / "two" / path.name) == folder_bytes(path)
