"""Reports of a sampler comparison (:mod:`lcm_kit.compare`): the Markdown table, the mean and spread over the runs
(seeds) of one configuration, and a picture grid of the samples."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from .compare import MethodResult


def _feature_name(results: Sequence[MethodResult]) -> str:
    """The ``<name>`` of the ``fid_<name>`` metric that :func:`score` filled."""
    return next(k for k in results[0].metrics if k.startswith("fid_"))[len("fid_") :]


def format_table(results: list[MethodResult], reference_name: str) -> str:
    """A Markdown table of the results (metrics filled by :func:`score`)."""
    f = _feature_name(results)
    head = (
        f"| method | steps | UNet evals | latent MSE vs {reference_name} | PSNR dB vs {reference_name} | "
        f"FID-{f} | KID-{f} | time/image | speed-up |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in results:
        m = r.metrics
        psnr = "ref" if m["latent_mse"] == 0 else f"{m['psnr_db']:.1f}"
        lines.append(
            f"| {r.label} | {r.steps} | {r.unet_evals} | {m['latent_mse']:.4f} | {psnr} | {m[f'fid_{f}']:.2f} | "
            f"{m[f'kid_{f}']:.4f} | {r.seconds_per_image * 1000:.1f} ms | {m['speedup']:.1f}x |"
        )
    return "\n".join(lines)


def summarize_runs(results: Sequence[MethodResult], keys: Sequence[str]) -> list[tuple[str, int, int, dict]]:
    """Mean and spread over the runs (trained students) of each configuration ``(name, steps)`` with 2 or more runs.

    Returns:
        ``(name, steps, n_runs, {key: (mean, min, max)})`` in first-appearance order.
    """
    groups: dict[tuple[str, int], list[MethodResult]] = {}
    for r in results:
        groups.setdefault((r.name, r.steps), []).append(r)
    out = []
    for (name, steps), rs in groups.items():
        if len({r.run for r in rs}) >= 2:
            values = {k: [r.metrics[k] for r in rs] for k in keys}
            out.append((name, steps, len(rs), {k: (statistics.fmean(v), min(v), max(v)) for k, v in values.items()}))
    return out


def format_summary(results: Sequence[MethodResult]) -> str:
    """A Markdown table of mean (min-max) latent MSE and FID over the runs of each configuration with 2 or more
    runs (:func:`summarize_runs`); ``""`` if there is none."""
    f = _feature_name(results)
    rows = summarize_runs(results, ("latent_mse", f"fid_{f}"))
    if not rows:
        return ""
    lines = [f"| method | steps | runs | latent MSE mean (min-max) | FID-{f} mean (min-max) |", "|" + "---|" * 5]
    for name, steps, n, st in rows:
        mse, fid = "{:.4f} ({:.4f}-{:.4f})".format(*st["latent_mse"]), "{:.2f} ({:.2f}-{:.2f})".format(*st[f"fid_{f}"])
        lines.append(f"| {name} | {steps} | {n} | {mse} | {fid} |")
    return "\n".join(lines)


def comparison_grid(results: list[MethodResult], prompts: Sequence[str], n: int = 8, scale: int = 3) -> Image.Image:
    """A PNG-ready grid: one row per method, one column per prompt (first ``n``), labels on the left."""
    n = min(n, len(prompts))
    side = results[0].images.shape[-1] * scale
    label_w = 190
    grid = Image.new("RGB", (label_w + n * side, len(results) * side + 14), "white")
    draw = ImageDraw.Draw(grid)
    for col in range(n):
        draw.text((label_w + col * side + 2, 1), prompts[col][: side // 6], fill="black")
    for row, r in enumerate(results):
        label = f"{r.label} {r.steps}".replace("γ=", "gamma ")  # PIL's default bitmap font has no Greek letters
        draw.text((4, 14 + row * side + side // 2 - 6), label, fill="black")
        for col in range(n):
            arr = (r.images[col].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            tile = Image.fromarray(arr).resize((side, side), Image.NEAREST)
            grid.paste(tile, (label_w + col * side, 14 + row * side))
    return grid
