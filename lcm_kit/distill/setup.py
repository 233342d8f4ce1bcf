"""What the loop is built from, before any step: the accelerator, the data loader and the optimizer."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .config import OptimConfig, RunConfig
from .networks import Teacher

logger = logging.getLogger(__name__)


def make_accelerator(config: RunConfig):
    """Accelerator with manual LR stepping, accumulation not synced to epoch ends (exact resume), tracker."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    optim, out = config.optim, config.output
    return Accelerator(
        mixed_precision=optim.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=optim.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=None if out.report_to == "none" else out.report_to,
        project_config=ProjectConfiguration(project_dir=out.output_dir, logging_dir=f"{out.output_dir}/logs"),
        step_scheduler_with_optimizer=False,
    )


def build_data(config: RunConfig, teacher: Teacher, accelerator) -> tuple[torch.utils.data.DataLoader, int, int]:
    """Dataset (cached latents with ``--cache_dir``, shards streamed without it, else images) + loader + sampler;
    ``(loader, n, skipped)``."""
    from ..cache_shards import CachedLatentDataset
    from ..data import EpochSampler, build_dataset, open_source
    from ..latent_cache import cached_latents

    data, seed, batch = config.data, config.optim.seed, config.optim.train_batch_size
    skipped, sampler = 0, None
    if data.cache_dir:
        source = open_source(data)
        ctx = build_context(accelerator, data.cache_dir)
        cache, skipped, folder = cached_latents(data, teacher.path, source, teacher.vae, teacher.text, ctx)
        ds = CachedLatentDataset(cache, data.random_flip, seed, teacher.xl)
        if accelerator.is_main_process:
            print(f"[data] latent cache {folder}: {len(cache)} samples, {cache.nbytes / 2**20:.1f} MiB "
                  f"({cache.nbytes / len(cache) / 1024:.1f} KiB/sample)")  # fmt: skip
    elif data.train_shards:
        ds, sampler = _streamed(data, batch, seed, accelerator)
    else:
        ds, skipped = build_dataset(data, seed)
    if skipped and accelerator.is_main_process:
        print(f"[data] skipped {skipped} unreadable image(s) / missing caption(s); training on {len(ds)}")
    n = len(ds) if sampler is None else sampler.n_samples
    sampler = EpochSampler(n, seed) if sampler is None else sampler
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler,
                                         num_workers=config.optim.dataloader_num_workers)  # fmt: skip
    return loader, n, skipped


def _streamed(data, batch: int, seed: int, accelerator):
    """Shards streamed without a cache (:mod:`lcm_kit.streaming`): this rank's dataset and the shared sampler."""
    from accelerate.utils import gather_object

    from ..streaming import stream_data

    state = accelerator.state
    ds, sampler = stream_data(data, batch, seed, state.process_index, state.num_processes, gather_object)
    if accelerator.is_main_process:
        per_rank = [sum(s) for s in sampler.sizes]
        print(f"[data] streaming {sampler.n_samples} samples from {sum(map(len, sampler.sizes))} shard(s) without a "
              f"cache; samples per process {per_rank}, {sampler.per_rank} batches per process and epoch; "
              "unreadable samples are replaced as they are found")  # fmt: skip
    return ds, sampler


def build_context(accelerator, cache_dir: str):
    """Which shards of the latent cache this process encodes. Every process shares the work when all of them see
    the same ``cache_dir`` (one machine, or a shared filesystem); else each machine builds the whole cache on its
    own disk with its own processes."""
    from ..latent_cache import BuildContext

    state, barrier, share = accelerator.state, accelerator.wait_for_everyone, from_main_process(accelerator)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    if local == state.num_processes or _shared_folder(Path(cache_dir), accelerator):
        return BuildContext(state.process_index, state.num_processes, barrier, share)
    return BuildContext(state.local_process_index, local, barrier, share)


def from_main_process(accelerator):
    """``compute()`` run by the main process only, its result broadcast to all (the cache key: one data hash)."""
    from accelerate.utils import broadcast_object_list

    def share(compute):
        return broadcast_object_list([compute() if accelerator.is_main_process else None])[0]

    return share


def _shared_folder(folder: Path, accelerator) -> bool:
    """Whether all machines see one ``folder``: the main process writes a probe that the others look for (each
    machine's own copy is removed first)."""
    probe = folder / ".shared_probe"
    if accelerator.is_local_main_process:
        probe.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.touch()
        except OSError:  # read-only: the cache must already be complete, nothing is built either way
            pass
    accelerator.wait_for_everyone()
    shared = probe.exists()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    return shared


def make_optimizer(optim: OptimConfig, params: list[torch.nn.Parameter]):
    """AdamW (or 8-bit AdamW) and the LR schedule, stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    if optim.use_8bit_adam:
        import bitsandbytes as bnb

        opt_cls = bnb.optim.AdamW8bit
    else:
        opt_cls = torch.optim.AdamW
    opt = opt_cls(params, lr=optim.learning_rate, betas=(optim.adam_beta1, optim.adam_beta2),
                  weight_decay=optim.adam_weight_decay, eps=optim.adam_epsilon)  # fmt: skip
    if optim.lr_warmup_steps and optim.lr_scheduler == "constant":
        logger.warning("lr_warmup_steps=%d has no effect with lr_scheduler 'constant' (diffusers' get_scheduler); "
                       "use 'constant_with_warmup' for a warm-up", optim.lr_warmup_steps)  # fmt: skip
    sched = get_scheduler(optim.lr_scheduler, opt, num_warmup_steps=optim.lr_warmup_steps,
                          num_training_steps=optim.max_train_steps)  # fmt: skip
    return opt, sched
