"""Webdataset shards streamed without a latent cache: each process reads only its own shards, resume stays exact.

For data sets bigger than the disk (shards on a network mount), ``--train_shards`` without ``--cache_dir``:

* **Ownership.** Shard ``k`` (of the sorted, expanded ``--train_shards`` list) belongs to rank ``k % world``. A
  process indexes only its own shards' tar headers (nothing decoded, no start-up scan: once at start for the sample
  counts, then each shard again when it is read, keeping one shard's index) and never opens another's.
* **Order.** Every epoch, a rank reads its shards in an order shuffled by ``(seed, epoch, rank)`` and the samples of
  each shard in an order shuffled by ``(seed, epoch, shard)``, one shard after the other (reads stay local).
* **Batches.** :class:`StreamSampler` is built identically on every rank from all ranks' per-shard sample counts
  (gathered once): batch ``j`` of an epoch is drawn from rank ``j % world``'s stream, which is exactly the batch
  accelerate's ``BatchSamplerShard`` hands to rank ``j % world``. The sampler yields global positions
  ``local index * world + rank``; :class:`ShardStream` maps them back. An epoch has
  ``world * min_r floor(n_r / batch)`` batches (the ranks must stay in step), so up to ``batch`` samples per rank
  (plus any a larger share holds) are left out of each epoch. Accelerate's ``skip_first_batches`` and ``set_epoch``
  work as with the other sources: resume is exact.
* **Bad samples.** An unreadable image or a missing caption, found when it is read, is replaced by the next valid
  sample of the same rank (source order, wrapping around), counted and logged; every rank still yields its batch.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .data import DataConfig, decode_image, training_item
from .shards import ShardSource, expand_shards
from .transforms import keyed_generator, sample_generator

logger = logging.getLogger(__name__)


def all_shards(config: DataConfig, world: int) -> list[str]:
    """The expanded ``--train_shards`` list; ``ValueError`` with fewer shards than ``world`` processes."""
    shards = expand_shards(config.train_shards)
    if len(shards) < world:
        raise ValueError(
            f"--train_shards gives {len(shards)} shard(s) for {world} processes: streaming without --cache_dir "
            "gives every process whole shards, so it needs at least one shard per process (split the data into "
            "more shards, launch fewer processes, or pass --cache_dir)"
        )
    return shards


def epoch_stream(sizes: Sequence[int], rank: int, world: int, seed: int, epoch: int) -> list[int]:
    """Local sample indices of ``rank`` in the order of ``epoch``: shards shuffled by (seed, epoch, rank), each
    shard's samples by (seed, epoch, shard) with ``shard`` the global shard index ``rank + world * s``."""
    starts = [0, *itertools.accumulate(sizes)]
    order: list[int] = []
    for s in torch.randperm(len(sizes), generator=keyed_generator("shards", seed, epoch, rank)).tolist():
        gen = keyed_generator("samples", seed, epoch, rank + world * s)
        order += (starts[s] + torch.randperm(sizes[s], generator=gen)).tolist()
    return order


class StreamSampler(torch.utils.data.Sampler[int]):
    """Global positions of an epoch, batch ``j`` from rank ``j % world`` (module docstring); the same on all ranks."""

    def __init__(self, sizes: Sequence[Sequence[int]], batch_size: int, seed: int = 0):
        self.sizes, self.batch_size, self.seed, self.epoch = [list(s) for s in sizes], batch_size, seed, 0
        self.per_rank = min(sum(s) for s in self.sizes) // batch_size  # batches per rank and epoch
        if not self.per_rank:
            counts = [sum(s) for s in self.sizes]
            raise ValueError(f"--train_shards: a process holds fewer samples than --train_batch_size "
                             f"{batch_size} (samples per process: {counts}); use more or bigger shards or a smaller "
                             "batch")  # fmt: skip

    @property
    def n_samples(self) -> int:
        """Samples in all ranks' shards (bad ones included: they are found only when read)."""
        return sum(map(sum, self.sizes))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sizes) * self.per_rank * self.batch_size

    def __iter__(self) -> Iterator[int]:
        world, b = len(self.sizes), self.batch_size
        streams = [epoch_stream(s, r, world, self.seed, self.epoch) for r, s in enumerate(self.sizes)]
        for q in range(self.per_rank):
            for r in range(world):
                yield from (i * world + r for i in streams[r][q * b : (q + 1) * b])


class ShardStream(torch.utils.data.Dataset):
    """This rank's samples by global position (``local index * world + rank``), as
    ``{"pixel_values": (3, R, R) in [-1, 1], "caption": str}``; bad samples replaced (module docstring). Only the
    shard being read is indexed (its tar headers, again when it comes round next epoch): memory holds per-shard
    counts, not per-sample entries, however big the data set."""

    def __init__(self, shards: Sequence[str], sizes: Sequence[int], rank: int, world: int, config: DataConfig,
                 seed: int = 0):  # fmt: skip
        self.shards, self.starts = list(shards), [0, *itertools.accumulate(sizes)]
        self.rank, self.world, self.config, self.seed, self.epoch = rank, world, config, seed, 0
        self.bad: set[int] = set()  # local indices found unreadable (in this process)
        self._current: tuple[int, ShardSource] | None = None  # the shard being read

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.starts[-1] * self.world

    def __getitem__(self, position: int) -> dict[str, Any]:
        rank, i = position % self.world, position // self.world
        assert rank == self.rank, f"rank {self.rank} was handed position {position} of rank {rank}"
        n = self.starts[-1]
        for j in ((i + k) % n for k in range(n)):
            if j in self.bad:
                continue
            s = bisect.bisect_right(self.starts, j) - 1
            raw, caption = self._shard(s).raw(j - self.starts[s])
            img = decode_image(raw) if caption is not None else None
            if img is not None:
                return training_item(img, caption, self.config, sample_generator(self.seed, self.epoch, position))
            self.bad.add(j)
            logger.warning("train_shards: sample %d of %s has an unreadable image or no caption; replaced by the "
                           "next valid sample (%d bad sample(s) so far in this process)", j - self.starts[s],
                           self.shards[s], len(self.bad))  # fmt: skip
        raise ValueError(f"train_shards: no readable sample with a caption in {self.shards}")

    def _shard(self, s: int) -> ShardSource:
        if self._current is None or self._current[0] != s:
            self._current = (s, ShardSource([self.shards[s]], self.config.caption_column))
        return self._current[1]


def stream_data(config: DataConfig, batch_size: int, seed: int, rank: int, world: int,
                gather: Callable[[list], list]) -> tuple[ShardStream, StreamSampler]:  # fmt: skip
    """This rank's dataset and the sampler every rank shares. ``gather`` is ``accelerate.utils.gather_object``
    (a list from each rank -> their concatenation, in rank order).

    Raises:
        ValueError: fewer shards than processes, ranks that expand ``--train_shards`` differently, a rank with fewer
            samples than a batch, or a first sample without image or caption.
    """
    shards = all_shards(config, world)
    listing = hashlib.sha256("\n".join(shards).encode()).hexdigest()
    mine, sizes = shards[rank::world], []
    for path in mine:  # each shard indexed in turn for its sample count, the first one's columns checked
        source = ShardSource([path], config.caption_column)
        sizes.append(len(source))
        if len(sizes) == 1:
            source.check_columns()
    gathered = gather([(listing, sizes)])
    if len({g[0] for g in gathered}) > 1:
        raise ValueError(f"--train_shards {config.train_shards!r} expands to different shard lists on different "
                         "processes: every process must see the same shards (the same paths)")  # fmt: skip
    sampler = StreamSampler([g[1] for g in gathered], batch_size, seed)
    return ShardStream(mine, sizes, rank, world, config, seed), sampler
