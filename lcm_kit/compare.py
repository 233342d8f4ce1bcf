"""Side-by-side comparison of a teacher's own samplers and its LCM students, from the same initial noise.

Generic over teacher and data: the caller passes the prompts, the real images and the feature network (the emoji
defaults come from :mod:`lcm_kit.emoji`, in ``examples/distill_emoji.py`` and ``bench/quality.py``). Each method's
final latents, decoded images and wall time are scored by teacher agreement (latent MSE, pixel PSNR against the
teacher's DDIM-50 with CFG from the same noise: the PF-ODE solution consistency distillation learns to jump to) and
FID / KID (:func:`lcm_kit.eval.fid_kid`, seeded KID) in the network's features, labelled by its ``metric_name``
("FID-emoji"). Rows: teacher DDIM-50 (reference) and few-step samplers; optionally the bare teacher UNet in
:class:`LCMPipeline` (no distillation: the baseline a student has to beat); each student at 1, 2, 4 steps (and TCD
rows). Several students of one recipe (seeds) carry run labels; :func:`format_summary` gives their mean and spread
(tables and the picture grid live in :mod:`lcm_kit.report` and are re-exported here).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

from .eval import fid_kid, latent_mse, pixel_psnr
from .guidance import Guidance
from .loading import checked_components
from .pipeline import LCMPipeline
from .report import comparison_grid, format_summary, format_table, summarize_runs
from .scheduler import LCMKitScheduler

TEACHER_FEW_STEP = (("ddim", 1), ("ddim", 2), ("ddim", 4), ("dpmpp", 2), ("dpmpp", 4))  # (solver, steps) rows
LCM_STEPS, TCD_STEPS = (1, 2, 4), (2, 4)  # steps of each student's plain LCM rows and of its TCD rows
__all__ = ["MethodResult", "comparison_grid", "format_summary", "format_table", "initial_noise", "run_comparison",
           "run_lcm", "run_teacher", "score", "summarize_runs", "time_interleaved"]
TEACHER_LCM = "teacher + LCM sampler"  # the bare teacher UNet (no distillation) in LCMPipeline at guidance 1


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
        run: Which of several trained students of the same configuration (e.g. a seed); ``""`` if only one.
        metrics: Filled by :func:`score`.
        sample: Re-runs the method on the same inputs (used by :func:`time_interleaved`).
    """

    name: str
    steps: int
    unet_evals: int
    latents: torch.Tensor
    images: torch.Tensor
    seconds_per_image: float
    run: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    sample: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """Row label: ``name``, and ``[run]`` when set."""
        return f"{self.name} [{self.run}]" if self.run else self.name


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
    pipe: StableDiffusionPipeline, prompts: Sequence[str], noise: torch.Tensor, solver: str, steps: int,
    guidance_scale: float, seed: int = 0, repeats: int = 1,
) -> MethodResult:  # fmt: skip
    """The teacher with ``"ddim"`` (eta 0) or ``"dpmpp"`` (DPM-Solver++ 2M) and classic CFG."""
    classes = {"ddim": DDIMScheduler, "dpmpp": DPMSolverMultistepScheduler}
    if solver not in classes:
        raise ValueError(f"solver must be one of {sorted(classes)}, got {solver!r}")
    sample = _sampler(pipe, classes[solver].from_config(pipe.scheduler.config), prompts, noise, steps, guidance_scale,
                      seed)  # fmt: skip
    latents, seconds = _timed(sample, repeats)
    images = _decode(pipe.vae, latents)
    evals = steps * Guidance.decide(pipe.unet.config, guidance_scale).unet_evals_per_step
    label = {"ddim": "teacher DDIM", "dpmpp": "teacher DPM-Solver++"}[solver]
    return MethodResult(label, steps, evals, latents, images, seconds / len(prompts), sample=sample)


def run_lcm(
    pipe: LCMPipeline, name: str, prompts: Sequence[str], noise: torch.Tensor, steps: int, guidance_scale: float,
    seed: int = 0, repeats: int = 1, run: str = "",
) -> MethodResult:  # fmt: skip
    """An LCM student (LoRA on the teacher UNet, or a full LCM UNet; or the bare teacher UNet as a baseline) with
    :class:`LCMPipeline` and its current scheduler; ``run`` labels one of several students of one configuration."""
    sample = _sampler(pipe, pipe.scheduler, prompts, noise, steps, guidance_scale, seed)
    latents, seconds = _timed(sample, repeats)
    evals = steps * Guidance.decide(pipe.unet.config, guidance_scale).unet_evals_per_step
    images = _decode(pipe.vae, latents)
    return MethodResult(name, steps, evals, latents, images, seconds / len(prompts), run, sample=sample)


def time_interleaved(results: Sequence[MethodResult], rounds: int, n_images: int) -> None:
    """Re-times every method ``rounds`` times, interleaved (each round calls every method once, the order rotated
    by one each round, so drifts in machine load spread over all methods); sets ``seconds_per_image`` to the median."""
    if rounds < 1:
        return
    times: list[list[float]] = [[] for _ in results]
    for k in range(rounds):
        for i in [(j + k) % len(results) for j in range(len(results))]:
            times[i].append(_timed(results[i].sample)[1])
    for r, t in zip(results, times, strict=True):
        r.seconds_per_image = statistics.median(t) / n_images


def score(
    results: list[MethodResult], reference: MethodResult, real_images: torch.Tensor, feature_net: torch.nn.Module,
    seed: int = 0,
) -> None:  # fmt: skip
    """Fills ``metrics``: agreement with ``reference`` (``latent_mse``, ``psnr_db``), ``speedup``, and FID/KID
    against ``real_images`` (:func:`lcm_kit.eval.fid_kid`, KID seeded with ``seed``) as ``fid_<name>``,
    ``kid_<name>``, ``kid_<name>_std``, ``name`` being ``feature_net.metric_name`` (else ``"features"``)."""
    name = getattr(feature_net, "metric_name", "features")
    for r in results:
        r.metrics["latent_mse"] = latent_mse(r.latents, reference.latents)
        r.metrics["psnr_db"] = pixel_psnr(r.images, reference.images)
        dist = fid_kid(real_images, r.images, feature_net, seed=seed)
        r.metrics.update({f"fid_{name}": dist["fid"], f"kid_{name}": dist["kid"], f"kid_{name}_std": dist["kid_std"]})
        r.metrics["speedup"] = reference.seconds_per_image / r.seconds_per_image


def _students(teacher_dir, lora_dirs, full_dirs, lcm_guidance_scale, tcd_gammas, teacher_lcm) -> list[tuple]:
    """``(name, run, pipeline, guidance_scale, extra tcd_gammas)`` of every LCM-sampled row group, in table order."""
    out = []
    for run, path in (lora_dirs or {}).items():
        pipe = LCMPipeline.from_pretrained(teacher_dir, safety_checker=None)
        pipe.load_lora_weights(path)  # applies the LoRA's sampling contract, if it has one
        pipe.fuse_lora()  # merged into the UNet weights (same images, no per-layer adapter cost), as for deployment
        out.append(("LCM-LoRA", run if len(lora_dirs) > 1 else "", pipe, 1.0, _other_gammas(tcd_gammas, pipe)))
    for run, path in (full_dirs or {}).items():
        pipe = LCMPipeline.from_pretrained(path)
        gammas = _other_gammas(tcd_gammas, pipe)
        out.append(("LCM (full)", run if len(full_dirs) > 1 else "", pipe, lcm_guidance_scale, gammas))
    if teacher_lcm:  # the baseline, first: gamma 0, and every gamma a student is sampled with (same-sampler rows)
        contract_gammas = {p.scheduler.config.gamma for _, _, p, _, _ in out} - {None}
        gammas = tuple(sorted({0.0, *tcd_gammas, *contract_gammas}))
        teacher = LCMPipeline.from_pretrained(teacher_dir, safety_checker=None)
        out.insert(0, (TEACHER_LCM, "", teacher, 1.0, gammas))
    return out


def _other_gammas(tcd_gammas: Sequence[float], pipe: LCMPipeline) -> tuple[float, ...]:
    """The extra TCD rows of a student: ``tcd_gammas`` less the gamma its contract already samples with."""
    return tuple(g for g in tcd_gammas if g != pipe.scheduler.config.gamma)


def _contract_label(name: str, pipe: LCMPipeline) -> str:
    """``name``, with the TCD gamma that the student's sampling contract set on its scheduler, if any."""
    gamma = pipe.scheduler.config.gamma
    return name if gamma is None else f"{name}, TCD γ={gamma:g} (its contract)"


def run_comparison(
    teacher_dir: str | Path,
    prompts: Sequence[str],
    real_images: torch.Tensor,
    feature_net: torch.nn.Module,
    lora_dirs: Mapping[str, str | Path] | None = None,
    full_dirs: Mapping[str, str | Path] | None = None,
    guidance_scale: float = 5.0,
    lcm_guidance_scale: float | None = None,
    seed: int = 0,
    repeats: int = 1,
    tcd_gammas: Sequence[float] = (),
    teacher_lcm: bool = False,
) -> list[MethodResult]:
    """Teacher DDIM-50 (reference) and :data:`TEACHER_FEW_STEP`, optionally :data:`TEACHER_LCM`, then each student
    at :data:`LCM_STEPS` (plain LCM) and :data:`TCD_STEPS` (each of ``tcd_gammas``), all scored.

    Args:
        teacher_dir: The teacher SD folder.
        prompts: Evaluation prompts.
        real_images: Real images of the FID/KID reference set, ``(N, 3, H, W)`` in [0, 1].
        feature_net: Feature network of FID/KID (its ``metric_name`` labels the metric).
        lora_dirs: ``{run label: folder}`` of LCM-LoRAs on the teacher UNet, fused, sampled at guidance 1 (no CFG).
            Several folders (e.g. seeds): rows carry the label (:attr:`MethodResult.run`); a single one's do not.
        full_dirs: ``{run label: folder}`` of full LCM pipelines (w-embedding UNet), at ``lcm_guidance_scale``.
        guidance_scale: Teacher CFG scale (usual convention).
        lcm_guidance_scale: Guidance of the full LCM's w-embedding (default: ``guidance_scale``).
        seed: Seed of the initial noise (example ``i``: ``seed + i``), of the LCM re-noising and of KID.
        repeats: Timing rounds (:func:`time_interleaved`), after a warm-up call of each pipeline and the scored calls.
        tcd_gammas: Extra student rows with :class:`LCMKitScheduler` ``gamma`` (TCD; ``0``: deterministic steps).
        teacher_lcm: Add :data:`TEACHER_LCM`, the no-distillation baseline: the bare teacher UNet in
            :class:`LCMPipeline` at guidance 1, plain LCM at 1, 2, 4 steps and TCD ``gamma=0`` at 2, 4 steps.
    """
    from tqdm.auto import tqdm

    checked = checked_components(teacher_dir, {"safety_checker": None})  # an unsupported folder fails here
    teacher = StableDiffusionPipeline.from_pretrained(teacher_dir, **checked)
    teacher.set_progress_bar_config(disable=True)
    prompts, c = list(prompts), teacher.unet.config
    noise = initial_noise(len(prompts), (c.in_channels, c.sample_size, c.sample_size), seed)
    teacher(prompts[:1], num_inference_steps=1, output_type="latent")  # warm-up: first calls pay one-off costs
    teacher_rows = (("ddim", 50),) + TEACHER_FEW_STEP
    students = _students(teacher_dir, lora_dirs, full_dirs, lcm_guidance_scale or guidance_scale, tcd_gammas,
                         teacher_lcm)  # fmt: skip
    total = len(teacher_rows) + sum(len(LCM_STEPS) + len(g) * len(TCD_STEPS) for *_, g in students)
    bar = tqdm(total=total, desc=f"sampling {len(prompts)} prompts", unit="method")
    runs = []
    for solver, k in teacher_rows:
        bar.set_postfix_str(f"teacher {solver} {k} steps")
        runs.append(run_teacher(teacher, prompts, noise, solver, k, guidance_scale, seed))
        bar.update()
    for name, run, pipe, scale, gammas in students:
        pipe.set_progress_bar_config(disable=True)
        pipe(prompts[:1], num_inference_steps=1, output_type="latent")  # warm-up
        lcm_config = pipe.scheduler.config
        groups = [(None, _contract_label(name, pipe), LCM_STEPS)]  # the student as its contract samples it
        groups += [(g, f"{name}, TCD γ={g:g}", TCD_STEPS) for g in gammas]
        for gamma, label, steps in groups:
            if gamma is not None:
                pipe.scheduler = LCMKitScheduler.from_config(lcm_config, gamma=gamma)
            for k in steps:
                bar.set_postfix_str(" ".join(x for x in (label, run, f"{k} steps") if x))
                runs.append(run_lcm(pipe, label, prompts, noise, k, scale, seed, run=run))
                bar.update()
    bar.close()
    time_interleaved(runs, repeats, len(prompts))
    score(runs, runs[0], real_images, feature_net, seed)
    return runs
