"""Webdataset tar shards as a random-access source: tar headers indexed once, members read by offset.

A sample is the members that share a key (webdataset convention: ``dir/abc.seg.jpg`` -> key ``dir/abc``, extension
``seg.jpg``); the image is its ``.jpg/.jpeg/.png/.webp`` member, the caption its ``.txt`` member, else
``json[caption_column]``. Nothing is decoded while indexing, and any order of access is cheap, so the sampler
shuffles and resume is exact (no shard resampling as in streaming webdataset pipelines).

A :class:`ShardSource` indexes the shards it is given: all of them for the latent cache (which needs every sample),
one shard at a time of the process's own share when training streams the shards without a cache
(:mod:`lcm_kit.streaming`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tarfile
from collections.abc import Sequence
from typing import Any

from .digests import file_sha256
from .metadata import caption_text

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ShardSource:
    """Webdataset tar shards indexed by member offsets (see module docstring)."""

    def __init__(self, shards: Sequence[str], caption_column: str):
        self.shards, self.caption_column = list(shards), caption_column
        self.samples: list[dict[str, tuple[int, int, int]]] = []  # ext -> (shard index, offset, size)
        for si, path in enumerate(self.shards):
            groups: dict[str, dict[str, tuple[int, int, int]]] = {}
            for m in _members(path):
                if m.isfile() and "." in os.path.basename(m.name):
                    key, ext = _split_key(m.name)
                    groups.setdefault(key, {})[ext.lower()] = (si, m.offset_data, m.size)
            self.samples.extend(groups.values())

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> str:
        """sha256 of the shards' bytes, in order: the content, not sizes or mtimes."""
        return hashlib.sha256(" ".join(file_sha256(p) for p in self.shards).encode()).hexdigest()

    def _read(self, loc: tuple[int, int, int]) -> bytes:
        si, offset, size = loc
        with open(self.shards[si], "rb") as f:
            f.seek(offset)
            return f.read(size)

    def raw(self, i: int) -> tuple[Any, str | None]:
        sample = self.samples[int(i)]
        img_ext = next((e for e in IMAGE_EXTS if e in sample), None)
        image = {"bytes": self._read(sample[img_ext]), "path": None} if img_ext else None
        if "txt" in sample:
            try:
                return image, self._read(sample["txt"]).decode("utf-8").strip()
            except UnicodeDecodeError:  # a corrupt caption: the sample is skipped and counted
                return image, None
        return image, caption_text(self._json(sample).get(self.caption_column))

    def _json(self, sample: dict[str, tuple[int, int, int]]) -> dict:
        """The sample's ``.json`` member; ``{}`` when it has none or it is not a JSON object."""
        try:
            meta = json.loads(self._read(sample["json"])) if "json" in sample else {}
        except ValueError:  # malformed JSON or not UTF-8: no caption, the sample is skipped and counted
            return {}
        return meta if isinstance(meta, dict) else {}

    def check_columns(self) -> None:
        """Raises ``ValueError`` naming the members found when the first sample has no image or no caption."""
        if not self.samples:
            return
        image, caption = self.raw(0)
        if image is None or caption is None:
            found = sorted(self.samples[0])
            found += [f"json.{k}" for k in self._json(self.samples[0])]
            raise ValueError(
                f"shard samples need an image ({'/'.join(IMAGE_EXTS)}) and a caption (.txt or json key "
                f"{self.caption_column!r}); available columns in the first sample: {found}"
            )


def _members(path: str) -> list[tarfile.TarInfo]:
    """The shard's tar headers. ``ValueError`` naming the shard if it is not a tar, is cut short (tarfile stops
    quietly at a header cut in half: the bytes left after the last member must be the end-of-archive zeros)."""
    try:
        with tarfile.open(path, "r:") as tar:
            members, end = tar.getmembers(), tar.offset
    except tarfile.TarError as err:
        raise ValueError(f"train_shards: {path} is not a readable tar shard ({err}); remove or replace it") from err
    with open(path, "rb") as f:
        f.seek(end)
        if f.read().strip(b"\0"):
            raise ValueError(f"train_shards: {path} is not a readable tar shard (cut short or garbage after byte "
                             f"{end}); remove or replace it")  # fmt: skip
    return members


def _split_key(name: str) -> tuple[str, str]:
    """Webdataset convention: ``dir/abc.seg.jpg`` -> key ``dir/abc``, extension ``seg.jpg``."""
    folder, _, base = name.rpartition("/")
    key, ext = base.split(".", 1)
    return f"{folder}/{key}" if folder else key, ext


def expand_shards(spec: str) -> list[str]:
    """Comma-separated paths or globs -> sorted, de-duplicated list of existing files (``ValueError`` if none)."""
    paths: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        matches = sorted(glob.glob(part))
        if not matches:
            raise ValueError(f"train_shards entry {part!r} matches no file")
        paths.extend(m for m in matches if m not in paths)
    return paths
