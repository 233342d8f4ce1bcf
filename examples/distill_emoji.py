"""The main job on the built-in default: distill an LCM-LoRA from the tiny emoji teacher, then compare samplers.

    python examples/distill_emoji.py                       # ~10 minutes on a 2-core CPU

1. Renders the emoji dataset at the teacher's resolution (Debian's fonts-noto-color-emoji) if it is missing.
2. Runs the real distiller, ``train/distill_lora.py`` (the same script ``accelerate launch`` runs), on the committed
   teacher ``models/tiny-emoji-sd``, with :data:`RECIPE`.
3. Samples held-out prompts from the same initial noise with the teacher's DDIM-50 (the reference), DDIM-1/2/4 and
   DPM-Solver++-2/4 (all with CFG), the teacher UNet with no distillation in the LCM sampler (guidance 1; 1, 2, 4
   steps, and TCD gamma=0 at 2 and 4 steps: the baseline), and the LCM-LoRA at 1, 2 and 4 steps; scores them
   (latent MSE / PSNR vs DDIM-50, FID-emoji / KID-emoji vs the held-out images: :mod:`lcm_kit.emoji`), writes
   ``comparison.png`` and ``metrics.md`` into the output folder and prints the table (see :mod:`lcm_kit.compare`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lcm_kit.guidance import Guidance

ROOT = Path(__file__).resolve().parent.parent
# The LoRA recipe (bench/README.md, "LoRA recipe search" has what was tried): LCM objective with an EMA target
# adapter (decay 0.95), L2 loss, lr 3e-4 on a cosine schedule (20 warm-up steps), rank 16, batch 32; the student
# samples with TCD's gamma 0.3 (its sampling contract).
RECIPE = (
    "--objective", "lcm", "--train_batch_size", "32", "--lora_rank", "16", "--learning_rate", "3e-4",
    "--lr_scheduler", "cosine", "--lr_warmup_steps", "20", "--loss_type", "l2", "--lora_ema", "true",
    "--ema_decay", "0.95", "--sampling_gamma", "0.3",
)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(ROOT / "models" / "tiny-emoji-sd"), help="teacher SD folder")
    p.add_argument("--data_dir", default=str(ROOT / "data" / "emoji32"), help="emoji dataset (built if missing)")
    p.add_argument("--output_dir", default=str(ROOT / "outputs" / "emoji-lcm-lora"), help="LoRA + report folder")
    p.add_argument("--max_train_steps", type=int, default=400, help="distillation steps")
    p.add_argument("--guidance_scale", type=float, default=5.0,
                   help="teacher CFG scale; the LoRA is distilled at w = guidance_scale - 1")  # fmt: skip
    p.add_argument("--num_eval", type=int, default=0, help="held-out prompts to sample for the metrics (0: all 190)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_training", action="store_true", help="reuse the LoRA already in --output_dir")
    return p.parse_args(argv)


def ensure_dataset(data_dir: Path, size: int) -> None:
    if (data_dir / "train" / "metadata.jsonl").exists():
        return
    from lcm_kit.emoji import build_emoji_dataset

    print(f"rendering the emoji dataset at {size}px into {data_dir} ...", flush=True)
    print(build_emoji_dataset(data_dir, size=size), flush=True)


def distill(args: argparse.Namespace, resolution: int, teacher_guidance: Guidance) -> None:
    w = teacher_guidance.w  # the teacher runs CFG at guidance_scale; the LoRA learns its solution at this w
    cmd = [
        sys.executable, str(ROOT / "train" / "distill_lora.py"),
        "--pretrained_teacher_model", args.teacher, "--train_data_dir", str(Path(args.data_dir) / "train"),
        "--output_dir", args.output_dir, "--resolution", str(resolution), "--center_crop", "true",
        "--cache_dir", str(Path(args.data_dir) / "cache"), "--max_train_steps", str(args.max_train_steps),
        *RECIPE, "--w_min", str(w), "--w_max", str(w), "--checkpointing_steps", "0", "--validation_steps", "0",
        "--report_to", "none", "--seed", str(args.seed), "--mixed_precision", "no",
        "--cache_dtype", "fp32",  # the committed models/ were trained from an fp32 cache: they re-train bit for bit
    ]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def compare(args: argparse.Namespace) -> str:
    from lcm_kit import compare as C
    from lcm_kit.emoji import held_out, load_feature_net

    prompts, real = held_out(args.data_dir, args.num_eval or None)
    runs = C.run_comparison(args.teacher, prompts, real, load_feature_net(), {"LCM-LoRA": args.output_dir},
                            guidance_scale=args.guidance_scale, seed=args.seed, teacher_lcm=True)  # fmt: skip
    out = Path(args.output_dir)
    C.comparison_grid(runs, prompts).save(out / "comparison.png")
    table = C.format_table(runs, "DDIM-50")
    (out / "metrics.md").write_text(table + "\n")
    return table


def main(argv: list[str] | None = None) -> str:
    from lcm_kit.guidance import Guidance
    from lcm_kit.loading import native_resolution

    args = parse_args(argv)
    unet_cfg = json.loads((Path(args.teacher) / "unet" / "config.json").read_text())
    resolution = native_resolution(args.teacher)
    ensure_dataset(Path(args.data_dir), resolution)
    if not args.skip_training:
        distill(args, resolution, Guidance.decide(unet_cfg, args.guidance_scale))
    table = compare(args)
    print(table)
    print(f"\nwrote {Path(args.output_dir) / 'comparison.png'} and metrics.md")
    return table


if __name__ == "__main__":
    main()
