"""lcm_kit.streaming: webdataset shards streamed without a cache, each rank reading only its own shards, and exact
resume (in one process and under a 2-process ``accelerate launch``)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_data import make_shards
from test_train import SCRIPT, base_args, load_script, two_process_digests

from lcm_kit.data import DataConfig
from lcm_kit.streaming import ShardStream, StreamSampler, all_shards, stream_data

OPENED: list[str] | None = None  # paths opened while recording (an audit hook: real file opens, no patching)


def _record_opens(event: str, args: tuple) -> None:
    if OPENED is not None and event == "open" and isinstance(args[0], (str, os.PathLike)):
        OPENED.append(os.fspath(args[0]))


sys.addaudithook(_record_opens)


def shard_captions(pattern: str) -> dict[str, set[str]]:
    """Each shard's captions (``shard caption <k>``, the .txt members)."""
    out = {}
    for path in all_shards(DataConfig(train_shards=pattern, resolution=16), 1):
        with tarfile.open(path) as tar:
            out[path] = {tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")}
    return out


def shard_args(teacher: Path, pattern: str, out: Path, steps: int, *extra: str) -> list[str]:
    """``base_args`` reading ``--train_shards pattern`` instead of an image folder."""
    argv = base_args(teacher, "unused", out, steps, *extra)
    argv[argv.index("--train_data_dir") : argv.index("--train_data_dir") + 2] = ["--train_shards", pattern]
    return argv


def test_each_rank_reads_only_its_own_shards_in_its_own_batches(tmp_path, caplog):
    # 4 shards (4 with one corrupt image, 4, 2, 3 samples) for 2 ranks: rank 0 owns shards 0 and 2 (6 samples),
    # rank 1 shards 1 and 3 (7); batch 2 -> min(6, 7) // 2 = 3 batches per rank and epoch.
    from accelerate.data_loader import BatchSamplerShard

    global OPENED
    pattern = make_shards(tmp_path / "shards", n_per_shard=(3, 4, 2, 3), corrupt=1)
    shards, captions = all_shards(DataConfig(train_shards=pattern, resolution=16), 2), shard_captions(pattern)
    cfg = DataConfig(train_shards=pattern, resolution=16, random_flip=True)
    ref = [stream_data(cfg, 2, 5, r, 2, lambda mine: mine)[1].sizes[0] for r in (0, 1)]
    assert ref == [[4, 2], [4, 3]]
    seen: dict[tuple[int, int], list[str]] = {}
    for rank in (0, 1):
        OPENED = []
        with caplog.at_level("WARNING"):
            ds, sampler = stream_data(cfg, 2, 5, rank, 2, lambda mine: [(mine[0][0], s) for s in ref])
            assert isinstance(ds, ShardStream) and len(sampler) == 2 * 3 * 2
            batches = BatchSamplerShard(torch.utils.data.BatchSampler(sampler, 2, False), 2, rank)  # accelerate's
            for epoch in (0, 1):
                sampler.set_epoch(epoch)
                ds.set_epoch(epoch)
                seen[rank, epoch] = [ds[g]["caption"] for batch in batches for g in batch]
        opened, OPENED = {p for p in OPENED if p.endswith(".tar")}, None
        mine = shards[rank::2]
        assert opened == set(mine)  # its own shards (headers, then samples), never another rank's
        assert all(len(seen[rank, e]) == 6 for e in (0, 1))
        own = set().union(*(captions[p] for p in mine))
        assert all(c in own for e in (0, 1) for c in seen[rank, e])
        assert seen[rank, 0] != seen[rank, 1]  # reshuffled every epoch
    # the corrupt sample (the 4th of shard 0) is replaced by the next valid one of rank 0, with a warning naming it
    assert f"sample 3 of {shards[0]}" in caplog.text and "replaced" in caplog.text
    # samples of one shard are read together: in the first epoch rank 1 reads one shard, then the other
    shard_of = [next(p for p in shards if c in captions[p]) for c in seen[1, 0]]
    assert sum(a != b for a, b in zip(shard_of, shard_of[1:], strict=False)) <= 1
    # the sampler is the same on every rank, and batch j of it is what accelerate hands to rank j % 2
    order = list(StreamSampler(ref, 2, 5))
    assert [g % 2 for g in order] == [0, 0, 1, 1] * 3


def test_too_few_shards_too_few_samples_and_max_train_samples_fail(tmp_path):
    pattern = make_shards(tmp_path / "shards", n_per_shard=(3, 2))
    cfg = DataConfig(train_shards=pattern, resolution=16)
    with pytest.raises(ValueError, match=r"--train_shards gives 2 shard\(s\) for 3 processes"):
        all_shards(cfg, 3)
    with pytest.raises(ValueError, match=r"fewer samples than --train_batch_size 3 \(samples per process: \[3, 2\]"):
        StreamSampler([[3], [2]], 3)
    with pytest.raises(ValueError, match="max_train_samples needs --cache_dir with --train_shards"):
        DataConfig(train_shards=pattern, resolution=16, max_train_samples=2)
    DataConfig(train_shards=pattern, resolution=16, max_train_samples=2, cache_dir=str(tmp_path), center_crop=True)


@pytest.mark.parametrize("teacher", ["tiny_sd_dir", "tiny_sdxl_dir"])
def test_streamed_run_resumes_exactly(tmp_path, request, teacher):
    # 2 shards (3 + a corrupt one, 2) streamed by one process, batch 2, accumulation 2: 3 batches an epoch, so the
    # resume point is mid-epoch and the run crosses epochs (the corrupt sample is replaced in both runs alike); SDXL:
    # the streamed samples carry their size / crop ids
    main, teacher = load_script().main, request.getfixturevalue(teacher)
    pattern = make_shards(tmp_path / "shards", corrupt=1)
    extra = ("--gradient_accumulation_steps", "2", "--random_flip")

    def args(out, steps, *more):
        return shard_args(teacher, pattern, out, steps, *extra, *more)

    assert main(args(tmp_path / "a", 4)) == 0
    assert main(args(tmp_path / "b", 3)) == 0
    assert main(args(tmp_path / "b", 4, "--resume_from_checkpoint", "latest")) == 0
    a, b = (load_file(tmp_path / d / "pytorch_lora_weights.safetensors") for d in "ab")
    mid = load_file(tmp_path / "b" / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert max((a[k] - mid[k]).abs().max().item() for k in a) > 1e-5  # the resumed run did train


@pytest.mark.slow
def test_two_process_streamed_run_resumes_exactly(tmp_path, tiny_sd_dir):
    pattern = make_shards(tmp_path / "shards", n_per_shard=(3, 4, 2, 3), corrupt=1)

    def args(out, steps, *more):
        return shard_args(tiny_sd_dir, pattern, out, steps, "--random_flip", *more)

    # 13 samples, 4 shards: 6 and 7 per rank, batch 2 -> 3 batches per rank and epoch. Checkpoints every 2 steps:
    # the resume from step 4 starts mid-epoch 1, so the skipping loader must be at epoch 1 too
    a = two_process_digests(tmp_path / "a", args(tmp_path / "a", 6))
    two_process_digests(tmp_path / "b", args(tmp_path / "b", 5))
    b = two_process_digests(tmp_path / "b", args(tmp_path / "b", 6, "--resume_from_checkpoint", "latest"))
    assert a[0] == a[1] == b[0] == b[1]
    assert "streaming 13 samples from 4 shard(s)" in (tmp_path / "a" / "launch.log").read_text()
    # one shard for two processes: refused, naming the flag and the counts
    one = make_shards(tmp_path / "one", n_per_shard=(4,))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
           *shard_args(tiny_sd_dir, one, tmp_path / "c", 2)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(SCRIPT).parents[1]),
           "ACCELERATE_USE_CPU": "true"}  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "--train_shards gives 1 shard(s) for 2 processes" in proc.stderr
