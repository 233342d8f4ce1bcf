"""Captions as read from data rows, and up-front checks of an image folder's metadata files.

``datasets``' imagefolder reads ``metadata.csv`` with pandas and ``metadata.jsonl`` with pyarrow. A caption with an
unquoted comma makes pandas shift the columns (every image then reads as "unreadable") or fail without naming the
file, and a malformed JSON line fails in pyarrow without naming the file either. :func:`check_metadata_files` reads
each metadata file once before ``datasets`` does and raises a ``ValueError`` with the file and line instead. It also
returns a digest of their bytes: ``datasets`` keys its own table of an image folder on file mtimes, so the digest
goes into that key and a metadata file replaced with the same mtime is read again (see ``data.open_source``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

# The metadata file names of datasets' folder-based builders (FolderBasedBuilder.METADATA_FILENAMES).
METADATA_FILENAMES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")


def caption_text(value: Any) -> str | None:
    """A row's caption as training text; ``None`` when missing (null, NaN, absent key, empty list).

    Several captions per image: the first, deterministically. ``None`` makes the sample be skipped and counted like
    an unreadable image; an empty string ``""`` is a real (unconditional) caption and is kept.
    """
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None or (isinstance(value, float) and value != value):  # NaN: pandas' missing value
        return None
    return str(value)


def check_metadata_files(data_dir: str | os.PathLike) -> str:
    """Checks every ``metadata.csv`` / ``metadata.jsonl`` under ``data_dir``; returns a sha256 of all metadata files.

    Raises:
        ValueError: naming the file and line of a CSV row with more fields than the header (an unquoted comma),
            of a JSON line that does not parse or is not an object, or a file that is not UTF-8.
    """
    root, digest = Path(data_dir), hashlib.sha256()
    for path in sorted(p for name in METADATA_FILENAMES for p in root.rglob(name) if p.is_file()):
        data = path.read_bytes()
        digest.update(f"{path.relative_to(root)}\0{len(data)}\0".encode() + data)
        if path.suffix in (".csv", ".jsonl"):
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}: not UTF-8 text ({err})") from err
            (_check_csv if path.suffix == ".csv" else _check_jsonl)(path, text)
    return digest.hexdigest()


def _check_csv(path: Path, text: str) -> None:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, [])
    for row in reader:
        if len(row) > len(header):
            raise ValueError(
                f"{path} is malformed: line {reader.line_num} has {len(row)} fields but the header has "
                f"{len(header)} ({', '.join(header)}); put captions that contain commas in double quotes"
            )


def _check_jsonl(path: Path, text: str) -> None:
    for number, line in enumerate(text.split("\n"), start=1):  # JSON Lines: \n only (JSON strings may hold U+2028)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg}, column {err.colno})") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object (got {type(row).__name__})")
