"""lcm_kit.atomic: the one temp-file + rename writer behind every saved weight, cache and JSON index."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lcm_kit.atomic import atomic_write, save_safetensors, write_json


def test_save_safetensors_round_trip(tmp_path):
    path = save_safetensors({"a": torch.arange(6.0).reshape(2, 3).t()}, tmp_path / "sub" / "w.safetensors", {"k": "v"})
    assert torch.equal(load_file(path)["a"], torch.arange(6.0).reshape(2, 3).t())  # non-contiguous input is fine
    assert [p.name for p in path.parent.iterdir()] == ["w.safetensors"]  # no temp file left


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = write_json(tmp_path / "index.json", {"b": 1, "a": 2})
    assert path.read_text() == json.dumps({"a": 2, "b": 1}, indent=2) + "\n"  # keys sorted

    def broken(tmp: str) -> None:
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"a": 2, "b": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_files_get_the_umask_permissions_of_a_plain_open(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "a.json", {"x": 1})
        (tmp_path / "plain").write_text("x")
        assert oct(path.stat().st_mode & 0o777) == oct((tmp_path / "plain").stat().st_mode & 0o777) == "0o644"
        os.umask(0o077)
        assert path.stat().st_mode & 0o777 == 0o644  # unchanged file
        assert save_safetensors({"t": __import__("torch").zeros(1)}, tmp_path / "b.st").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
