"""The sharded latent cache on disk: shard files, the index, and a memory-mapped reader.

A cache folder ``<cache_dir>/lcm_cache-<key>/`` (the key is built in :mod:`lcm_kit.latent_cache`) holds:

* ``shard-00000.safetensors``, ``shard-00001.safetensors``, ... -- shard ``k`` holds the valid samples among source
  rows ``[k * S, (k + 1) * S)`` (``S = cache_shard_size``) in source order: ``source_index`` ``(n,)`` int64 and the
  cache tensors (:data:`TENSOR_NAMES`) in ``cache_dtype``. A shard is written atomically as soon as it is encoded,
  with the key in its metadata, so a build that is killed resumes from the shards already on disk.
* ``index.safetensors`` -- written once every shard is: for each of the ``N`` valid samples (what training sees, in
  source order) its ``shard`` and ``row`` (int32) and ``source_index`` (int64); metadata: the key, the number of
  skipped samples, and each shard's file name, row count and sha256.

Rows are read with ``safe_open(...).get_slice`` (the file is memory-mapped and one row copied out) through a small
LRU of open shards, so resident memory does not grow with the data set. Opening the cache checks every shard against
the sha256 in the index (one read of the cache per run: 0.2 s for the emoji set's 143 MiB); a shard that differs is
named in a warning and rebuilt, as are shards that cannot be read back.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .atomic import save_safetensors
from .digests import file_sha256
from .transforms import draw_flip, sample_generator

logger = logging.getLogger(__name__)
INDEX_NAME = "index.safetensors"
LATENT_NAMES = ("latent_mean", "latent_std")
FLIP_NAMES = ("latent_mean_flip", "latent_std_flip")
CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


XL_NAMES = ("pooled_prompt_embeds", "add_time_ids")


def tensor_names(random_flip: bool, xl: bool = False) -> tuple[str, ...]:
    """The cache tensors of a shard: posterior mean / std (and of the flipped image), caption embeddings; SDXL adds
    the pooled embedding and the size / crop ids (and those of the flipped image)."""
    xl_names = XL_NAMES + ("add_time_ids_flip",) * random_flip if xl else ()
    return LATENT_NAMES + FLIP_NAMES * random_flip + ("prompt_embeds",) + xl_names


def shard_path(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}.safetensors"


def write_shard(folder: Path, k: int, tensors: dict[str, torch.Tensor], key: str) -> Path:
    """Writes shard ``k`` atomically, the cache key in its metadata."""
    return save_safetensors(tensors, shard_path(folder, k), _meta({"key": key, "shard": k}))


def shard_rows(path: Path, key: str, names: tuple[str, ...]) -> int | None:
    """Number of rows of a complete, readable shard of this cache; ``None`` if it is missing, unreadable (cut short,
    garbled), of another cache, or lacks a tensor. An empty shard (no valid sample in its range) needs no tensor
    but ``source_index``."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if _read_meta(f).get("key") != key or "source_index" not in f.keys():
                return None
            rows = f.get_slice("source_index").get_shape()[0]
            ok = rows == 0 or all(n in f.keys() and f.get_slice(n).get_shape()[0] == rows for n in names)
    except (SafetensorError, ValueError, OSError):
        return None
    return rows if ok else None


def _meta(data: dict) -> dict[str, str]:
    """safetensors metadata as one JSON entry (a file's bytes then do not depend on the order of several entries:
    safetensors writes them in hash-map order, which differs between processes)."""
    return {"lcm_cache": json.dumps(data, sort_keys=True)}


def _read_meta(f) -> dict:
    return json.loads((f.metadata() or {}).get("lcm_cache", "{}"))


@dataclass(frozen=True)
class CacheIndex:
    """The index of a complete cache: where each valid sample is, and what each shard file must hash to."""

    shard: torch.Tensor  # (N,) int32
    row: torch.Tensor  # (N,) int32
    source_index: torch.Tensor  # (N,) int64
    n_skipped: int
    files: list[tuple[str, int, str]]  # (file name, rows, sha256) per shard


def write_index(folder: Path, key: str, n_rows: int, shard_size: int) -> CacheIndex:
    """Builds and writes the index of ``n_rows`` source rows from the shards on disk (all must be complete)."""
    sources, files = [], []
    for k in range(math.ceil(n_rows / shard_size)):
        path = shard_path(folder, k)
        with safe_open(str(path), framework="pt") as f:
            sources.append(f.get_tensor("source_index"))
        files.append((path.name, len(sources[-1]), file_sha256(path)))
    shard = torch.cat([torch.full((len(s),), k, dtype=torch.int32) for k, s in enumerate(sources)])
    row = torch.cat([torch.arange(len(s), dtype=torch.int32) for s in sources])
    n_skipped = n_rows - len(shard)
    index = CacheIndex(shard, row, torch.cat(sources), n_skipped, files)
    meta = _meta({"key": key, "n_skipped": n_skipped, "files": files})
    save_safetensors({"shard": shard, "row": row, "source_index": index.source_index}, folder / INDEX_NAME, meta)
    return index


def read_index(folder: Path, key: str) -> CacheIndex | None:
    """The folder's index, or ``None`` when there is none; a warning naming it when it is unreadable."""
    path = folder / INDEX_NAME
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = _read_meta(f)
            tensors = {n: f.get_tensor(n) for n in ("shard", "row", "source_index")}
        if meta.get("key") != key:
            raise ValueError(f"it belongs to cache {meta.get('key')!r}")
        files = [tuple(x) for x in meta["files"]]
        return CacheIndex(**tensors, n_skipped=int(meta["n_skipped"]), files=files)
    except (SafetensorError, ValueError, KeyError, OSError) as err:
        logger.warning("latent cache index %s is unreadable (%s); checking the shards and rebuilding it", path, err)
        return None


def corrupt_shards(folder: Path, index: CacheIndex) -> list[int]:
    """Shards whose bytes differ from the sha256 recorded in the index (or that are gone), each named in a warning."""
    bad = []
    for k, (name, _, sha) in enumerate(index.files):
        path = folder / name
        if not path.is_file() or file_sha256(path) != sha:
            logger.warning("latent cache shard %s is missing or corrupt (sha256 differs from the index); rebuilding "
                           "it", path)  # fmt: skip
            bad.append(k)
    return bad


class ShardedLatentCache:
    """Reads rows of a complete cache (see module docstring); at most ``max_open`` shards are mapped at a time."""

    def __init__(self, folder: Path, index: CacheIndex, max_open: int = 8):
        self.folder, self.index, self.max_open = folder, index, max_open
        self._open: OrderedDict[int, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self.index.shard)

    @property
    def nbytes(self) -> int:
        """Bytes on disk of the shards and the index."""
        return (
            sum((self.folder / name).stat().st_size for name, _, _ in self.index.files)
            + (self.folder / INDEX_NAME).stat().st_size
        )

    def row(self, name: str, i: int) -> torch.Tensor:
        """Tensor ``name`` of sample ``i`` (one row, read through the memory map), as float32."""
        k, r = int(self.index.shard[i]), int(self.index.row[i])
        return self._handle(k).get_slice(name)[r : r + 1][0].float()

    def _handle(self, k: int):
        if k in self._open:
            self._open.move_to_end(k)
        else:
            self._open[k] = safe_open(str(self.folder / self.index.files[k][0]), framework="pt")
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)  # unmapped: its pages leave resident memory
        return self._open[k]

    def __getstate__(self) -> dict:  # data loader workers open their own handles
        return {**self.__dict__, "_open": OrderedDict()}


class CachedLatentDataset(torch.utils.data.Dataset):
    """Cached samples as ``{"latent_mean", "latent_std": (C, h, w), "prompt_embeds": (L, D)}`` (SDXL adds
    ``"pooled_prompt_embeds": (P,)`` and ``"add_time_ids": (6,)``), float32; the flipped
    moments with probability 0.5 under ``random_flip`` (drawn from ``(seed, epoch, index)``, as for images)."""

    def __init__(self, cache: ShardedLatentCache, random_flip: bool, seed: int = 0, xl: bool = False):
        self.cache, self.random_flip, self.seed, self.epoch, self.xl = cache, random_flip, seed, 0, xl

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        flip = draw_flip(self.random_flip, sample_generator(self.seed, self.epoch, i))
        sfx = "_flip" if flip else ""
        row = {
            "latent_mean": self.cache.row("latent_mean" + sfx, i),
            "latent_std": self.cache.row("latent_std" + sfx, i),
            "prompt_embeds": self.cache.row("prompt_embeds", i),
        }
        if self.xl:
            row["pooled_prompt_embeds"] = self.cache.row("pooled_prompt_embeds", i)
            row["add_time_ids"] = self.cache.row("add_time_ids" + sfx, i)
        return row
