"""Live-demo frame latency against the model forwards each frame needs (issue 16: goal <= 1.2x).

A frame is what ``python -m lcm_kit.demo`` runs on each change (:class:`lcm_kit.demo.FrameEngine`): for a sketch,
canvas -> model size, VAE encode, ``steps`` UNet passes, VAE decode -> PIL; text-to-image has no encode; inpainting
also projects each step through the VAE (decode + encode). The prompt's embeddings are cached (one warm-up frame
fills the cache), so the text encoder does not run per frame.

``forwards`` is the time spent inside the model forwards of that same frame: wall time between entering and leaving
``unet.forward``, ``vae.encode`` and ``vae.decode`` (timed by wrapping them, so nothing is re-run and the
frame's own inputs are used). ``frame / forwards`` is then exactly the share of the frame spent outside the models
(argument checks, scheduler arithmetic, noise, image conversion). Prints median and p95 over ``--frames`` frames of
the frame time, the forwards and their per-frame ratio, as a Markdown table.

``python bench/realtime.py`` (200 frames per row, 1 thread, the committed full LCM; about 3 minutes here).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from lcm_kit.demo import FrameEngine, inpaint_inputs, sketch_image

REPO = Path(__file__).resolve().parents[1]


class ForwardClock:
    """Sums the wall time spent inside the wrapped model methods (not re-entrant: they do not call each other)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, method: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def instrument(engine: FrameEngine) -> ForwardClock:
    """Wraps the UNet forward and the VAE encode / decode of ``engine``'s pipeline with one clock."""
    clock, unet, vae = ForwardClock(), engine.pipe.unet, engine.pipe.vae
    unet.forward = clock.wrap(unet.forward)
    vae.encode, vae.decode = clock.wrap(vae.encode), clock.wrap(vae.decode)
    return clock


def demo_inputs(size: int) -> tuple[Image.Image, Image.Image, Image.Image]:
    """A sketch (a red disc and a green stroke, as drawn on the 256 px canvas), and an image + mask to inpaint."""
    canvas = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.ellipse((50, 60, 200, 210), fill=(229, 57, 53, 255))
    draw.line((125, 60, 140, 20), fill=(67, 160, 71, 255), width=14)
    background = canvas.copy()
    layer = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((0, 0, 127, 255), fill=(0, 0, 0, 255))
    image, mask = inpaint_inputs({"background": background, "layers": [layer]}, size)
    return sketch_image({"composite": canvas}, size), image, mask


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank on the sorted values)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def measure(engine: FrameEngine, clock: ForwardClock, frame: Callable[[int], object], n: int) -> dict[str, float]:
    """Runs one warm-up frame, then ``n`` frames (seed = frame index); medians and p95s in ms and of the ratio."""
    frame(0)
    totals, forwards = [], []
    for i in range(n):
        clock.seconds = 0.0
        totals.append(frame(i).seconds)
        forwards.append(clock.seconds)
    ratios = [t / f for t, f in zip(totals, forwards, strict=True)]
    return dict(frame_median=1e3 * statistics.median(totals), frame_p95=1e3 * percentile(totals, 95),
                forwards_median=1e3 * statistics.median(forwards), forwards_p95=1e3 * percentile(forwards, 95),
                ratio_median=statistics.median(ratios), ratio_p95=percentile(ratios, 95))  # fmt: skip


def main(argv: list[str] | None = None) -> list[tuple[str, dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "tiny-emoji-lcm"))
    parser.add_argument("--lora", default=None)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", default="red apple")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = FrameEngine.load(args.model, args.lora)
    clock = instrument(engine)
    sketch, image, mask = demo_inputs(engine.size)
    p = args.prompt
    rows = [(f"sketch, {s} steps", lambda i, s=s: engine.sketch_to_image(sketch, p, 0.8, s, i)) for s in (1, 2, 4)]
    rows += [("text-to-image, 4 steps", lambda i: engine.text_to_image(p, 4, i)),
             ("inpainting, 4 steps", lambda i: engine.inpaint(image, mask, p, 4, i))]  # fmt: skip
    print(f"{args.frames} frames per row, {args.threads} thread(s), {args.model}, guidance {engine.guidance_scale:g}")
    print("| frame | frame median (ms) | frame p95 | forwards median | forwards p95 | frame/forwards median | p95 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    results = []
    for name, frame in rows:
        r = measure(engine, clock, frame, args.frames)
        results.append((name, r))
        print(f"| {name} | {r['frame_median']:.1f} | {r['frame_p95']:.1f} | {r['forwards_median']:.1f} | "
              f"{r['forwards_p95']:.1f} | {r['ratio_median']:.3f} | {r['ratio_p95']:.3f} |", flush=True)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
