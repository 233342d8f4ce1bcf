"""Training data: image/caption sources, transforms, and an optional latent + text-embedding cache.

Three sources, one per option of :class:`DataConfig`, all read as a random-access list of ``(image, caption)``:

* ``train_data_dir``: an image folder with ``metadata.jsonl`` or ``metadata.csv`` captions, loaded with
  ``datasets.load_dataset("imagefolder", data_dir=...)`` (columns ``image`` and e.g. ``text``).
* ``dataset_name``: a ``datasets`` hub name, ``datasets.load_dataset(name, config, split="train")``.
* ``train_shards``: webdataset tar shards (comma-separated paths or globs). A sample is the members that share a
  key (the name up to the first dot); the image is its ``.jpg/.jpeg/.png/.webp`` member, the caption its ``.txt``
  member, else ``json[caption_column]``. Tar headers are indexed once at start (nothing decoded), so shards are
  read by offset in any order: shuffling is the sampler's and resume is exact, unlike streaming shard resampling.
  Training without ``cache_dir`` streams them instead (:mod:`lcm_kit.streaming`): each process indexes and reads
  only its own shards, with no start-up scan; bad samples are then replaced as they are found.

Otherwise every image is decoded once before training (:func:`build_dataset` / :func:`scan_valid`, or the cache
build): unreadable or corrupt ones are skipped, counted and reported, never crash a run, and so are rows without a
caption (null, no caption key, an empty CSV field: never the literal caption ``"None"``); no valid sample at all
raises ``ValueError``. A file that cannot be read as data at all (a malformed ``metadata.csv`` /
``metadata.jsonl``, a shard that is not a whole tar) raises a ``ValueError`` naming it (and the line) before any
image is decoded.

Transforms (:mod:`lcm_kit.transforms`, no torchvision): resize the short side, center or random crop, optional flip,
``[-1, 1]``; random choices are seeded by ``(seed, epoch, index)``, so they repeat exactly on resume.

The cache (:mod:`lcm_kit.latent_cache`, shards on disk read through a memory map) stores VAE posterior mean and
std, both times ``scaling_factor``, and the text-encoder hidden states of each caption, so training draws a fresh
latent sample ``mean + std * eps`` each time (what ``latent_dist.sample()`` does) without running the VAE or the
text encoder.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from .digests import rows_sha256
from .images import to_rgb
from .metadata import caption_text, check_metadata_files
from .shards import ShardSource, expand_shards
from .transforms import crop_box, crop_image, draw_flip, sample_generator, size_ids

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    """Where the training images come from and how they are transformed."""

    _argument_group_name = "data"

    train_data_dir: str | None = field(
        default=None, metadata={"help": "Image folder with metadata.jsonl / metadata.csv captions (imagefolder)."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` hub name (train split)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of --dataset_name."})
    train_shards: str | None = field(
        default=None, metadata={"help": "Webdataset tar shards: comma-separated paths or globs."}
    )
    image_column: str = field(default="image", metadata={"help": "Image column (imagefolder / hub datasets)."})
    caption_column: str = field(
        default="text", metadata={"help": "Caption column; for shards the json key used when there is no .txt."}
    )
    resolution: int | None = field(
        default=None, metadata={"help": "Square training resolution in pixels; default 512 (SD), 1024 (SDXL)."}
    )
    center_crop: bool = field(default=False, metadata={"help": "Center crop (default: random crop)."})
    random_flip: bool = field(default=False, metadata={"help": "Random horizontal flip with p = 0.5."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N samples."})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Precompute VAE latents + text embeddings into this folder once and reuse them."},
    )
    cache_dtype: Literal["fp32", "fp16", "bf16"] = field(
        default="fp16",
        metadata={"help": "dtype of the cached latent moments and text embeddings (read as fp32); fp16 halves the "
                  "cache and moves the loss by < 0.1 %, fp32 gives the batches of encoding on the fly bit for bit."},
    )  # fmt: skip
    cache_shard_size: int = field(default=256, metadata={"help": "Samples per latent cache shard file."})

    def __post_init__(self):
        sources = [s for s in (self.train_data_dir, self.dataset_name, self.train_shards) if s]
        if len(sources) != 1:
            raise ValueError(
                "give exactly one of --train_data_dir, --dataset_name, --train_shards; got "
                f"train_data_dir={self.train_data_dir!r}, dataset_name={self.dataset_name!r}, "
                f"train_shards={self.train_shards!r}"
            )
        if self.train_data_dir and not Path(self.train_data_dir).is_dir():
            raise ValueError(f"train_data_dir {self.train_data_dir!r} is not a directory")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.max_train_samples is not None and self.max_train_samples <= 0:
            raise ValueError(f"max_train_samples must be > 0, got {self.max_train_samples}")
        if self.cache_dtype not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"cache_dtype must be fp32, fp16 or bf16, got {self.cache_dtype!r}")
        if self.cache_shard_size <= 0:
            raise ValueError(f"cache_shard_size must be > 0, got {self.cache_shard_size}")
        if self.train_shards and not self.cache_dir and self.max_train_samples is not None:
            raise ValueError("max_train_samples needs --cache_dir with --train_shards (without a cache the shards "
                             "are streamed whole, one share per process): pass fewer shards instead")  # fmt: skip
        if self.cache_dir and not self.center_crop:
            raise ValueError("a latent cache needs a fixed crop: pass --center_crop with --cache_dir")


# ----------------------------------------------------------------------------------------------- sources
class HFSource:
    """A ``datasets.Dataset`` read as raw image (bytes or path) + caption, images left undecoded."""

    def __init__(self, ds, image_column: str, caption_column: str):
        import datasets

        missing = [c for c in (image_column, caption_column) if c not in ds.column_names]
        if missing:
            raise ValueError(f"column(s) {missing} not in the dataset; available columns: {ds.column_names}")
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds, self.image_column, self.caption_column = ds, image_column, caption_column

    def __len__(self) -> int:
        return len(self.ds)

    def fingerprint(self) -> str:
        """sha256 of every row's image bytes and caption, in order: the content, not sizes or mtimes."""
        image, caption = self.image_column, self.caption_column
        batches = self.ds.select_columns(list(dict.fromkeys([image, caption]))).iter(batch_size=1024)
        return rows_sha256(row for b in batches for row in zip(b[image], b[caption], strict=True))

    def raw(self, i: int) -> tuple[Any, str | None]:
        row = self.ds[int(i)]
        return row[self.image_column], caption_text(row[self.caption_column])


def open_source(config: DataConfig) -> HFSource | ShardSource:
    """Opens the configured source (no image decoded yet)."""
    if config.train_shards:
        source = ShardSource(expand_shards(config.train_shards), config.caption_column)
        source.check_columns()
        return source
    import datasets

    if config.train_data_dir:
        # datasets keys its table of a folder on file mtimes: the metadata's digest as the config name makes a
        # metadata file replaced with the same mtime be read again (see lcm_kit.metadata)
        name = "metadata-" + check_metadata_files(config.train_data_dir)[:16]
        ds = datasets.load_dataset("imagefolder", name, data_dir=config.train_data_dir, split="train")
    else:
        ds = datasets.load_dataset(config.dataset_name, config.dataset_config_name, split="train")
    return HFSource(ds, config.image_column, config.caption_column)


# ----------------------------------------------------------------------------------------------- decoding
def decode_image(raw: Any) -> Image.Image | None:
    """Decodes a raw image (PIL image, path, or ``{"bytes", "path"}`` dict) to RGB; ``None`` if unreadable."""
    try:
        if isinstance(raw, Image.Image):
            img = raw
        elif isinstance(raw, (str, os.PathLike)):
            img = Image.open(raw)
        elif isinstance(raw, dict) and raw.get("bytes"):
            img = Image.open(io.BytesIO(raw["bytes"]))
        elif isinstance(raw, dict) and raw.get("path"):
            img = Image.open(raw["path"])
        else:
            return None
        img.load()
        return to_rgb(img)  # 16-bit scaled to 8 bits, transparency onto white
    except Exception as err:  # noqa: BLE001 - any decoder failure means "skip this image"
        logger.debug("unreadable image: %s", err)
        return None


def scan_valid(source: HFSource | ShardSource, limit: int | None = None) -> tuple[list[int], list[int]]:
    """Decodes every image once; returns ``(valid indices, skipped indices)`` (caption must be present too)."""
    from tqdm.auto import tqdm

    n = len(source) if limit is None else min(limit, len(source))
    valid, skipped = [], []
    for i in tqdm(range(n), desc="checking images", unit="image", disable=n < 1000):
        raw, caption = source.raw(i)
        (valid if caption is not None and decode_image(raw) is not None else skipped).append(i)
    return valid, skipped


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Valid samples of a source as ``{"pixel_values": (3, R, R) in [-1, 1], "caption": str, "add_time_ids": (6,)}``
    (the SDXL size and crop ids, :func:`size_ids`; an SD teacher ignores them)."""

    def __init__(self, source: HFSource | ShardSource, indices: Sequence[int], config: DataConfig, seed: int = 0):
        self.source, self.indices, self.config, self.seed, self.epoch = source, list(indices), config, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        raw, caption = self.source.raw(self.indices[i])
        img = decode_image(raw)
        if img is None:  # was valid at scan time: the file changed under us
            raise RuntimeError(f"image {self.indices[i]} became unreadable after the start-up scan")
        return training_item(img, caption, self.config, sample_generator(self.seed, self.epoch, i))


def training_item(img: Image.Image, caption: str, config: DataConfig, generator: torch.Generator) -> dict[str, Any]:
    """One training sample: the flip (drawn first), then the crop from ``generator``, the caption, and the SDXL size
    and crop ids (:func:`size_ids`; an SD teacher ignores them)."""
    flip, res = draw_flip(config.random_flip, generator), config.resolution
    box = crop_box(img.size, res, config.center_crop, generator)
    return {"pixel_values": crop_image(img, box, res, flip), "caption": caption,
            "add_time_ids": size_ids(img.size, box, res, flip)}  # fmt: skip


class EpochSampler(torch.utils.data.Sampler[int]):
    """Shuffles with a permutation seeded by ``(seed, epoch)``: identical on all ranks, repeatable on resume."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())


def build_dataset(config: DataConfig, seed: int = 0) -> tuple[ImageCaptionDataset, int]:
    """Opens the source, scans it and returns ``(dataset of valid samples, number skipped)``.

    Raises:
        ValueError: missing columns, or no valid sample at all.
    """
    source = open_source(config)
    valid, skipped = scan_valid(source, config.max_train_samples)
    if skipped:
        logger.warning("skipped %d unreadable image(s) or missing caption(s) of %d", len(skipped), len(source))
    if not valid:
        raise ValueError(
            f"the training dataset is empty: {len(source)} sample(s) found, {len(skipped)} unreadable/skipped"
        )
    return ImageCaptionDataset(source, valid, config, seed), len(skipped)
