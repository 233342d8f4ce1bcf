"""Content digests (sha256): what the latent cache is keyed on.

Size and mtime say nothing about content (``rsync -t``, ``cp -p`` and archives keep both), so caches are keyed on
the bytes. sha256 is the fastest ``hashlib`` digest on CPUs with SHA extensions (measured 667 MB/s here,
blake2b 498 MB/s).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def raw_image_sha256(raw: Any) -> str:
    """sha256 of a raw image as data sources give it: bytes, a path, a ``{"bytes", "path"}`` dict or a PIL image."""
    if isinstance(raw, dict):
        raw = raw.get("bytes") or raw.get("path")
    if isinstance(raw, (bytes, bytearray)):
        return hashlib.sha256(raw).hexdigest()
    if isinstance(raw, (str, os.PathLike)):
        return file_sha256(raw) if os.path.isfile(raw) else f"missing:{raw}"
    if hasattr(raw, "tobytes"):  # a decoded PIL image
        return hashlib.sha256(f"{raw.mode}{raw.size}".encode() + raw.tobytes()).hexdigest()
    return hashlib.sha256(repr(raw).encode()).hexdigest()


def rows_sha256(rows: Iterable[tuple[Any, Any]]) -> str:
    """sha256 over ``(raw image, caption)`` rows in order: each image's digest and the caption as JSON."""
    digest = hashlib.sha256()
    for image, caption in rows:
        digest.update(raw_image_sha256(image).encode() + json.dumps(caption, default=str).encode() + b"\n")
    return digest.hexdigest()
