"""The run config of a distillation: one frozen dataclass tree, parsed once from the command line.

    RunConfig
      model      ModelConfig      teacher folder, lora / full layout, LoRA rank, w-embedding width, EMA decay
      data       DataConfig       image folder / hub dataset / webdataset shards, transforms, latent cache
      objective  ObjectiveConfig  which loss (``lcm``) and its hyper-parameters (solver grid, w range, distance)
      optim      OptimConfig      batch, steps, AdamW, LR schedule, clipping, precision, seed
      output     OutputConfig     output folder, checkpoints, validation, tracker, PEFT-layout file

Every flag of ``train/distill_lora.py`` is one field here (``transformers.HfArgumentParser`` maps them); each
config validates itself in ``__post_init__``, so a bad value raises ``ValueError`` before any model is loaded. The
modules of :mod:`lcm_kit.distill` receive the one sub-config they need, passed explicitly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from transformers import HfArgumentParser

from ..consistency_training import ConsistencyTrainingConfig
from ..data import DataConfig
from ..loading import is_sdxl_folder
from ..loss import DistillLossConfig
from ..schedules import check_num_phases

# Flags whose default depends on the teacher (SD 1.x/2.x: False, SDXL: True), as diffusers' LCM scripts.
TEACHER_DEFAULTS = {False: {"resolution": 512, "w_min": 5.0}, True: {"resolution": 1024, "w_min": 3.0}}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NOT_FLAGS = ("prediction_type",)  # read from the teacher's scheduler config, never from the command line


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Teacher and student networks."""

    _argument_group_name = "model"

    pretrained_teacher_model: str = field(metadata={"help": "Teacher SD folder (or hub id) in diffusers format."})
    mode: Literal["lora", "full"] = field(default="lora", metadata={"help": "lora: LCM-LoRA; full: LCM UNet + EMA."})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank (LCM-LoRA SD1.5: 64)."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; None = rank (scale 1)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    time_cond_proj_dim: int = field(default=256, metadata={"help": "full: guidance-embedding width (LCM: 256)."})
    ema_decay: float = field(
        default=0.95, metadata={"help": "EMA decay of the target network (full, or lora with --lora_ema; LCM: 0.95)."}
    )
    lora_ema: bool = field(
        default=False,
        metadata={"help": "lora: the target is an EMA of the adapter (a second adapter on the same UNet) instead of "
                  "the student itself (diffusers' LCM-LoRA scripts)."},
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for UNet memory."})
    init: Literal["teacher", "random"] = field(
        default="teacher",
        metadata={"help": "full: the student starts as the teacher's UNet (teacher) or from random weights (random, "
                  "training from scratch, e.g. --objective ct); lora needs the teacher's weights."},
    )  # fmt: skip

    def __post_init__(self):
        p = self.pretrained_teacher_model
        _need(Path(p).is_dir() or (not os.path.exists(p) and _HUB_ID.match(p) and not p.startswith((".", "/"))),
              f"teacher folder {p!r} not found (a local diffusers folder or a hub id 'org/name')")  # fmt: skip
        _need(not Path(p).is_dir() or (Path(p) / "unet").is_dir(), f"teacher folder {p!r} has no unet/ subfolder")
        _need(self.lora_rank > 0, f"lora_rank must be > 0, got {self.lora_rank}")
        _need(self.time_cond_proj_dim > 0, f"time_cond_proj_dim must be > 0, got {self.time_cond_proj_dim}")
        _need(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        _need(self.init in ("teacher", "random"), f"init must be 'teacher' or 'random', got {self.init!r}")
        _need(self.init == "teacher" or self.mode == "full",
              "init 'random' needs --mode full (a LoRA trains on top of the teacher's weights)")  # fmt: skip

    @property
    def lora_scale_alpha(self) -> float:
        """The LoRA alpha actually used (``lora_alpha``, or the rank when unset)."""
        return self.lora_rank if self.lora_alpha is None else self.lora_alpha


@dataclass(frozen=True)
class ObjectiveConfig(ConsistencyTrainingConfig, DistillLossConfig):
    """The training objective and its hyper-parameters (see :mod:`lcm_kit.distill.objectives`)."""

    _argument_group_name = "objective"
    LOSS_TYPES: ClassVar[tuple[str, ...]] = ("huber", "l2", "cauchy")

    objective: Literal["lcm", "pcm", "tcd", "ct"] = field(
        default="lcm",
        metadata={
            "help": "lcm: latent consistency distillation (arXiv 2310.04378); pcm: phased consistency distillation "
            "(arXiv 2405.18407, --num_phases, deterministic sampling on the phase edges); tcd: trajectory "
            "consistency distillation (arXiv 2402.19159, jumps of any length, sample with gamma); ct: consistency "
            "training from data alone, no teacher UNet (iCT arXiv 2310.14189 / ECT arXiv 2406.14548, --ct_*)."
        },
    )
    loss_type: Literal["huber", "l2", "cauchy"] = field(
        default="huber",
        metadata={"help": "'huber': pseudo-Huber sqrt(d^2 + c^2) - c, per element with --huber_c (lcm / pcm / tcd), "
                  "over the whole sample with c = 0.00054 sqrt(dim) (ct, iCT); 'l2': mean squared error; 'cauchy' "
                  "(ct only): log(1 + ||d||^2 / (2 c^2)) over the whole sample (arXiv 2502.01441)."},
    )  # fmt: skip
    num_phases: int = field(
        default=4, metadata={"help": "pcm: phases M of the trajectory; the student samples in exactly M steps."}
    )
    w_min: float | None = field(
        default=None,
        metadata={"help": "Lower bound of the guidance w ~ U[w_min, w_max], LCM convention cond + w * (cond - uncond) "
                  "(= guidance_scale - 1); default as diffusers' LCM(-LoRA) scripts: 5 (SD), 3 (SDXL)."},
    )  # fmt: skip
    sampling_gamma: float | None = field(
        default=None,
        metadata={"help": "gamma (TCD's stochasticity, 0: deterministic) recorded in the student's sampling "
                  "contract; default per objective: lcm plain LCM sampling, pcm 0, tcd 0.3."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.sampling_gamma is not None and not 0.0 <= self.sampling_gamma <= 1.0:
            raise ValueError(f"sampling_gamma must be in [0, 1], got {self.sampling_gamma}")
        check_num_phases(self.num_phases, self.num_ddim_timesteps)
        _need(self.loss_type != "cauchy" or self.objective == "ct",
              f"loss_type 'cauchy' is a consistency-training loss (--objective ct), got objective {self.objective!r}")

    @property
    def caption_dropout_p(self) -> float:
        """``caption_dropout``, or the objective's default (ct: 0.1 so the student learns CFG; the others 0)."""
        if self.caption_dropout is not None:
            return self.caption_dropout
        return 0.1 if self.objective == "ct" else 0.0


@dataclass(frozen=True)
class OptimConfig:
    """Batching, optimizer, LR schedule, precision and seed."""

    _argument_group_name = "optimisation"

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
    seed: int = field(default=0, metadata={"help": "Seed of data order, augmentation, noise, w and timesteps."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})

    def __post_init__(self):
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps"):
            _need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        _need(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.use_8bit_adam:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as err:
                raise ValueError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from err


@dataclass(frozen=True)
class OutputConfig:
    """Output folder, checkpoints, validation grids, tracker and test hooks."""

    _argument_group_name = "output"

    output_dir: str = field(default="lcm-distill-out", metadata={"help": "Where outputs and checkpoints go."})
    checkpointing_steps: int = field(default=500, metadata={"help": "Save a checkpoint every N steps (0: never)."})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep at most N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint path."})
    report_to: Literal["tensorboard", "none"] = field(default="tensorboard", metadata={"help": "Tracker."})
    validation_steps: int = field(default=200, metadata={"help": "Validation grid every N steps (0: never)."})
    validation_prompts: str = field(
        default="a photo of a cat|an astronaut riding a horse",
        metadata={"help": "'|'-separated validation prompts (grid rows; columns 1/2/4 steps)."},
    )
    save_peft_layout: bool = field(
        default=False,
        metadata={"help": "lora: also write pytorch_lora_weights_peft.safetensors, the same tensors under diffusers' "
                  "PEFT keys (the default file is the kohya-ss layout, which every SD tool and diffusers load)."},
    )
    dry_run: bool = field(default=False, metadata={"help": "Validate, load models and one batch, train nothing."})
    debug_nan_at_step: int | None = field(default=None, metadata={"help": "Test hook: inf data at this step."})
    debug_param_digest: bool = field(default=False, metadata={"help": "Test hook: each rank writes a digest."})

    allow_config_change: bool = field(
        default=False,
        metadata={"help": "Resume even if flags that change the training differ from the checkpoint's run (the "
                  "change is appended to training_config_history.jsonl)."},
    )

    def __post_init__(self):
        _need(self.checkpoints_total_limit is None or self.checkpoints_total_limit > 0,
              f"checkpoints_total_limit must be > 0, got {self.checkpoints_total_limit}")  # fmt: skip
        for name in ("checkpointing_steps", "validation_steps"):
            _need(getattr(self, name) >= 0, f"{name} must be >= 0 (0: never), got {getattr(self, name)}")
        _need(not self.validation_steps or bool(self.prompts),
              f"validation_prompts {self.validation_prompts!r} holds no prompt; give '|'-separated prompts or "
              "--validation_steps 0")  # fmt: skip

    @property
    def prompts(self) -> list[str]:
        """The validation prompts as a list."""
        return [p.strip() for p in self.validation_prompts.split("|") if p.strip()]


@dataclass(frozen=True)
class RunConfig:
    """Everything a distillation run needs, one sub-config per stage of the data flow (module docstring)."""

    model: ModelConfig
    data: DataConfig
    objective: ObjectiveConfig
    optim: OptimConfig
    output: OutputConfig

    def resolved(self) -> dict[str, Any]:
        """All fields flat, as written to ``training_config.json`` (flag name -> value)."""
        return {k: v for part in (self.model, self.data, self.objective, self.optim, self.output)
                for k, v in asdict(part).items()}  # fmt: skip

    def with_curriculum_length(self) -> RunConfig:
        """``ct``: ``ct_total_steps`` resolved to ``max_train_steps`` when unset (recorded, so a resume checks it)."""
        if self.objective.objective != "ct" or self.objective.ct_total_steps is not None:
            return self
        return replace(self, objective=replace(self.objective, ct_total_steps=self.optim.max_train_steps))

    def with_teacher_defaults(self) -> RunConfig:
        """``resolution`` and ``w_min`` left unset resolved for the teacher's kind (:data:`TEACHER_DEFAULTS`, read
        from its JSON configs: an SDXL UNet has ``addition_embed_type="text_time"``)."""
        defaults = TEACHER_DEFAULTS[is_sdxl_folder(self.model.pretrained_teacher_model)]
        data, objective = self.data, self.objective
        if data.resolution is None:
            data = replace(data, resolution=defaults["resolution"])
        if objective.w_min is None:
            objective = replace(objective, w_min=defaults["w_min"])
        return replace(self, data=data, objective=objective)

    def with_prediction_type(self, prediction_type: str) -> RunConfig:
        """The same config with the teacher's parameterisation in the objective."""
        return replace(self, objective=replace(self.objective, prediction_type=prediction_type))


class _Parser(HfArgumentParser):
    """``HfArgumentParser`` that leaves :data:`_NOT_FLAGS` off the command line (they keep their defaults)."""

    @staticmethod
    def _parse_dataclass_field(parser, field):
        if field.name in _NOT_FLAGS:
            parser.set_defaults(**{field.name: field.default})
        else:
            HfArgumentParser._parse_dataclass_field(parser, field)


PARTS = (ModelConfig, DataConfig, ObjectiveConfig, OptimConfig, OutputConfig)
_RETIRED = {  # flags of earlier versions -> what replaced them
    "--save_kohya": "the default pytorch_lora_weights.safetensors is now the kohya-ss layout (ComfyUI, A1111, kohya "
    "sd-scripts and diffusers load it); --save_peft_layout also writes the diffusers/PEFT-layout file",
}


def parse_config(argv: Sequence[str] | None = None, description: str | None = None) -> RunConfig:
    """Command line -> a validated :class:`RunConfig` (``argv=None`` reads ``sys.argv``).

    Raises:
        ValueError: an unknown flag, or a value that a config's validation rejects (argparse exits on a bad type or
            choice).
    """
    parser = _Parser(PARTS, description=description)
    *parts, unknown = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None,
                                                        return_remaining_strings=True)  # fmt: skip
    retired = [flag for flag in unknown if flag in _RETIRED]
    if retired:
        raise ValueError(f"{retired[0]} is gone: {_RETIRED[retired[0]]}")
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; `python train/distill_lora.py --help` lists the flags")
    return RunConfig(*parts).with_curriculum_length().with_teacher_defaults()
