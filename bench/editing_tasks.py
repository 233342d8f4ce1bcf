"""The task rows of ``bench/editing.py``: each runs LCMEditPipeline and its baselines on the same inputs, seeds and
student, and measures UNet evaluations, FID-emoji, the constraint error, time and the seam / smoothness."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import torch
from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline

from lcm_kit import functional as F
from lcm_kit.eval import fid_kid


@dataclass(frozen=True)
class Context:
    """Inputs shared by all tasks: prompts and real images to edit (``(N, 3, H, W)`` in [0, 1]), the FID reference
    set, the feature network, the seed, the step counts, the SDEdit strength and the extra strengths of our rows."""

    prompts: list[str]
    real: torch.Tensor
    reference: torch.Tensor
    feature_net: torch.nn.Module
    seed: int
    steps: Sequence[int]
    strength: float
    ours_strengths: Sequence[float] = ()

    def generators(self, n: int | None = None) -> list[torch.Generator]:
        """One generator per image, image ``i`` seeded ``seed + i``."""
        return [torch.Generator().manual_seed(self.seed + i) for i in range(n or len(self.prompts))]

    def fid(self, images: torch.Tensor) -> float:
        return fid_kid(self.reference, images, self.feature_net, seed=self.seed)["fid"]


@dataclass(frozen=True)
class Row:
    task: str
    student: str
    steps: int
    method: str
    unet_evals: float
    fid: float
    constraint_err: float
    extra: str
    seconds_per_image: float


def format_rows(rows: Sequence[Row]) -> str:
    """A markdown table of ``rows``."""
    head = ("| task | student | steps | method | UNet evals / image | FID-emoji | constraint err (max, 8-bit) | "
            "seam / smoothness | s / image |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    lines = [head]
    for r in rows:
        fid = "-" if math.isnan(r.fid) else f"{r.fid:.2f}"
        err = "-" if math.isnan(r.constraint_err) else f"{r.constraint_err:.2f}"
        lines.append(f"| {r.task} | {r.student} | {r.steps or '-'} | {r.method} | {r.unet_evals:g} | {fid} | {err} | "
                     f"{r.extra} | {r.seconds_per_image:.4f} |")  # fmt: skip
    return "\n".join(lines)


def measure(unet: torch.nn.Module, fn: Callable[[], torch.Tensor], n: int) -> tuple[torch.Tensor, float, float]:
    """``(images, UNet evaluations per image, seconds per image)`` of ``fn()`` making ``n`` images (``(n, 3, H, W)``
    in [0, 1]); evaluations are the summed batch sizes of the UNet's forwards over ``n`` (CFG counts two)."""
    batches: list[int] = []
    handle = unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        start = time.perf_counter()
        with torch.no_grad():
            images = fn()
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
    return images.float().cpu(), sum(batches) / n, seconds / n


def q8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as 8-bit levels (float), as a PNG stores them."""
    return (images.clamp(0, 1) * 255).round()


def seam(images: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean |difference| (8-bit levels, channel mean) of 4-neighbour pixel pairs with one pixel on each side of the
    mask border."""
    x, total, count = q8(images), 0.0, 0
    for dim in (-1, -2):
        n = x.shape[dim]
        diff = (x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)).abs().mean(1, keepdim=True)
        cross = masks.narrow(dim, 1, n - 1) != masks.narrow(dim, 0, n - 1)
        total, count = total + float(diff[cross].sum()), count + int(cross.sum())
    return total / max(count, 1)


Method = Callable[[Any, dict], torch.Tensor]  # (student pipeline, sampling kwargs) -> images (N, 3, H, W) in [0, 1]


def _ours(name: str, fn: Method, strengths: Sequence[float]) -> dict[str, Method]:
    """Our method ``fn`` from noise (``strength=None``, CM Algorithm 4) and, for each of ``strengths``, from the
    task's initial guess noised (a row each)."""
    out = {f"{name} (ours)": fn}
    for s in strengths:
        out[f"{name} (ours, strength {s:g})"] = lambda pipe, kw, s=s: fn(pipe, {**kw, "strength": s})
    return out


def _student_rows(ctx: Context, task: str, students: dict, methods: dict[str, Method],
                  err: Callable[[torch.Tensor], float], extra: Callable[..., str] | None = None) -> list[Row]:
    """Each student at each of ``ctx.steps`` with each ``methods[name](pipe, kwargs)`` (kwargs: steps, the
    student's guidance, per-image generators, ``output_type="pt"``), measured and scored."""
    rows = []
    for student, (pipe, g) in students.items():
        for k in ctx.steps:
            for method, fn in methods.items():
                kw = dict(num_inference_steps=k, guidance_scale=g, output_type="pt", generator=ctx.generators())
                images, evals, sec = measure(pipe.unet, partial(fn, pipe, kw), len(ctx.prompts))
                note = extra(images) if extra is not None else ""
                rows.append(Row(task, student, k, method, evals, ctx.fid(images), err(images), note, sec))
    return rows


@cache
def _sd_inpaint(pipe: Any) -> StableDiffusionInpaintPipeline:
    """diffusers' SD inpainting pipeline on ``pipe``'s modules (its 4-channel UNet) with diffusers' LCMScheduler."""
    base = StableDiffusionInpaintPipeline(**pipe.components, requires_safety_checker=False)
    base.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    base.set_progress_bar_config(disable=True)
    return base


def inpaint_rows(ctx: Context, students: dict, masks: torch.Tensor, mask_name: str) -> list[Row]:
    task, known = f"inpaint ({mask_name})", masks.expand_as(ctx.real) == 0
    args = dict(image=ctx.real, mask_image=masks)
    methods = {
        **_ours("inpaint", lambda pipe, kw: pipe.inpaint(ctx.prompts, **args, **kw).images, ctx.ours_strengths),
        "SD inpaint + LCMScheduler": lambda pipe, kw: _sd_inpaint(pipe)(ctx.prompts, **args, **kw).images,
        "SD inpaint + LCMScheduler, known pixels pasted": lambda pipe, kw: F.project_known(
            _sd_inpaint(pipe)(ctx.prompts, **args, **kw).images, ctx.real, masks),
    }  # fmt: skip
    real_seam = f"seam {seam(ctx.real, masks):.1f}"
    reference = Row(task, "-", 0, "real images (reference)", 0, math.nan, math.nan, real_seam, 0)
    return [reference] + _student_rows(
        ctx, task, students, methods, lambda x: float((q8(x) - q8(ctx.real)).abs()[known].max()),
        lambda x: f"seam {seam(x, masks):.1f}",
    )  # fmt: skip


def _guess_task_rows(ctx: Context, students: dict, task: str, name: str, ours: Method, guess: torch.Tensor,
                     guess_label: str, baseline_label: str, err: Callable[[torch.Tensor], float]) -> list[Row]:
    """A task with an initial guess (``(N, 3, H, W)`` in [0, 1]): the guess itself (a row, no UNet), ours, and
    LCM img2img of the guess at ``ctx.strength`` (SDEdit) as the baseline."""
    methods = {
        **_ours(name, ours, ctx.ours_strengths),
        f"{baseline_label} (strength {ctx.strength:g})": lambda pipe, kw: pipe(
            ctx.prompts, image=guess, strength=ctx.strength, **kw).images,
    }  # fmt: skip
    first = Row(task, "-", 0, guess_label, 0, ctx.fid(guess), err(guess), "", 0)
    return [first] + _student_rows(ctx, task, students, methods, err)


def super_resolve_rows(ctx: Context, students: dict, factor: int = 4) -> list[Row]:
    low = F.box_downsample(ctx.real, factor)
    bicubic = torch.nn.functional.interpolate(low, scale_factor=factor, mode="bicubic").clamp(0, 1)

    def err(images: torch.Tensor) -> float:
        return float((F.box_downsample(q8(images), factor) - low * 255).abs().max())

    def ours(pipe: Any, kw: dict) -> torch.Tensor:
        return pipe.super_resolve(ctx.prompts, image=low, scale_factor=factor, **kw).images

    return _guess_task_rows(ctx, students, f"super-resolution {factor}x", "super_resolve", ours, bicubic, "bicubic",
                            "SDEdit of bicubic", err)  # fmt: skip


def colorize_rows(ctx: Context, students: dict) -> list[Row]:
    grey = F.luma(ctx.real)

    def err(images: torch.Tensor) -> float:
        return float((F.luma(q8(images)) - grey * 255).abs().max())

    def ours(pipe: Any, kw: dict) -> torch.Tensor:
        return pipe.colorize(ctx.prompts, image=grey, **kw).images

    return _guess_task_rows(ctx, students, "colorization", "colorize", ours, grey.expand_as(ctx.real),
                            "grey input (reference)", "img2img of grey", err)  # fmt: skip


def smoothness(ctx: Context, frames: torch.Tensor, num_frames: int) -> str:
    """Mean feature distance of neighbouring frames, and the path ratio (sum of them / distance of the ends)."""
    with torch.no_grad():
        f = ctx.feature_net(frames).reshape(-1, num_frames, ctx.feature_net.num_features)
    steps = (f[:, 1:] - f[:, :-1]).norm(dim=-1)
    ratio = steps.sum(1) / (f[:, -1] - f[:, 0]).norm(dim=-1).clamp(min=1e-8)
    return f"nbr {float(steps.mean()):.3f}, path ratio {float(ratio.median()):.2f}"


def _teacher_frames(teacher: StableDiffusionPipeline, ctx: Context, pairs, num_frames: int) -> torch.Tensor:
    """Teacher DDIM-50 (CFG 5) on the same slerped noise and text embeddings as ``interpolate``."""
    fractions = torch.linspace(0, 1, num_frames).tolist()
    latents, embeds = [], []
    for i, (a, b) in enumerate(pairs):
        ends = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(ctx.seed + i))
        cond = teacher.encode_prompt([a, b], "cpu", 1, False)[0]
        latents += [F.slerp(ends[0], ends[1], f) for f in fractions]
        embeds += [F.slerp(cond[0], cond[1], f, dim=-1) for f in fractions]
    uncond = teacher.encode_prompt([""], "cpu", 1, False)[0].expand(len(embeds), -1, -1)
    return teacher(prompt_embeds=torch.stack(embeds), negative_prompt_embeds=uncond, latents=torch.stack(latents),
                   num_inference_steps=50, guidance_scale=5.0, output_type="pt").images  # fmt: skip


def interpolate_rows(ctx: Context, students: dict, teacher_dir: str, num_frames: int) -> list[Row]:
    half = len(ctx.prompts) // 2
    pairs = [(ctx.prompts[i], ctx.prompts[i + half]) for i in range(half)]
    task, n = f"interpolation ({num_frames} frames)", half * num_frames
    rows = []
    for student, (pipe, g) in students.items():
        for k in ctx.steps:
            def run(pipe=pipe, g=g, k=k) -> torch.Tensor:
                return torch.cat([pipe.interpolate([a, b], num_frames=num_frames, num_inference_steps=k,
                                                   guidance_scale=g, output_type="pt",
                                                   generator=torch.Generator().manual_seed(ctx.seed + i)).images
                                  for i, (a, b) in enumerate(pairs)])  # fmt: skip

            frames, evals, sec = measure(pipe.unet, run, n)
            rows.append(Row(task, student, k, "interpolate (ours)", evals, ctx.fid(frames), math.nan,
                            smoothness(ctx, frames, num_frames), sec))  # fmt: skip
    teacher = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None)
    teacher.scheduler = DDIMScheduler.from_config(teacher.scheduler.config)
    teacher.set_progress_bar_config(disable=True)
    frames, evals, sec = measure(teacher.unet, lambda: _teacher_frames(teacher, ctx, pairs, num_frames), n)
    rows.append(Row(task, "teacher", 50, "teacher DDIM-50, CFG 5, same slerped noise", evals, ctx.fid(frames),
                    math.nan, smoothness(ctx, frames, num_frames), sec))  # fmt: skip
    return rows
