"""Zero-shot editing with the committed emoji LCM: inpainting, 4x super-resolution, colorization, interpolation.

    python examples/edit_emoji.py --data_dir data/emoji32     # a few seconds on a 2-core CPU

Takes the first ``--num`` held-out emoji (render them first with ``python -m lcm_kit.emoji --out data/emoji32
--size 32``), edits them with :class:`lcm_kit.LCMEditPipeline` on ``models/tiny-emoji-lcm`` (4 steps, guidance 5)
and writes ``docs/edit_emoji.png``: for each task a row of inputs, a row showing the constraint (the known pixels
with the repainted square grey; the 8x8 input; the grey input) and a row of results; then the interpolation frames
between the first two prompts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent


def grid(rows: list[tuple[str, torch.Tensor]], scale: int = 3, label_w: int = 200) -> Image.Image:
    """One labelled row per ``(label, images (n, 3, H, W) in [0, 1])``, images upscaled ``scale`` x (nearest)."""
    side = rows[0][1].shape[-1] * scale
    width = label_w + max(len(images) for _, images in rows) * side
    out = Image.new("RGB", (width, len(rows) * side), "white")
    draw = ImageDraw.Draw(out)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * side + side // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            tile = Image.fromarray((image.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy())
            out.paste(tile.resize((side, side), Image.NEAREST), (label_w + c * side, r * side))
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models" / "tiny-emoji-lcm"))
    p.add_argument("--data_dir", default=str(ROOT / "data" / "emoji32"))
    p.add_argument("--num", type=int, default=8, help="held-out emoji per task")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--out", default=str(ROOT / "docs" / "edit_emoji.png"))
    args = p.parse_args(argv)
    from lcm_kit import LCMEditPipeline
    from lcm_kit import functional as F
    from lcm_kit.emoji import held_out

    prompts, real = held_out(args.data_dir, args.num)
    real = real[: len(prompts)]
    pipe = LCMEditPipeline.from_pretrained(args.model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    size = real.shape[-1]
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    low, grey = F.box_downsample(real, 4), F.luma(real).expand_as(real)

    def run(method, **kw):
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return method(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, generator=gens,
                      output_type="pt", **kw).images  # fmt: skip

    frames = pipe.interpolate(prompts[:2], num_frames=len(prompts), num_inference_steps=args.steps,
                              guidance_scale=args.guidance_scale, generator=torch.Generator().manual_seed(0),
                              output_type="pt").images  # fmt: skip
    rows = [
        ("input", real),
        ("inpaint: known pixels", real * (1 - mask) + 0.5 * mask),
        ("inpaint: result", run(pipe.inpaint, image=real, mask_image=mask)),
        ("super-res: 8x8 input", torch.nn.functional.interpolate(low, scale_factor=4)),
        ("super-res: result", run(pipe.super_resolve, image=low, scale_factor=4)),
        ("colorize: grey input", grey),
        ("colorize: result", run(pipe.colorize, image=grey[:, :1])),
        (f"interp: {prompts[0][:11]} -> {prompts[1][:11]}", frames),
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid(rows).save(out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
