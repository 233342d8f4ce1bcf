"""The distillation loop of ``train/distill_lora.py``: exact resume, accumulation, clipping, EMA, NaN guard,
checkpoints, logging and validation grids. ``state`` is the dict built by the script's ``setup()``.

Resume is exact: the data order is a permutation seeded by ``(seed, epoch)`` (:class:`lcm_kit.data.EpochSampler`),
augmentation is seeded per ``(seed, epoch, index)``, every micro-step's noise / ``w`` / timesteps / VAE sample come
from a generator seeded by ``(seed, rank, micro-step)``, and seen batches are skipped with
``accelerator.skip_first_batches``; accelerate's ``load_state`` restores optimizer, LR schedule and global RNGs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import train_io as io
from . import training as T

logger = logging.getLogger(__name__)


def _set_epoch(loader, epoch: int) -> None:
    loader.set_epoch(epoch)  # accelerate's DataLoaderShard forwards it to our sampler
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def _check_finite(accelerator, loss: torch.Tensor, step: int, output_dir: str) -> None:
    """All ranks agree; raise before ``backward`` so no weight is touched by the bad step."""
    bad = accelerator.gather(torch.isfinite(loss.detach()).logical_not().float().reshape(1)).sum().item()
    if bad:
        last = io.list_checkpoints(output_dir)
        keep = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved yet"
        raise FloatingPointError(
            f"non-finite loss ({loss.item()}) at optimizer step {step}: training stopped, no weights written from "
            f"this state; {keep} (resume with --resume_from_checkpoint latest after fixing the data / lr)"
        )


def _micro_step(args, accelerator, state, micro: int, step: int, batch) -> float:
    nets = state["nets"]
    with accelerator.accumulate(nets.student):
        gen = T.step_generator(args.seed, accelerator.process_index, micro)
        scale = float("inf") if args.debug_nan_at_step == step + 1 else 1.0
        with accelerator.autocast():
            out = T.distill_loss(nets, accelerator.unwrap_model(nets.student), batch, state["teacher"],
                                 state["loss_cfg"], state["uncond"], gen, state["weight_dtype"], scale)  # fmt: skip
        _check_finite(accelerator, out.loss, step + 1, args.output_dir)
        accelerator.backward(out.loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(nets.params, args.max_grad_norm)
        state["opt"].step()
        if accelerator.sync_gradients:
            state["sched"].step()
        state["opt"].zero_grad(set_to_none=True)
    return out.loss.item()


def _after_step(args, accelerator, state, step: int, loss: float) -> None:
    nets = state["nets"]
    if nets.target is not None:
        T.update_ema(nets.target, accelerator.unwrap_model(nets.student), args.ema_decay)
    accelerator.log({"loss": loss, "lr": state["sched"].get_last_lr()[0]}, step=step)
    if args.checkpointing_steps and step % args.checkpointing_steps == 0:
        path = io.save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit)
        logger.info("saved %s", path)
    if args.validation_steps and step % args.validation_steps == 0 and accelerator.is_main_process:
        log_validation(args, accelerator, state, step)


def train(args, accelerator, state, ckpt: Path | None = None) -> int:
    """Runs up to ``max_train_steps`` optimizer steps (from checkpoint ``ckpt`` if given); returns the final step."""
    loader, accum = state["loader"], args.gradient_accumulation_steps
    step = 0
    if ckpt is not None:
        step = io.load_checkpoint(accelerator, ckpt)
        logger.info("resumed from %s at step %d", ckpt, step)
    micro = step * accum
    bar = tqdm(total=args.max_train_steps, initial=step, disable=not accelerator.is_local_main_process, desc="steps")
    while step < args.max_train_steps:
        epoch, skip = divmod(micro, len(loader))
        _set_epoch(loader, epoch)
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            loss = _micro_step(args, accelerator, state, micro, step, batch)
            micro += 1
            if micro % accum == 0:
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}")
                _after_step(args, accelerator, state, step, loss)
                if step >= args.max_train_steps:
                    break
    bar.close()
    return step


def log_validation(args, accelerator, state, step: int) -> Path:
    """Writes ``validation/step-<N>.png`` (rows: prompts; columns: 1, 2, 4 steps) and logs it to the tracker."""
    import numpy as np

    prompts = [p.strip() for p in args.validation_prompts.split("|") if p.strip()]
    grid = io.validation_grid(accelerator, state["nets"], state["teacher"], prompts, args.seed)
    path = Path(args.output_dir) / "validation" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    return path


def dry_run(args, accelerator, state, resolved: dict) -> None:
    """Loads one batch, runs the loss once without backward, prints the plan."""
    nets, loader = state["nets"], state["loader"]
    batch = next(iter(loader))
    with torch.no_grad(), accelerator.autocast():
        out = T.distill_loss(nets, accelerator.unwrap_model(nets.student), batch, state["teacher"], state["loss_cfg"],
                             state["uncond"], T.step_generator(args.seed, 0, 0), state["weight_dtype"])  # fmt: skip
    n_train = sum(p.numel() for p in nets.params)
    procs = {type(p).__name__ for p in accelerator.unwrap_model(nets.student).attn_processors.values()}
    lines = [
        f"mode={args.mode} teacher={args.pretrained_teacher_model} "
        f"prediction_type={state['loss_cfg'].prediction_type}",
        f"data: {state['n_data']} samples ({state['skipped']} skipped), {len(loader)} batches/epoch/process, "
        f"batch {args.train_batch_size} x accum {args.gradient_accumulation_steps} x {accelerator.num_processes} proc",
        f"trainable params: {n_train:,}; frozen dtype {state['weight_dtype']}; mixed_precision "
        f"{accelerator.mixed_precision}; UNets in memory: {1 if nets.teacher is None else 3}",
        f"steps: {args.max_train_steps}, lr {args.learning_rate} ({args.lr_scheduler}, warmup {args.lr_warmup_steps})",
        f"attention: {', '.join(sorted(procs))}; gradient checkpointing {args.gradient_checkpointing}",
        f"first-batch loss {out.loss.item():.5g}; output_dir {args.output_dir}",
        "dry run: nothing trained",
    ]
    if accelerator.is_main_process:
        print("\n".join("[plan] " + s for s in lines))
