"""A cache of VAE latents and text embeddings, computed once and reused by later runs.

Format: one safetensors file ``<cache_dir>/lcm_cache-<key>.safetensors`` (written atomically: temp file + rename)
holding, for the ``N`` valid samples in source order:

* ``latent_mean``, ``latent_std`` -- ``(N, C, h, w)`` float32: the VAE posterior's mean and std, both already
  multiplied by ``vae.config.scaling_factor``; a training latent is ``mean + std * eps`` (a fresh sample each
  step, as ``latent_dist.sample() * scaling_factor``);
* ``latent_mean_flip``, ``latent_std_flip`` -- the same for the horizontally flipped images (only with
  ``random_flip``; the VAE is not flip-equivariant, so flipped images are encoded too);
* ``prompt_embeds`` -- ``(N, L, D)`` float32 text-encoder last hidden states of the captions.

The safetensors metadata holds the cache version and the number of skipped samples. ``<key>`` is a hash of
content, never of sizes or mtimes (a file replaced with the same size and mtime must not reuse stale latents): the
sha256 of the teacher's VAE / text-encoder / tokenizer files, the source's content digest (``fingerprint()``: every
image's bytes and caption as read, or the shards' bytes), the data flags and the transform, so a different teacher,
data set or resolution gets its own file. Version 2 (content keys) replaced version 1 (sizes and mtimes): caches
written before are rebuilt once. Hashing costs one read of the data per run: 0.15-0.4 s for the 3,608 images of
the emoji set (15 MB), against about 5 s for ``datasets`` to open that folder.

The cache folder is checked to be writable before the data is scanned or encoded. A cache file that cannot be read
back (truncated, garbled, or missing a tensor) is rebuilt, with a warning that names it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .atomic import check_writable, save_safetensors
from .data import DataConfig, HFSource, ImageCaptionDataset, ShardSource, scan_valid
from .digests import file_sha256

logger = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: keyed on content (1: sizes and mtimes)


def _teacher_signature(teacher_dir: str | os.PathLike) -> dict:
    """sha256 of the files the cache is computed with: the VAE, the text encoder and the tokenizer (a hub id, with
    no local folder to read: the id)."""
    root = Path(teacher_dir)
    subs = [root / sub for sub in ("vae", "text_encoder", "tokenizer") if (root / sub).is_dir()]
    if not subs:
        return {"teacher": str(teacher_dir)}
    return {f"{f.parent.name}/{f.name}": file_sha256(f) for sub in subs for f in sorted(sub.glob("*")) if f.is_file()}


def cache_path(config: DataConfig, teacher_dir: str | os.PathLike, source: HFSource | ShardSource) -> Path:
    """The cache file for this teacher, data and transform (see module docstring)."""
    data = {k: v for k, v in asdict(config).items() if k != "cache_dir"}
    key = {"version": CACHE_VERSION, "teacher": _teacher_signature(teacher_dir), "data": data}
    key["source"] = source.fingerprint()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(config.cache_dir) / f"lcm_cache-{digest}.safetensors"


def load_cache(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """Loads a cache file: ``(tensors, number of samples skipped when it was built)``."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, int(meta.get("n_skipped", 0))


def _load_or_none(path: Path, random_flip: bool) -> tuple[dict[str, torch.Tensor], int] | None:
    """:func:`load_cache`, or ``None`` (and a warning naming the file) when it is unreadable or incomplete."""
    needed = ["latent_mean", "latent_std", "prompt_embeds"] + (["latent_mean_flip", "latent_std_flip"] * random_flip)
    try:
        tensors, n_skipped = load_cache(path)
        problem = next((f"no tensor {k!r}" for k in needed if k not in tensors), None)
        if problem is None and len({tensors[k].shape[0] for k in needed}) != 1:
            problem = "tensors of different lengths"
    except (SafetensorError, ValueError) as err:  # truncated or garbled: header, offsets or metadata
        problem = str(err)
    if problem is None:
        return tensors, n_skipped
    logger.warning("latent cache %s is unreadable (%s); rebuilding it", path, problem)
    return None


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """Text-encoder last hidden states ``(B, L, D)`` of padded, truncated captions (SD1.x conditioning)."""
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


@torch.no_grad()
def encode_posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior ``(mean, std)`` of ``pixels`` (B,3,H,W) in [-1, 1], both times ``scaling_factor``, on the VAE."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    sf = vae.config.scaling_factor
    return dist.mean * sf, dist.std * sf


def build_cache(
    config: DataConfig, source, valid: list[int], vae, text_encoder, tokenizer, batch_size: int = 16
) -> dict[str, torch.Tensor]:
    """Encodes the valid samples (center crop; flipped copies too with ``random_flip``) into cache tensors."""
    ds = ImageCaptionDataset(source, valid, replace(config, random_flip=False))
    out: dict[str, list[torch.Tensor]] = {}
    flips = (False, True) if config.random_flip else (False,)
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(ds), batch_size), desc="encoding the latent cache", unit="batch"):
        items = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        pixels = torch.stack([it["pixel_values"] for it in items])  # unflipped: center crop, no random flip
        for flip in flips:
            mean, std = (x.float().cpu() for x in encode_posterior(vae, pixels.flip(-1) if flip else pixels))
            sfx = "_flip" if flip else ""
            out.setdefault("latent_mean" + sfx, []).append(mean)
            out.setdefault("latent_std" + sfx, []).append(std)
        embeds = encode_prompts(tokenizer, text_encoder, [it["caption"] for it in items])
        out.setdefault("prompt_embeds", []).append(embeds.float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def cached_latents(
    config: DataConfig, teacher_dir, source, vae, text_encoder, tokenizer
) -> tuple[dict[str, torch.Tensor], int, Path]:
    """Loads the cache for this teacher/data/transform, or scans + encodes the data and writes it.

    In multi-process runs call it on the main process first, then on the others after a barrier (they hit).

    Returns:
        ``(tensors, number of skipped samples, cache file path)``.

    Raises:
        ValueError: the data set has no valid sample, or the cache has to be written and ``cache_dir`` cannot be.
    """
    path = cache_path(config, teacher_dir, source)
    loaded = _load_or_none(path, config.random_flip) if path.exists() else None
    if loaded is not None:
        logger.info("using latent cache %s", path)
        return *loaded, path
    check_writable(config.cache_dir, "cache_dir")  # before the scan and the encoding, not after
    valid, skipped = scan_valid(source, config.max_train_samples)
    if not valid:
        raise ValueError(f"the training dataset is empty: {len(source)} sample(s), {len(skipped)} unreadable")
    tensors = build_cache(config, source, valid, vae, text_encoder, tokenizer)
    save_safetensors(tensors, path, {"n_skipped": str(len(skipped)), "version": str(CACHE_VERSION)})
    logger.info("wrote latent cache %s (%d samples, %d skipped)", path, len(valid), len(skipped))
    return tensors, len(skipped), path
