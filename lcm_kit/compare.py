"""Side-by-side comparison of a teacher's own samplers and its LCM students, from the same initial noise.

Used by the README's main job (``examples/distill_emoji.py``) and by ``bench/quality.py``. For every method it
records the final latents, the decoded images and the wall time, then reports:

* teacher agreement -- latent MSE and pixel PSNR against the teacher's DDIM-50 solution with CFG from the same
  initial noise (the PF-ODE solution that consistency distillation learns to jump to);
* a distribution metric -- FID / KID in the features of the in-project emoji network (:mod:`lcm_kit.emoji`),
  against held-out real images ("FID-emoji", a stand-in for Inception-FID whose weights cannot be downloaded here).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image, ImageDraw

from .emoji import feature_fid_kid, held_out, load_feature_net
from .eval import latent_mse, pixel_psnr
from .pipeline import LCMPipeline
from .scheduler import LCMKitScheduler

TEACHER_FEW_STEP = (("ddim", 1), ("ddim", 2), ("ddim", 4), ("dpmpp", 2), ("dpmpp", 4))  # (solver, steps) rows


@dataclass
class MethodResult:
    """One sampler's output on the prompt set.

    Attributes:
        name: Row label, e.g. ``"teacher DDIM"`` or ``"LCM-LoRA"``.
        steps: Sampling steps.
        unet_evals: UNet evaluations per image (CFG counts two).
        latents: Final latents ``(N, 4, h, w)`` (what the VAE decodes, before the scaling factor is undone).
        images: Decoded images ``(N, 3, H, W)`` in ``[0, 1]``.
        seconds_per_image: Wall time of sampling the whole batch (to latents) divided by ``N``.
        metrics: Filled by :func:`score`.
        sample: Re-runs the method on the same inputs (used by :func:`time_interleaved`).
    """

    name: str
    steps: int
    unet_evals: int
    latents: torch.Tensor
    images: torch.Tensor
    seconds_per_image: float
    metrics: dict[str, float] = field(default_factory=dict)
    sample: Callable[[], torch.Tensor] | None = field(default=None, repr=False)


def initial_noise(n: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """``(n, *shape)`` standard normal latents, example ``i`` drawn from ``seed + i`` (independent of ``n``)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


def _timed(fn: Callable[[], torch.Tensor], repeats: int = 1) -> tuple[torch.Tensor, float]:
    """Runs ``fn`` ``repeats`` times (each call is deterministic); returns its output and the median seconds."""
    times, out = [], None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _sampler(pipe, scheduler, prompts: Sequence[str], noise: torch.Tensor, steps: int, guidance_scale: float,
             seed: int) -> Callable[[], torch.Tensor]:  # fmt: skip
    """A call of ``pipe`` with ``scheduler`` (set on each call: methods share a pipeline), fixed inputs -> latents."""

    def sample() -> torch.Tensor:
        pipe.scheduler = scheduler
        return pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale, latents=noise.clone(),
                    generator=torch.Generator().manual_seed(seed), output_type="latent").images  # fmt: skip

    return sample


@torch.no_grad()
def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return (images / 2 + 0.5).clamp(0, 1).float()


def run_teacher(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    noise: torch.Tensor,
    solver: str,
    steps: int,
    guidance_scale: float,
    seed: int = 0,
    repeats: int = 1,
) -> MethodResult:
    """The teacher with ``"ddim"`` (eta 0) or ``"dpmpp"`` (DPM-Solver++ 2M) and classic CFG."""
    classes = {"ddim": DDIMScheduler, "dpmpp": DPMSolverMultistepScheduler}
    if solver not in classes:
        raise ValueError(f"solver must be one of {sorted(classes)}, got {solver!r}")
    sample = _sampler(pipe, classes[solver].from_config(pipe.scheduler.config), prompts, noise, steps, guidance_scale,
                      seed)  # fmt: skip
    latents, seconds = _timed(sample, repeats)
    images = _decode(pipe.vae, latents)
    evals = steps * (2 if guidance_scale > 1 else 1)
    label = {"ddim": "teacher DDIM", "dpmpp": "teacher DPM-Solver++"}[solver]
    return MethodResult(label, steps, evals, latents, images, seconds / len(prompts), sample=sample)


def run_lcm(
    pipe: LCMPipeline, name: str, prompts: Sequence[str], noise: torch.Tensor, steps: int, guidance_scale: float,
    seed: int = 0, repeats: int = 1,
) -> MethodResult:  # fmt: skip
    """An LCM student (LoRA on the teacher UNet, or a full LCM UNet) with :class:`LCMPipeline` and its current
    scheduler."""
    sample = _sampler(pipe, pipe.scheduler, prompts, noise, steps, guidance_scale, seed)
    latents, seconds = _timed(sample, repeats)
    evals = steps * (2 if (not pipe.has_w_embedding and guidance_scale > 1) else 1)
    images = _decode(pipe.vae, latents)
    return MethodResult(name, steps, evals, latents, images, seconds / len(prompts), sample=sample)


def time_interleaved(results: Sequence[MethodResult], rounds: int, n_images: int) -> None:
    """Re-times every method ``rounds`` times, interleaved (each round calls every method once, the order rotated
    by one each round, so drifts in machine load spread over all methods); sets ``seconds_per_image`` to the median.
    """
    if rounds < 1:
        return
    times: list[list[float]] = [[] for _ in results]
    for k in range(rounds):
        for i in [(j + k) % len(results) for j in range(len(results))]:
            times[i].append(_timed(results[i].sample)[1])
    for r, t in zip(results, times, strict=True):
        r.seconds_per_image = statistics.median(t) / n_images


def score(results: list[MethodResult], reference: MethodResult, real_images: torch.Tensor, feature_net) -> None:
    """Fills ``metrics`` of every result: agreement with ``reference`` and FID/KID-emoji against ``real_images``."""
    for r in results:
        r.metrics["latent_mse"] = latent_mse(r.latents, reference.latents)
        r.metrics["psnr_db"] = pixel_psnr(r.images, reference.images)
        r.metrics.update(feature_fid_kid(real_images, r.images, feature_net))
        r.metrics["speedup"] = reference.seconds_per_image / r.seconds_per_image


def format_table(results: list[MethodResult], reference_name: str) -> str:
    """A Markdown table of the results (metrics filled by :func:`score`)."""
    head = (
        f"| method | steps | UNet evals | latent MSE vs {reference_name} | PSNR dB vs {reference_name} | "
        "FID-emoji | KID-emoji | time/image | speed-up |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in results:
        m = r.metrics
        psnr = "ref" if m["latent_mse"] == 0 else f"{m['psnr_db']:.1f}"
        lines.append(
            f"| {r.name} | {r.steps} | {r.unet_evals} | {m['latent_mse']:.4f} | {psnr} | {m['fid_emoji']:.2f} | "
            f"{m['kid_emoji']:.4f} | {r.seconds_per_image * 1000:.1f} ms | {m['speedup']:.1f}x |"
        )
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
        draw.text((4, 14 + row * side + side // 2 - 6), f"{r.name} {r.steps}", fill="black")
        for col in range(n):
            arr = (r.images[col].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            tile = Image.fromarray(arr).resize((side, side), Image.NEAREST)
            grid.paste(tile, (label_w + col * side, 14 + row * side))
    return grid


def run_comparison(
    teacher_dir: str | Path,
    data_dir: str | Path,
    lora_dir: str | Path | None = None,
    full_dir: str | Path | None = None,
    num_eval: int | None = 64,
    guidance_scale: float = 5.0,
    lcm_guidance_scale: float | None = None,
    seed: int = 0,
    repeats: int = 1,
    feature_net: torch.nn.Module | None = None,
    tcd_gammas: Sequence[float] = (),
) -> tuple[list[MethodResult], list[str]]:
    """Teacher DDIM-50 (reference), its few-step samplers (:data:`TEACHER_FEW_STEP`), then each student at 1, 2 and 4
    steps with plain LCM sampling (and at 2 and 4 steps with each of ``tcd_gammas``), all scored.

    Args:
        teacher_dir: The teacher SD folder.
        data_dir: Emoji dataset folder with a ``test/`` split (prompts and real images for FID/KID-emoji).
        lora_dir: Folder with ``pytorch_lora_weights.safetensors`` (LCM-LoRA on the teacher UNet), fused into the
            UNet and sampled without CFG (guidance is distilled into it).
        full_dir: A full LCM pipeline folder (UNet with a w-embedding), sampled at ``lcm_guidance_scale``.
        num_eval: Number of held-out prompts (None: all).
        guidance_scale: Teacher CFG scale (usual convention).
        lcm_guidance_scale: Guidance of the full LCM's w-embedding (default: ``guidance_scale``).
        seed: Seed of the initial noise (example ``i`` uses ``seed + i``) and of the LCM re-noising.
        repeats: Timing rounds (:func:`time_interleaved`: every method once per round, median reported), after one
            untimed warm-up call of each pipeline and the scored call of each method.
        feature_net: Feature network of FID/KID-emoji (default: the committed one, :func:`load_feature_net`).
        tcd_gammas: Extra rows sampled with :class:`LCMKitScheduler` ``gamma`` (TCD's stochasticity; ``0`` keeps every
            step on the trajectory of the initial noise, which is what the agreement metric measures).
    """
    teacher = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None)
    teacher.set_progress_bar_config(disable=True)
    prompts, real = held_out(data_dir, num_eval)
    cfg = teacher.unet.config
    noise = initial_noise(len(prompts), (cfg.in_channels, cfg.sample_size, cfg.sample_size), seed)
    teacher(prompts[:1], num_inference_steps=1, output_type="latent")  # warm-up: first calls pay one-off costs
    runs = [run_teacher(teacher, prompts, noise, "ddim", 50, guidance_scale, seed)]
    for solver, steps in TEACHER_FEW_STEP:
        runs.append(run_teacher(teacher, prompts, noise, solver, steps, guidance_scale, seed))
    students = []
    if lora_dir is not None:
        lora = LCMPipeline.from_pretrained(teacher_dir, safety_checker=None)
        lora.load_lora_weights(lora_dir)
        lora.fuse_lora()  # merged into the UNet weights (same images, no per-layer adapter cost), as for deployment
        students.append(("LCM-LoRA", lora, 1.0))
    if full_dir is not None:
        students.append(("LCM (full)", LCMPipeline.from_pretrained(full_dir), lcm_guidance_scale or guidance_scale))
    for name, pipe, scale in students:
        pipe.set_progress_bar_config(disable=True)
        pipe(prompts[:1], num_inference_steps=1, output_type="latent")  # warm-up
        runs += [run_lcm(pipe, name, prompts, noise, k, scale, seed) for k in (1, 2, 4)]
        lcm_config = pipe.scheduler.config
        for gamma in tcd_gammas:
            pipe.scheduler = LCMKitScheduler.from_config(lcm_config, gamma=gamma)
            label = f"{name}, TCD γ={gamma:g}"
            runs += [run_lcm(pipe, label, prompts, noise, k, scale, seed) for k in (2, 4)]
    time_interleaved(runs, repeats, len(prompts))
    score(runs, runs[0], real, feature_net if feature_net is not None else load_feature_net())
    return runs, prompts
