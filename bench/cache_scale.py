"""Latent cache at scale: peak memory, build throughput, disk bytes and data time per step (issue 15).

Synthetic image folders (16 px coloured discs, one caption each) of the given sizes, a tiny teacher whose text
encoder has SD1.5's caption-embedding size (77 x 768, so one fp32 embedding is 236 KB as in SD1.5). Every
measurement runs in a fresh subprocess, so its peak RSS (``VmHWM``, everything the process touched: torch's
allocations and the pages of memory-mapped shards it read) is its own. Reported:

* ``build``: peak RSS of a fresh 1-process cache build, its throughput (images/s, content hashing included) and the
  disk bytes per sample (fp32 at every size, fp16 at the first);
* ``train``: peak RSS of 20 training steps (``train/distill_lora.py``, batch 8) reading that cache;
* ``2 procs``: the same build under ``accelerate launch`` with 2 CPU processes (gloo), throughput;
* step time: loading one batch of 8 and turning it into latents + embeddings (data), then the teacher UNet's forward
  and backward on it (a training step's UNet work), interleaved rounds, for the sharded cache (memory-mapped rows),
  the whole cache loaded in RAM (the one-file cache before issue 15) and encoding on the fly (no cache); medians.

    python bench/cache_scale.py --sizes 1000,4000,16000 --parallel_size 4000   # the table in bench/README.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RES, STEPS, BATCH = 16, 20, 8


def _peak_mb() -> float:
    """This process's peak resident set (VmHWM) in MiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def make_images(folder: Path, n: int) -> Path:
    """``n`` 16 px PNGs of coloured discs with captions (metadata.jsonl); kept between runs."""
    if (folder / "metadata.jsonl").is_file():
        return folder
    from PIL import Image

    from lcm_kit.testing import synthetic_blobs

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for start in range(0, n, 1000):
        blobs = synthetic_blobs(min(1000, n - start), seed=start)
        for j, img in enumerate(blobs):
            arr = (img.permute(1, 2, 0) * 255).round().byte().numpy()
            Image.fromarray(arr).resize((RES, RES), Image.BILINEAR).save(folder / f"{start + j}.png")
            rows.append({"file_name": f"{start + j}.png", "text": f"a disc, sample {start + j} of {n}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def data_config(images: Path, cache_dir: Path, dtype: str = "fp32"):
    from lcm_kit.data import DataConfig

    return DataConfig(train_data_dir=str(images), resolution=RES, center_crop=True, cache_dir=str(cache_dir),
                      cache_dtype=dtype)  # fmt: skip


def load_encoders(teacher: str) -> tuple:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from lcm_kit.conditioning import PromptEncoder

    return (AutoencoderKL.from_pretrained(teacher, subfolder="vae"),
            PromptEncoder([CLIPTokenizer.from_pretrained(teacher, subfolder="tokenizer")],
                          [CLIPTextModel.from_pretrained(teacher, subfolder="text_encoder")]))  # fmt: skip


# ----------------------------------------------------------------------------------------------- child processes
def child_build(teacher: str, images: Path, cache_dir: Path, dtype: str) -> dict:
    """Builds the cache (1 process, or this rank's share under accelerate launch); seconds between barriers."""
    from accelerate import PartialState

    from lcm_kit.data import open_source
    from lcm_kit.distill.setup import from_main_process
    from lcm_kit.latent_cache import BuildContext, cached_latents

    state = PartialState(cpu=True)  # without cpu=True, each process of `launch --multi_gpu` on CPU runs alone
    cfg, encoders = data_config(images, cache_dir, dtype), load_encoders(teacher)
    source = open_source(cfg)
    ctx = BuildContext(state.process_index, state.num_processes, state.wait_for_everyone, from_main_process(state))
    state.wait_for_everyone()
    t0 = time.perf_counter()
    cache, _, _ = cached_latents(cfg, teacher, source, *encoders, ctx)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "n": len(cache), "bytes": cache.nbytes, "peak_mb": _peak_mb()}


def child_train(teacher: str, images: Path, cache_dir: Path, out: Path) -> dict:
    """20 training steps from the (already built) cache."""
    sys.path.insert(0, str(ROOT / "train"))
    from distill_lora import main

    argv = ["--pretrained_teacher_model", teacher, "--train_data_dir", str(images), "--output_dir", str(out),
            "--resolution", str(RES), "--center_crop", "--cache_dir", str(cache_dir), "--max_train_steps",
            str(STEPS), "--train_batch_size", str(BATCH), "--lora_rank", "4", "--checkpointing_steps", "0",
            "--validation_steps", "0", "--report_to", "none", "--cache_dtype", "fp32"]  # fmt: skip
    t0 = time.perf_counter()
    assert main(argv) == 0
    return {"seconds": time.perf_counter() - t0, "peak_mb": _peak_mb()}


class _InRam:
    """The whole cache as in-RAM tensors, read like the one-file cache before issue 15."""

    def __init__(self, cache):
        names = ("latent_mean", "latent_std", "prompt_embeds")
        self.t = {n: torch.stack([cache.row(n, i) for i in range(len(cache))]) for n in names}

    def __len__(self) -> int:
        return len(self.t["latent_mean"])

    def row(self, name: str, i: int):
        return self.t[name][i]


def child_steps(teacher: str, images: Path, cache_dir: Path, rounds: int) -> dict:
    """Data time per step (batch load + latents_and_cond), interleaved over the three ways of feeding training."""
    from lcm_kit.cache_shards import CachedLatentDataset
    from lcm_kit.data import EpochSampler, build_dataset, open_source
    from lcm_kit.distill.networks import load_teacher
    from lcm_kit.latent_cache import cached_latents

    cfg = data_config(images, cache_dir)
    t = load_teacher(teacher, torch.device("cpu"), torch.float32)
    cache, _, _ = cached_latents(cfg, teacher, open_source(cfg), None, None)
    feeds = {"sharded cache": CachedLatentDataset(cache, False),
             "in-RAM cache": CachedLatentDataset(_InRam(cache), False),
             "on the fly": build_dataset(cfg)[0]}  # fmt: skip
    loaders = {k: iter(torch.utils.data.DataLoader(ds, batch_size=BATCH, sampler=EpochSampler(len(ds), 0)))
               for k, ds in feeds.items()}  # fmt: skip
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in feeds}
    t.unet.requires_grad_(True)
    for r in range(rounds):
        for k, it in loaders.items():
            t0 = time.perf_counter()
            latents, text = t.latents_and_cond(next(it), torch.Generator().manual_seed(r))
            t1 = time.perf_counter()
            t.unet(latents, torch.full((len(latents),), 500), text.embeds).sample.square().mean().backward()  # UNet
            times[k].append((t1 - t0, time.perf_counter() - t0))
    return {k: [1000 * statistics.median(x[j] for x in v[1:]) for j in (0, 1)] for k, v in times.items()}


# ----------------------------------------------------------------------------------------------- parent
def _run(args: list[str], launch: bool = False) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true"}
    pre = [sys.executable]
    if launch:
        pre += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    proc = subprocess.run([*pre, __file__, "--child", *map(str, args)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build(teacher: Path, images: Path, cache_dir: Path, dtype: str, launch: bool = False) -> dict:
    """A fresh build (any cache left by an earlier run is removed first) in a child process."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    return _run(["build", teacher, images, cache_dir, dtype], launch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000,4000,16000")
    p.add_argument("--parallel_size", type=int, default=4000, help="data set size of the 1 vs 2 process build")
    p.add_argument("--work", default="/tmp/lcm_cache_scale")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, *rest = a.child
        fn = {"build": child_build, "train": child_train, "steps": child_steps}[kind]
        rest = [int(x) if x.isdigit() else Path(x) if "/" in x else x for x in rest]
        torch.set_num_threads(1)
        result = fn(str(rest[0]), *rest[1:])
        if os.environ.get("RANK", "0") == "0":
            print(json.dumps(result))
        return
    from lcm_kit.testing import save_tiny_sd_folder

    work = Path(a.work)
    teacher = work / "teacher"
    if not (teacher / "model_index.json").is_file():
        save_tiny_sd_folder(teacher, cross_attention_dim=768)
    print("| images | build peak RSS | train (20 steps) peak RSS | build img/s | bytes/sample (fp32, fp16) |")
    print("|---:|---:|---:|---:|---:|")
    sizes = [int(x) for x in a.sizes.split(",")]
    for n in sizes:
        images = make_images(work / f"images-{n}", n)
        b = build(teacher, images, work / f"cache-{n}", "fp32")
        h = build(teacher, images, work / f"cache16-{n}", "fp16") if n == sizes[0] else None  # same per sample
        tr = _run(["train", teacher, images, work / f"cache-{n}", work / f"out-{n}"])
        half = f", {h['bytes'] / h['n'] / 1024:.1f} KiB" if h else ""
        print(f"| {n} | {b['peak_mb']:.0f} MiB | {tr['peak_mb']:.0f} MiB | {b['n'] / b['seconds']:.0f} | "
              f"{b['bytes'] / b['n'] / 1024:.1f} KiB{half} |", flush=True)  # fmt: skip
    n = a.parallel_size
    images = make_images(work / f"images-{n}", n)
    one = build(teacher, images, work / f"par1-{n}", "fp32")
    two = build(teacher, images, work / f"par2-{n}", "fp32", launch=True)
    r1, r2 = one["n"] / one["seconds"], two["n"] / two["seconds"]
    print(f"\nbuild of {n} images: 1 process {r1:.0f} img/s, 2 processes {r2:.0f} img/s ({r2 / r1:.2f}x)")
    n = int(a.sizes.split(",")[0])  # built above
    steps = _run(["steps", teacher, work / f"images-{n}", work / f"cache-{n}", a.rounds])
    print(f"\nbatch {BATCH}, {n} images, median of {a.rounds - 1} interleaved rounds | data ms | data + UNet "
          "fwd/bwd ms | step ratio to the in-RAM cache\n|---|---:|---:|---:|")  # fmt: skip
    ram = steps["in-RAM cache"][1]
    for k, (data, step) in steps.items():
        print(f"| {k} | {data:.2f} | {step:.1f} | {step / ram:.3f} |")


if __name__ == "__main__":
    main()
