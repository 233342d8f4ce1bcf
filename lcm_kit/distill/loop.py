"""The distillation loop: accelerate set-up, exact resume, accumulation, clipping, EMA, NaN guard, checkpoints,
logging and validation grids. :func:`run` is everything ``train/distill_lora.py`` does after parsing its flags.

One optimizer step: a batch (cached latents or pixels) -> :meth:`Teacher.latents_and_cond` -> the objective
(:mod:`lcm_kit.distill.objectives`) over :meth:`Networks.callables` -> backward, clip, AdamW, LR schedule -> EMA
(full mode) -> checkpoint / validation (:mod:`lcm_kit.distill.checkpoints`, :mod:`lcm_kit.distill.outputs`).

Resume is exact: the data order is a permutation seeded by ``(seed, epoch)`` (:class:`lcm_kit.data.EpochSampler`),
augmentation is seeded per ``(seed, epoch, index)``, every micro-step's noise / ``w`` / timesteps / VAE sample come
from a generator seeded by ``(seed, rank, micro-step)``, and seen batches are skipped with
``accelerator.skip_first_batches``; accelerate's ``load_state`` restores optimizer, LR schedule and global RNGs.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..conditioning import TextCond
from ..lora import adapter_mode
from ..loss import DistillLossOutput
from ..streaming import all_shards
from . import checkpoints as ckpts
from . import outputs
from .config import RunConfig
from .networks import Networks, Teacher, build_networks, load_teacher, update_ema, weight_dtype_for
from .objectives import Objective, make_objective
from .setup import build_data, make_accelerator, make_optimizer

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything the loop holds; ``config`` has the teacher's ``prediction_type`` resolved."""

    config: RunConfig
    teacher: Teacher
    nets: Networks
    objective: Objective
    loader: Any
    optimizer: Any
    lr_scheduler: Any
    uncond: TextCond  # the teacher's unconditional text, batch 1 (the empty prompt's, or SDXL's zeros)
    n_data: int
    skipped: int


def setup(config: RunConfig, accelerator) -> TrainState:
    """Teacher, data, networks, objective, optimizer, accelerate preparation, checkpoint hooks."""
    m = config.model
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    if config.data.train_shards and not config.data.cache_dir:  # one shard per process at least: fail before loading
        all_shards(config.data, accelerator.num_processes)
    try:
        teacher = load_teacher(m.pretrained_teacher_model, accelerator.device, weight_dtype)
    except OSError as err:  # missing files / unknown hub id: a user error, reported before any training
        raise ValueError(f"cannot load the teacher {m.pretrained_teacher_model!r}: {err}") from err
    config = config.with_prediction_type(teacher.prediction_type)
    loader, n_data, skipped = build_data(config, teacher, accelerator)
    objective = make_objective(config.objective, teacher.alphas_cumprod)
    nets = build_networks(m, teacher, weight_dtype, objective.guided)
    if m.gradient_checkpointing:
        nets.student.enable_gradient_checkpointing()
    opt, sched = make_optimizer(config.optim, nets.params)
    nets.student, opt, loader, sched = accelerator.prepare(nets.student, opt, loader, sched)
    ckpts.register_hooks(accelerator, nets)
    uncond = teacher.text.uncond()
    return TrainState(config, teacher, nets, objective, loader, opt, sched, uncond, n_data, skipped)


def step_generator(seed: int, rank: int, micro_step: int) -> torch.Generator:
    """The CPU generator of one micro-step: a pure function of (seed, rank, step), so resume needs no RNG state."""
    digest = hashlib.sha256(f"step/{seed}/{rank}/{micro_step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def batch_loss(state: TrainState, base: torch.nn.Module, batch: dict, generator: torch.Generator,
               data_scale: float = 1.0, step: int = 0) -> DistillLossOutput:  # fmt: skip
    """The objective on one micro-batch at global optimizer step ``step`` (``data_scale`` multiplies the latents: a
    test hook for non-finite data). Draws: the VAE sample, the caption dropout (if any), then the objective's."""
    latents, text = state.teacher.latents_and_cond(batch, generator)
    p_drop = state.config.objective.caption_dropout_p
    if p_drop > 0:
        drop = torch.rand(latents.shape[0], generator=generator, dtype=torch.float64) < p_drop
        text = text.dropped(state.uncond, drop)
    fns = state.nets.callables(base, text, state.uncond)
    return state.objective(fns, latents * data_scale, generator, step)


def _check_finite(accelerator, loss: torch.Tensor, step: int, output_dir: str) -> None:
    """All ranks agree; raise before ``backward`` so no weight is touched by the bad step."""
    bad = accelerator.gather(torch.isfinite(loss.detach()).logical_not().float().reshape(1)).sum().item()
    if bad:
        last = ckpts.list_checkpoints(output_dir)
        keep = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved yet"
        raise FloatingPointError(
            f"non-finite loss ({loss.item()}) at optimizer step {step}: training stopped, no weights written from "
            f"this state; {keep} (resume with --resume_from_checkpoint latest after fixing the data / lr)"
        )


def _micro_step(accelerator, state: TrainState, micro: int, step: int, batch) -> float:
    nets, cfg = state.nets, state.config
    with accelerator.accumulate(nets.student):
        gen = step_generator(cfg.optim.seed, accelerator.process_index, micro)
        scale = float("inf") if cfg.output.debug_nan_at_step == step + 1 else 1.0
        with accelerator.autocast():
            out = batch_loss(state, accelerator.unwrap_model(nets.student), batch, gen, scale, step)
        _check_finite(accelerator, out.loss, step + 1, cfg.output.output_dir)
        accelerator.backward(out.loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(nets.params, cfg.optim.max_grad_norm)
        state.optimizer.step()
        if accelerator.sync_gradients:
            state.lr_scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
    return out.loss.item()


def _after_step(accelerator, state: TrainState, step: int, loss: float, seconds: float) -> None:
    nets, out = state.nets, state.config.output
    pairs = nets.ema_update_pairs(accelerator.unwrap_model(nets.student))
    if pairs:
        update_ema(pairs, state.config.model.ema_decay)
    accelerator.log({"loss": loss, "lr": state.lr_scheduler.get_last_lr()[0]}, step=step)
    if out.checkpointing_steps and step % out.checkpointing_steps == 0:
        path = ckpts.save_checkpoint(accelerator, out.output_dir, step, out.checkpoints_total_limit, seconds,
                                     state.config.resolved())  # fmt: skip
        logger.info("saved %s", path)
    if out.validation_steps and step % out.validation_steps == 0 and accelerator.is_main_process:
        try:
            log_validation(accelerator, state, step)
        except Exception:  # a failed grid must not stop training or lose its weights
            logger.exception("validation at step %d failed; training goes on", step)


def train(accelerator, state: TrainState, ckpt: Path | None = None) -> int:
    """Runs up to ``max_train_steps`` optimizer steps (from checkpoint ``ckpt`` if given); returns the final step."""
    loader, optim = state.loader, state.config.optim
    accum, step, seconds = optim.gradient_accumulation_steps, 0, 0.0
    if ckpt is not None:
        step, seconds = ckpts.load_checkpoint(accelerator, ckpt)
        logger.info("resumed from %s at step %d", ckpt, step)
    start = time.perf_counter() - seconds
    micro = step * accum
    bar = tqdm(total=optim.max_train_steps, initial=step, disable=not accelerator.is_local_main_process, desc="steps")
    while step < optim.max_train_steps:
        epoch, skip = divmod(micro, len(loader))
        loader.set_epoch(epoch)  # accelerate's DataLoaderShard forwards it to our sampler
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        batches.set_epoch(epoch)  # accelerate < 1.15 starts the skipping loader at epoch 0 (a different order)
        for batch in batches:
            loss = _micro_step(accelerator, state, micro, step, batch)
            micro += 1
            if micro % accum == 0:
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}")
                _after_step(accelerator, state, step, loss, time.perf_counter() - start)
                if step >= optim.max_train_steps:
                    break
    bar.close()
    return step


def log_validation(accelerator, state: TrainState, step: int) -> Path:
    """Writes ``validation/step-<N>.png`` (rows: prompts; columns: 1, 2, 4 steps, or a phased student's schedule)
    and logs it to the tracker."""
    import numpy as np

    cfg = state.config
    unet = state.nets.sampling_unet(accelerator.unwrap_model(state.nets.student))
    contract = state.objective.sampling()
    scheduler, columns = outputs.student_scheduler(state.teacher, contract), outputs.sampling_columns(contract)
    with adapter_mode(unet, state.nets.sampling_adapter) if state.nets.sample_ema_adapter else nullcontext():
        grid = outputs.validation_grid(unet, state.teacher, scheduler, cfg.output.prompts, cfg.optim.seed,
                                       accelerator.autocast, columns)  # fmt: skip
    path = Path(cfg.output.output_dir) / "validation" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    return path


def dry_run(accelerator, state: TrainState) -> None:
    """Loads one batch, runs the loss once without backward, prints the plan."""
    nets, loader, cfg = state.nets, state.loader, state.config
    m, o, opt = cfg.model, cfg.objective, cfg.optim
    base, gen = accelerator.unwrap_model(nets.student), step_generator(opt.seed, 0, 0)
    with torch.no_grad(), accelerator.autocast():
        out = batch_loss(state, base, next(iter(loader)), gen)
    n_train = sum(p.numel() for p in nets.params)
    procs = {type(p).__name__ for p in base.attn_processors.values()}
    lines = [
        f"mode={m.mode} objective={o.objective} teacher={m.pretrained_teacher_model} "
        f"({'SDXL' if state.teacher.xl else 'SD 1.x/2.x'}, {cfg.data.resolution} px, w_min {o.w_min}) "
        f"prediction_type={o.prediction_type}",
        f"data: {state.n_data} samples ({state.skipped} skipped), {len(loader)} batches/epoch/process, "
        f"batch {opt.train_batch_size} x accum {opt.gradient_accumulation_steps} x {accelerator.num_processes} proc",
        f"trainable params: {n_train:,}; frozen dtype {nets.weight_dtype}; mixed_precision "
        f"{accelerator.mixed_precision}; UNets in memory: {1 if nets.teacher is None else 3}",
        f"steps: {opt.max_train_steps}, lr {opt.learning_rate} ({opt.lr_scheduler}, warmup {opt.lr_warmup_steps})",
        f"attention: {', '.join(sorted(procs))}; gradient checkpointing {m.gradient_checkpointing}",
        f"sampling: {state.objective.sampling()}",
        f"first-batch loss {out.loss.item():.5g}; output_dir {cfg.output.output_dir}",
        "dry run: nothing trained",
    ]
    if accelerator.is_main_process:
        print("\n".join("[plan] " + s for s in lines))


def run(config: RunConfig) -> int:
    """A whole distillation: outputs checked, resume resolved, set-up, training, final weights and model card."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(config)
    if accelerator.is_main_process:
        outputs.check_writable(config.output.output_dir)
    accelerator.wait_for_everyone()
    ckpt = ckpts.resolve_resume(config.output.output_dir, config.output.resume_from_checkpoint)  # fails before loading
    if ckpt is not None:
        ckpts.check_resume(ckpt, config, accelerator.process_index, accelerator.is_main_process)
    set_seed(config.optim.seed)
    state = setup(config, accelerator)
    if accelerator.is_main_process:
        outputs.write_config(state.config)
    if config.output.dry_run:
        dry_run(accelerator, state)
        return 0
    if config.output.report_to != "none":
        accelerator.init_trackers("lcm_distill", config={k: str(v) for k, v in state.config.resolved().items()})
    step = train(accelerator, state, ckpt)
    accelerator.wait_for_everyone()
    student = accelerator.unwrap_model(state.nets.student)
    if accelerator.is_main_process:
        contract = state.objective.sampling()
        outputs.save_final(state.nets, student, state.teacher, contract, config.output.output_dir,
                           config.output.save_peft_layout)  # fmt: skip
        outputs.write_model_card(state.config, contract, step, accelerator.num_processes, state.teacher.xl)
    if config.output.debug_param_digest:
        outputs.write_debug_digest(student, config, accelerator.process_index)
    accelerator.end_training()
    return 0
