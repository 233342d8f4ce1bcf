"""Latent consistency distillation of a Stable Diffusion 1.x/2.x teacher: LCM-LoRA (default) or a full LCM UNet.

    accelerate launch train/distill_lora.py --pretrained_teacher_model PATH --train_data_dir DIR --output_dir OUT

``--mode lora``: one UNet in memory, the LoRA adapter is the student, the teacher is the same UNet with the adapter
off (``lcm_kit.lora.teacher_mode``), the target is the adapted UNet without gradients (no EMA), as diffusers'
LCM-LoRA scripts. ``--mode full``: a student UNet with a guidance embedding, initialised from the teacher, plus an
EMA target network. Defaults follow diffusers' reference LCM scripts (see each flag's help). ``--dry_run``
validates everything, loads the models and one batch, prints the plan and trains nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from lcm_kit import train_io as io
from lcm_kit import training as T
from lcm_kit.cli import parse_dataclasses
from lcm_kit.data import DataConfig
from lcm_kit.lora import lora_state_dict
from lcm_kit.loss import DistillLossConfig

logger = logging.getLogger("distill_lora")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class TrainArgs:
    """Model, optimisation, checkpointing and logging options."""

    pretrained_teacher_model: str = field(metadata={"help": "Teacher SD folder (or hub id) in diffusers format."})
    output_dir: str = field(default="lcm-distill-out", metadata={"help": "Where outputs and checkpoints go."})
    mode: Literal["lora", "full"] = field(default="lora", metadata={"help": "lora: LCM-LoRA; full: LCM UNet + EMA."})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank (LCM-LoRA SD1.5: 64)."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; None = rank (scale 1)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    time_cond_proj_dim: int = field(default=256, metadata={"help": "full: guidance-embedding width (LCM: 256)."})
    ema_decay: float = field(default=0.95, metadata={"help": "full: EMA decay of the target network (LCM: 0.95)."})
    train_batch_size: int = field(default=16, metadata={"help": "Batch size per process (diffusers: 16)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_train_steps: int = field(default=1000, metadata={"help": "Optimizer steps to train."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (diffusers: 1e-4)."})
    lr_scheduler: str = field(default="constant", metadata={"help": "diffusers.optimization.get_scheduler name."})
    lr_warmup_steps: int = field(default=500, metadata={"help": "LR warm-up steps (diffusers: 500)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay (diffusers: 1e-2)."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes AdamW8bit (needs bitsandbytes)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (diffusers: 1.0)."})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "no/fp16/bf16; None = accelerate's config (frozen weights in this dtype)."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for UNet memory."})
    seed: int = field(default=0, metadata={"help": "Seed of data order, augmentation, noise, w and timesteps."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    checkpointing_steps: int = field(default=500, metadata={"help": "Save a checkpoint every N steps (0: never)."})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep at most N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint path."})
    report_to: Literal["tensorboard", "none"] = field(default="tensorboard", metadata={"help": "Tracker."})
    validation_steps: int = field(default=200, metadata={"help": "Validation grid every N steps (0: never)."})
    validation_prompts: str = field(
        default="a photo of a cat|an astronaut riding a horse",
        metadata={"help": "'|'-separated validation prompts (grid rows; columns 1/2/4 steps)."},
    )
    save_kohya: bool = field(default=False, metadata={"help": "lora: also write the kohya-format file."})
    dry_run: bool = field(default=False, metadata={"help": "Validate, load models and one batch, train nothing."})
    debug_nan_at_step: int | None = field(default=None, metadata={"help": "Test hook: inf data at this step."})
    debug_param_digest: bool = field(default=False, metadata={"help": "Test hook: each rank writes a digest."})

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        p = self.pretrained_teacher_model
        need(Path(p).is_dir() or (not os.path.exists(p) and _HUB_ID.match(p) and not p.startswith((".", "/"))),
             f"teacher folder {p!r} not found (a local diffusers folder or a hub id 'org/name')")  # fmt: skip
        need(not Path(p).is_dir() or (Path(p) / "unet").is_dir(), f"teacher folder {p!r} has no unet/ subfolder")
        need(self.lora_rank > 0, f"lora_rank must be > 0, got {self.lora_rank}")
        need(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "time_cond_proj_dim"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        need(self.checkpoints_total_limit is None or self.checkpoints_total_limit > 0, "checkpoints_total_limit <= 0")
        if self.use_8bit_adam:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as err:
                raise ValueError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from err


def parse_args(argv: list[str] | None) -> tuple[TrainArgs, DataConfig, DistillLossConfig]:
    """CLI -> validated configs (``prediction_type`` is read from the teacher's scheduler, not a flag)."""
    return parse_dataclasses((TrainArgs, DataConfig, DistillLossConfig), argv, exclude=("prediction_type",),
                             description=__doc__.splitlines()[0])  # fmt: skip


def make_accelerator(args: TrainArgs):
    """Accelerator with manual LR stepping, accumulation not synced to epoch ends (exact resume), tracker."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    return Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=f"{args.output_dir}/logs"),
        step_scheduler_with_optimizer=False,
    )


def prepare_output_dir(accelerator, configs: tuple) -> dict:
    """Checks ``output_dir`` is writable (``ValueError`` otherwise) and dumps the resolved config JSON."""
    args = configs[0]
    resolved = {k: v for c in configs for k, v in asdict(c).items()}
    if accelerator.is_main_process:
        try:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            probe = Path(args.output_dir) / ".write_probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise ValueError(f"output_dir {args.output_dir!r} is not writable: {err}") from err
        (Path(args.output_dir) / "training_config.json").write_text(json.dumps(resolved, indent=2))
    accelerator.wait_for_everyone()
    return resolved


def build_data(args: TrainArgs, data_cfg: DataConfig, teacher: T.Teacher, accelerator):
    """Dataset (cached latents with ``--cache_dir``, else images) + loader + sampler; ``(loader, n, skipped)``."""
    from lcm_kit.data import CachedLatentDataset, EpochSampler, build_dataset, open_source
    from lcm_kit.latent_cache import cached_latents

    if data_cfg.cache_dir:
        source = open_source(data_cfg)
        with accelerator.main_process_first():
            tensors, skipped, _ = cached_latents(data_cfg, args.pretrained_teacher_model, source, teacher.vae,
                                                 teacher.text_encoder, teacher.tokenizer)  # fmt: skip
        ds = CachedLatentDataset(tensors, data_cfg.random_flip, args.seed)
    else:
        ds, skipped = build_dataset(data_cfg, args.seed)
    if skipped and accelerator.is_main_process:
        print(f"[data] skipped {skipped} unreadable image(s) / missing caption(s); training on {len(ds)}")
    sampler = EpochSampler(len(ds), args.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.train_batch_size, sampler=sampler,
                                         num_workers=args.dataloader_num_workers)  # fmt: skip
    return loader, len(ds), skipped


def make_optimizer(args: TrainArgs, params: list):
    """AdamW (or 8-bit AdamW) and the LR schedule, stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    if args.use_8bit_adam:
        import bitsandbytes as bnb

        opt_cls = bnb.optim.AdamW8bit
    else:
        opt_cls = torch.optim.AdamW
    opt = opt_cls(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)  # fmt: skip
    sched = get_scheduler(args.lr_scheduler, opt, num_warmup_steps=args.lr_warmup_steps,
                          num_training_steps=args.max_train_steps)  # fmt: skip
    return opt, sched


def setup(args, data_cfg, loss_cfg, accelerator):
    """Teacher, networks, data, optimizer, accelerate preparation, hooks: everything before the loop."""
    weight_dtype = T.weight_dtype_for(accelerator.mixed_precision)
    try:
        teacher = T.load_teacher(args.pretrained_teacher_model, accelerator.device, weight_dtype)
    except OSError as err:  # missing files / unknown hub id: a user error, reported before any training
        raise ValueError(f"cannot load the teacher {args.pretrained_teacher_model!r}: {err}") from err
    loss_cfg = replace(loss_cfg, prediction_type=teacher.prediction_type)
    loader, n_data, skipped = build_data(args, data_cfg, teacher, accelerator)
    nets = T.build_networks(args.mode, teacher, weight_dtype, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                            lora_dropout=args.lora_dropout, time_cond_proj_dim=args.time_cond_proj_dim)  # fmt: skip
    if args.gradient_checkpointing:
        nets.student.enable_gradient_checkpointing()
    opt, sched = make_optimizer(args, nets.params)
    nets.student, opt, loader, sched = accelerator.prepare(nets.student, opt, loader, sched)
    io.register_hooks(accelerator, nets)
    uncond = T.encode_prompts(teacher.tokenizer, teacher.text_encoder, [""])
    return dict(teacher=teacher, loss_cfg=loss_cfg, loader=loader, nets=nets, opt=opt, sched=sched,
                uncond=uncond, weight_dtype=weight_dtype, n_data=n_data, skipped=skipped)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point (also called in-process by tests). Returns 0; raises ``ValueError`` on bad input."""
    from lcm_kit.train_loop import dry_run, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configs = parse_args(argv)
    args = configs[0]
    accelerator = make_accelerator(args)
    resolved = prepare_output_dir(accelerator, configs)
    ckpt = io.resolve_resume(args.output_dir, args.resume_from_checkpoint)  # a bad path fails before loading
    from accelerate.utils import set_seed

    set_seed(args.seed)
    state = setup(args, configs[1], configs[2], accelerator)
    if args.dry_run:
        dry_run(args, accelerator, state, resolved)
        return 0
    if args.report_to != "none":
        accelerator.init_trackers("lcm_distill", config={k: str(v) for k, v in resolved.items()})
    step = train(args, accelerator, state, ckpt)
    accelerator.wait_for_everyone()
    io.save_final(accelerator, state["nets"], state["teacher"], args.output_dir, args.save_kohya)
    if accelerator.is_main_process:
        io.write_model_card(args.output_dir, {**resolved, "lora_alpha": args.lora_alpha}, step,
                            accelerator.num_processes)  # fmt: skip
    if args.debug_param_digest:
        student = accelerator.unwrap_model(state["nets"].student)
        digest = T.state_digest(lora_state_dict(student) if args.mode == "lora" else student.state_dict())
        Path(args.output_dir, f"debug_params_rank{accelerator.process_index}.txt").write_text(digest)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
