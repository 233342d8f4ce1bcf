"""Zero-shot editing with the consistency model (lcm_kit.LCMEditPipeline) against baselines, side by side.

    OMP_NUM_THREADS=1 python bench/editing.py --data_dir /work/main/data/emoji32 [--num_eval 32] [--steps 1 2 4]

On the built-in emoji teacher's held-out images (32 px), with the committed students: the full LCM
(``models/tiny-emoji-lcm``, w-embedding, guidance 5) and the LCM-LoRA on the teacher (``models/tiny-emoji-lcm-lora``,
fused, guidance 1 = no CFG). Every student is sampled with plain LCM steps (the LoRA's contract asks for TCD gamma
0.3; ``LCMEditPipeline`` needs gamma=None, so all rows, baselines included, use gamma=None). Same student, same
number of steps and seeds (image ``i``: ``seed + i``) for every method of a row group. Tasks and baselines:

* inpainting (centre 16x16 square; random masks: two rectangles of 6-16 px per image): ``inpaint`` vs diffusers'
  ``StableDiffusionInpaintPipeline`` with the 4-channel student UNet + ``LCMScheduler`` (it blends noisy latents),
  as is and with the known pixels pasted back into its output (the usual composite; same UNet evaluations);
* 4x super-resolution (8 -> 32 px box means): ``super_resolve`` vs bicubic and SDEdit (LCM img2img of the bicubic
  image at ``--sdedit_strength``);
* colorization (input: ITU-R 601 luma): ``colorize`` vs LCM img2img of the grey image at ``--sdedit_strength``;
* interpolation (prompt pairs ``i``, ``i + N/2``, ``--frames`` frames): ``interpolate`` vs the teacher's DDIM-50 (CFG
  5) on the same slerped noise and text embeddings.

Columns: UNet evaluations per image (counted by a hook; CFG counts two), FID-emoji of the results against all
held-out real images, the constraint error (max over all pixels, in 8-bit levels, of: known pixels vs the input;
4x4 box means vs the low-resolution input; luma vs the grey input), wall seconds per image (one batched call), and
for inpainting the seam (mean |difference| of 4-neighbour pixel pairs straddling the mask border, 8-bit levels; the
real images' own value is the reference) or for interpolation the smoothness (mean feature distance between
neighbouring frames; path ratio = sum of neighbour distances / distance of the two ends, 1 is a straight path).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from editing_tasks import Row, format_rows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def load_students(teacher_dir: str, lcm_dir: str, lora_dir: str) -> dict[str, tuple]:
    """``{name: (LCMEditPipeline, guidance_scale)}``: the full LCM at guidance 5, the fused LCM-LoRA at 1."""
    from lcm_kit import LCMEditPipeline, LCMKitScheduler

    lcm = LCMEditPipeline.from_pretrained(lcm_dir, safety_checker=None)
    lora = LCMEditPipeline.from_pretrained(teacher_dir, safety_checker=None)
    lora.load_lora_weights(lora_dir)
    lora.fuse_lora()
    out = {"LCM (full)": (lcm, 5.0), "LCM-LoRA": (lora, 1.0)}
    for pipe, _ in out.values():
        pipe.scheduler = LCMKitScheduler.from_config(pipe.scheduler.config, gamma=None)
        pipe.set_progress_bar_config(disable=True)
    return out


def random_masks(n: int, size: int, seed: int) -> torch.Tensor:
    """``(n, 1, size, size)`` masks (1 = repaint): two rectangles of 6-16 px per image, image ``i`` from
    ``seed + i``."""
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        for _ in range(2):
            h, w = rng.integers(6, 17, size=2)
            y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            masks[i, 0, y : y + h, x : x + w] = 1
    return masks


def centre_mask(n: int, size: int) -> torch.Tensor:
    """``(n, 1, size, size)`` masks repainting the centre square of half the side."""
    masks = torch.zeros(n, 1, size, size)
    masks[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    return masks


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(ROOT / "models" / "tiny-emoji-sd"))
    p.add_argument("--lcm_dir", default=str(ROOT / "models" / "tiny-emoji-lcm"))
    p.add_argument("--lora_dir", default=str(ROOT / "models" / "tiny-emoji-lcm-lora"))
    p.add_argument("--data_dir", default=str(ROOT / "data" / "emoji32"))
    p.add_argument("--num_eval", type=int, default=0, help="held-out images to edit (0: all)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--sdedit_strength", type=float, default=0.6, help="img2img strength of the SDEdit baselines")
    p.add_argument("--ours_strength", type=float, nargs="*", default=[0.6],
                   help="also run our inpaint / super_resolve / colorize from the task's guess at these strengths")
    p.add_argument("--frames", type=int, default=4, help="frames per interpolation, ends included")
    p.add_argument("--tasks", nargs="+", default=["inpaint", "super_resolve", "colorize", "interpolate"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import editing_tasks as T

    from lcm_kit.emoji import held_out, load_feature_net

    start = time.perf_counter()
    prompts, real_all = held_out(args.data_dir, args.num_eval or None)
    real = real_all[: len(prompts)]
    ctx = T.Context(prompts, real, real_all, load_feature_net(), args.seed, args.steps, args.sdedit_strength,
                  args.ours_strength)
    students = load_students(args.teacher, args.lcm_dir, args.lora_dir)
    rows: list[Row] = []
    size = real.shape[-1]
    if "inpaint" in args.tasks:
        for name, masks in (("centre", centre_mask(len(real), size)), ("random", random_masks(len(real), size, 0))):
            rows += T.inpaint_rows(ctx, students, masks, name)
    if "super_resolve" in args.tasks:
        rows += T.super_resolve_rows(ctx, students, factor=4)
    if "colorize" in args.tasks:
        rows += T.colorize_rows(ctx, students)
    if "interpolate" in args.tasks:
        rows += T.interpolate_rows(ctx, students, args.teacher, args.frames)
    table = format_rows(rows)
    print(" ".join(["python", "bench/editing.py", *(argv if argv is not None else sys.argv[1:])]))
    print(f"{len(prompts)} held-out images, {time.perf_counter() - start:.0f} s\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
