"""lcm_kit.digests: content digests and the checkpoint manifest."""

from __future__ import annotations

import hashlib
import os

import pytest

from lcm_kit.digests import MANIFEST_NAME, file_sha256, verify_manifest, write_manifest


def test_manifest_names_the_missing_or_changed_file(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "weights.safetensors").write_bytes(b"w" * 1000)
    (tmp_path / "random_states_0.pkl").write_bytes(b"r" * 100)
    assert not verify_manifest(tmp_path)  # no manifest yet: nothing to verify, no error
    write_manifest(tmp_path)
    assert verify_manifest(tmp_path)
    assert file_sha256(tmp_path / "random_states_0.pkl") == hashlib.sha256(b"r" * 100).hexdigest()
    weights = tmp_path / "unet" / "weights.safetensors"
    st = weights.stat()
    weights.write_bytes(b"w" * 999 + b"x")  # same size and mtime, one byte changed
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ValueError, match=r"unet/weights.safetensors is corrupt"):
        verify_manifest(tmp_path)
    weights.unlink()
    with pytest.raises(ValueError, match=rf"unet/weights.safetensors is missing \(listed in {MANIFEST_NAME}\)"):
        verify_manifest(tmp_path)
