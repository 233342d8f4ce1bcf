"""Atomic file writes: a temp file in the target's folder, then ``os.replace`` (readers never see half a file)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Calls ``write(tmp_path)`` on a temp file next to ``path``, then renames it onto ``path``.

    The folder is created if missing; on any failure the temp file is removed and the old ``path`` is untouched.
    The file gets the permissions a plain ``open`` would give it (``0o666`` less the umask; ``mkstemp`` makes 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(folder: str | os.PathLike, argument: str = "output_dir") -> None:
    """Creates ``folder`` and probes it with a file; ``ValueError`` naming ``argument`` if it cannot be written."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_probe-"):  # unique: processes probe at once
            pass
    except OSError as err:
        raise ValueError(f"{argument} {str(folder)!r} is not writable: {err}") from err


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Saves ``tensors`` (moved to CPU, made contiguous) as a safetensors file, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Writes ``data`` as indented, key-sorted JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
