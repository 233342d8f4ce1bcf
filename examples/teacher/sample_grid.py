"""Sample held-out prompts from the tiny teacher with stock diffusers (DDIM) and save a labelled grid.

Each cell shows the real emoji (left) and the teacher's sample (right) for one held-out caption, upscaled with
nearest-neighbour so the 32 px pixels stay visible::

    python examples/teacher/sample_grid.py --model models/tiny-emoji-sd --data_dir data/emoji32 \
        --out docs/teacher_ddim50.png --steps 50 --guidance 6.0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image, ImageDraw

from lcm_kit.emoji import read_split


def spread_out(data_dir: str, n: int) -> list[tuple[str, Image.Image]]:
    """``n`` test-split captions spread evenly over the split (it is sorted by code point) and their real images."""
    rows = read_split(data_dir, "test")
    picked = [rows[i * len(rows) // n] for i in range(min(n, len(rows)))]
    return [(r.text, r.image()) for r in picked]


def make_grid(items: list[tuple[str, Image.Image, Image.Image]], cols: int, scale: int = 3) -> Image.Image:
    """Cells of [real | sample] with the caption underneath."""
    side = items[0][2].width * scale
    cell_w, cell_h = 2 * side + 8, side + 26
    rows = (len(items) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (text, real, fake) in enumerate(items):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        grid.paste(real.resize((side, side), Image.NEAREST), (x, y))
        grid.paste(fake.resize((side, side), Image.NEAREST), (x + side, y))
        draw.text((x + 2, y + side + 2), text[:30], fill="black")
        draw.text((x + 2, y + side + 13), text[30:60], fill="black")
    return grid


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-emoji-sd")
    parser.add_argument("--data_dir", default="data/emoji32")
    parser.add_argument("--out", default="docs/teacher_ddim50.png")
    parser.add_argument("--num_prompts", type=int, default=48)
    parser.add_argument("--cols", type=int, default=6)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = spread_out(args.data_dir, args.num_prompts)
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe(
        [p for p, _ in prompts], num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generator
    ).images
    grid = make_grid([(p, real, fake) for (p, real), fake in zip(prompts, images, strict=True)], args.cols)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(args.out)
    return Path(args.out)


if __name__ == "__main__":
    main()
