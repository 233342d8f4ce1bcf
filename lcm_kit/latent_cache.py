"""A cache of VAE latents and text embeddings, computed once, kept on disk in shards and reused by later runs.

What is cached, for each valid sample (images that decode and have a caption, in source order):

* ``latent_mean``, ``latent_std`` -- ``(C, h, w)``: the VAE posterior's mean and std, both already multiplied by
  ``vae.config.scaling_factor``; a training latent is ``mean + std * eps`` (a fresh sample each step, as
  ``latent_dist.sample() * scaling_factor``);
* ``latent_mean_flip``, ``latent_std_flip`` -- the same for the horizontally flipped image (only with
  ``random_flip``; the VAE is not flip-equivariant, so flipped images are encoded too);
* ``prompt_embeds`` -- ``(L, D)`` text-encoder last hidden states of the caption (SDXL: both encoders' penultimate
  ones, concatenated, :mod:`lcm_kit.conditioning`);
* SDXL only: ``pooled_prompt_embeds`` ``(P,)`` and ``add_time_ids`` ``(6,)``, the size / crop ids of the fixed
  center crop (``add_time_ids_flip`` for the flipped image).

They are stored in ``cache_dtype`` and read back as float32: fp16 by default (half the disk and page-cache footprint
of fp32; the loss moves by < 0.1 %), fp32 gives training batches equal to encoding on the fly with the same noise.
The files, the index and the reader are in :mod:`lcm_kit.cache_shards`.

The cache folder ``<cache_dir>/lcm_cache-<key>`` is named by a hash of content, never of sizes or mtimes (a file
replaced with the same size and mtime must not reuse stale latents): the sha256 of the teacher's VAE / text-encoder /
tokenizer files, the source's content digest (``fingerprint()``: every image's bytes and caption as read, or the
shards' bytes), the data flags and the transform, the shard size and the dtype. Version 3 (sharded) replaced
version 2 (one file) and 1 (sizes and mtimes): caches written before are rebuilt once.

Build: the main process computes the key (hashing the data set once) and broadcasts it; shard ``k`` goes to process
``k mod world`` (every process of an ``accelerate launch`` that sees the same ``cache_dir`` encodes its share;
without a shared filesystem each machine builds the whole cache with its own processes), each shard is written as
soon as it is encoded, a barrier waits for all, then the main process writes the index. A restart after a crash or
``kill -9`` encodes only the shards that are not on disk. The cache folder is checked to be writable before anything
is encoded, and only when something has to be written (a read-only folder holding a complete cache works).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import cache_shards as CS
from .atomic import check_writable
from .conditioning import PromptEncoder
from .data import DataConfig, HFSource, ShardSource, decode_image
from .digests import file_sha256
from .transforms import crop_box, crop_image, size_ids

logger = logging.getLogger(__name__)
CACHE_VERSION = 3  # 3: sharded (2: one file keyed on content, 1: sizes and mtimes)


def _teacher_signature(teacher_dir: str | os.PathLike) -> dict:
    """sha256 of the files the cache is computed with: the VAE, the text encoder and the tokenizer (a hub id, with
    no local folder to read: the id)."""
    root = Path(teacher_dir)
    names = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")  # the last two: SDXL's
    subs = [root / sub for sub in names if (root / sub).is_dir()]
    if not subs:
        return {"teacher": str(teacher_dir)}
    return {f"{f.parent.name}/{f.name}": file_sha256(f) for sub in subs for f in sorted(sub.glob("*")) if f.is_file()}


def cache_path(config: DataConfig, teacher_dir: str | os.PathLike, source: HFSource | ShardSource) -> Path:
    """The cache folder for this teacher, data, transform, shard size and dtype (see module docstring)."""
    data = {k: v for k, v in asdict(config).items() if k != "cache_dir"}
    key = {"version": CACHE_VERSION, "teacher": _teacher_signature(teacher_dir), "data": data}
    key["source"] = source.fingerprint()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(config.cache_dir) / f"lcm_cache-{digest}"


@torch.no_grad()
def encode_posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior ``(mean, std)`` of ``pixels`` (B,3,H,W) in [-1, 1], both times ``scaling_factor``, on the VAE."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    sf = vae.config.scaling_factor
    return dist.mean * sf, dist.std * sf


def encode_shard(config: DataConfig, source, rows: range, encoders: tuple, batch_size: int = 16) -> dict:
    """Cache tensors of the valid samples among source ``rows`` (center crop; flipped copies with ``random_flip``),
    encoded ``batch_size`` at a time, in ``cache_dtype`` (SDXL's size / crop ids in float32: fp16 would round sizes
    above 2048); ``source_index`` says which rows they are. ``encoders``: the VAE and the
    :class:`~lcm_kit.conditioning.PromptEncoder`. Images are decoded a batch at a time and each batch's outputs are
    written into tensors allocated once per shard, so memory holds one shard's outputs and one batch of pixels (no
    per-batch lists to concatenate)."""
    vae, text = encoders
    dtype, out, index = CS.CACHE_DTYPES[config.cache_dtype], {}, []
    for chunk in _valid_batches(config, source, rows, batch_size):
        pixels, values = torch.stack([x for _, x, _, _ in chunk]), {}
        for flip in (False, True) if config.random_flip else (False,):
            sfx = "_flip" if flip else ""
            mean, std = encode_posterior(vae, pixels.flip(-1) if flip else pixels)
            values["latent_mean" + sfx], values["latent_std" + sfx] = mean, std
            if text.xl:
                ids = [size_ids(size, box, config.resolution, flip) for _, _, _, (size, box) in chunk]
                values["add_time_ids" + sfx] = torch.stack(ids)
        values.update(text([c for _, _, c, _ in chunk]))
        for name, value in values.items():
            if name not in out:
                kind = torch.float32 if name.startswith("add_time_ids") else dtype
                out[name] = torch.empty((len(rows), *value.shape[1:]), dtype=kind)
            out[name][len(index) : len(index) + len(chunk)].copy_(value.float().cpu())  # rounded as .to(dtype)
        index += [i for i, *_ in chunk]
    tensors = {k: v[: len(index)].clone() if len(index) < len(rows) else v for k, v in out.items()}
    return {"source_index": torch.tensor(index, dtype=torch.int64), **tensors}


def _valid_batches(config: DataConfig, source, rows: range, batch_size: int):
    """``(row, pixels, caption, (size, crop box))`` of the valid samples among ``rows``, ``batch_size`` at a time."""
    chunk = []
    for i in rows:
        raw, caption = source.raw(i)
        img = decode_image(raw) if caption is not None else None
        if img is not None:
            box = crop_box(img.size, config.resolution, config.center_crop)
            chunk.append((i, crop_image(img, box, config.resolution, False), caption, (img.size, box)))
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass(frozen=True)
class BuildContext:
    """How the processes that see one ``cache_dir`` share the build: this process encodes shards ``k`` with
    ``k % world == rank``; ``barrier`` waits for every process of the run; ``rank == 0`` writes the index;
    ``from_main(compute)`` is the main process's ``compute()`` on every process (only the main process runs it)."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None
    from_main: Callable[[Callable[[], Any]], Any] = lambda compute: compute()


def build_share(config: DataConfig, source, folder: Path, key: str, encoders: tuple, ctx: BuildContext) -> None:
    """Encodes and writes this process's missing or unreadable shards, with a progress bar (size, throughput)."""
    from tqdm.auto import tqdm

    xl = encoders[1] is not None and encoders[1].xl  # no encoders: nothing to encode, the key tells SDXL caches apart
    n, size, names = _n_rows(config, source), config.cache_shard_size, CS.tensor_names(config.random_flip, xl)
    mine = range(ctx.rank, math.ceil(n / size), ctx.world)
    todo = [k for k in mine if CS.shard_rows(CS.shard_path(folder, k), key, names) is None]
    total = sum(len(range(k * size, min(n, (k + 1) * size))) for k in todo)
    if len(todo) < len(mine):
        logger.info("latent cache %s: %d of %d shard(s) already on disk", folder, len(mine) - len(todo), len(mine))
    written, t0 = 0, time.perf_counter()
    bar = tqdm(total=total, desc=f"encoding the latent cache [{ctx.rank}/{ctx.world}]", unit="img", disable=not todo)
    for k in todo:
        rows = range(k * size, min(n, (k + 1) * size))
        written += CS.write_shard(folder, k, encode_shard(config, source, rows, encoders), key).stat().st_size
        bar.set_postfix_str(f"{written / 2**20:.1f} MiB", refresh=False)
        bar.update(len(rows))
    bar.close()
    if todo:
        dt = time.perf_counter() - t0
        logger.info("latent cache: encoded %d image(s) in %d shard(s), %.1f MiB, %.1f s (%.1f img/s)", total,
                    len(todo), written / 2**20, dt, total / max(dt, 1e-9))  # fmt: skip


def _n_rows(config: DataConfig, source) -> int:
    return len(source) if config.max_train_samples is None else min(config.max_train_samples, len(source))


def _drop_damaged(folder: Path, key: str, cache_dir: str) -> None:
    """Removes temp files of a killed build, and shards that differ from the index (with the index: it is written
    again once they are rebuilt). ``ValueError`` if there is something to repair and ``cache_dir`` is read-only."""
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    index = CS.read_index(folder, key)
    bad = CS.corrupt_shards(folder, index) if index is not None else []
    if bad:
        check_writable(cache_dir, "cache_dir")
    for k in bad:
        CS.shard_path(folder, k).unlink(missing_ok=True)
    if bad or (index is None and (folder / CS.INDEX_NAME).exists()):
        (folder / CS.INDEX_NAME).unlink()


def cached_latents(
    config: DataConfig, teacher_dir, source, vae, text: PromptEncoder | None, ctx: BuildContext = BuildContext()
) -> tuple[CS.ShardedLatentCache, int, Path]:
    """Opens the cache for this teacher/data/transform, building (or completing, or repairing) it first if needed.

    Every process of a multi-process run calls it with its :class:`BuildContext`; all of them pass the same
    barriers, whatever is on disk.

    Returns:
        ``(cache, number of skipped samples, cache folder)``.

    Raises:
        ValueError: the data set has no valid sample, or the cache has to be written and ``cache_dir`` cannot be.
    """
    folder = ctx.from_main(lambda: cache_path(config, teacher_dir, source))  # hashes the whole data set: once
    key = folder.name
    if ctx.rank == 0:
        _drop_damaged(folder, key, config.cache_dir)
    ctx.barrier()
    complete = (folder / CS.INDEX_NAME).is_file()
    if not complete:
        check_writable(config.cache_dir, "cache_dir")  # before anything is decoded or encoded, not after
        build_share(config, source, folder, key, (vae, text), ctx)
    ctx.barrier()
    if ctx.rank == 0 and not complete:
        index = CS.write_index(folder, key, _n_rows(config, source), config.cache_shard_size)
        logger.info("wrote latent cache %s (%d samples, %d skipped)", folder, len(index.shard), index.n_skipped)
    ctx.barrier()
    index = CS.read_index(folder, key)
    assert index is not None, f"no index in {folder} after the build"
    if not len(index.shard):
        raise ValueError(f"the training dataset is empty: {len(source)} sample(s), {index.n_skipped} unreadable")
    return CS.ShardedLatentCache(folder, index), index.n_skipped, folder
