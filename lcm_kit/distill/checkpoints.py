"""Checkpoints of a distillation run: accelerate state plus safetensors weights, exact resume.

Layout ``<output_dir>/checkpoint-<step>/``: accelerate's ``save_state`` (optimizer, LR scheduler, RNG states,
gradient-accumulation step) plus our hook's weights, safetensors only: ``pytorch_lora_weights.safetensors`` (lora
mode, the kohya-ss layout of the final file, read back through the model's own peft keys; the base UNet is not
duplicated; with ``--lora_ema`` also the EMA adapter) or ``unet/`` + ``unet_target/``
(full mode, the EMA target included), ``training_state.json`` (``global_step``) and ``train_time.json``
(``train_seconds``: wall time spent in the loop up to this step, summed over resumed runs; what
``bench/time_to_quality.py`` reads). A checkpoint is written to ``checkpoint-<step>.tmp`` and renamed when complete,
so ``--resume_from_checkpoint latest`` never picks a half-written one. ``checkpoint_manifest.json`` records the sha256
of every other file; resume verifies it before anything is loaded, so a corrupt file (accelerate would skip an
unreadable RNG state with an INFO line, and the run would silently stop being exact) is a ``ValueError`` naming it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from ..atomic import save_safetensors
from ..digests import verify_manifest, write_manifest
from ..lora import EMA_ADAPTER, LORA_WEIGHT_NAME, adapter_state_dict, save_lora, to_peft
from .networks import Networks

logger = logging.getLogger(__name__)
CONFIG_NAME = "training_config.json"  # the resolved config of the run that wrote the checkpoint
# Flags that may differ on resume without changing what is trained (everything else must match the checkpoint's run).
RESUME_MAY_CHANGE = frozenset({
    "max_train_steps", "output_dir", "resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit",
    "validation_steps", "validation_prompts", "report_to", "dry_run", "debug_nan_at_step", "debug_param_digest",
    "dataloader_num_workers", "allow_config_change", "prediction_type", "save_peft_layout",
    "save_kohya",  # the output flag of before the default file became the kohya layout, in older checkpoints
})  # fmt: skip
EMA_WEIGHT_NAME = "lora_ema_adapter.safetensors"  # lora_ema: the target adapter, peft keys
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def register_hooks(accelerator, nets: Networks) -> None:
    """Save/load hooks: our safetensors weights replace accelerate's full-model dump (see module docstring)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    def save_hook(models, weights, output_dir):
        student = accelerator.unwrap_model(nets.student)
        if accelerator.is_main_process:
            if nets.target is None:
                save_lora(student, output_dir)
                if nets.ema_pairs:
                    save_safetensors(adapter_state_dict(student, EMA_ADAPTER), Path(output_dir) / EMA_WEIGHT_NAME)
            else:
                student.save_pretrained(os.path.join(output_dir, "unet"))
                nets.target.save_pretrained(os.path.join(output_dir, "unet_target"))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        student = accelerator.unwrap_model(nets.student)
        while models:
            models.pop()
        if nets.target is None:
            path = os.path.join(input_dir, LORA_WEIGHT_NAME)
            try:
                state = to_peft(load_file(path), adapter_state_dict(student, "default"), student.config)
            except ValueError as err:
                raise ValueError(f"checkpoint {path} does not match the model: {err}") from err
            set_peft_model_state_dict(student, state)
            if nets.ema_pairs:
                ema = load_file(os.path.join(input_dir, EMA_WEIGHT_NAME))
                set_peft_model_state_dict(student, ema, adapter_name=EMA_ADAPTER)
        else:
            for module, sub in ((student, "unet"), (nets.target, "unet_target")):
                sd = load_file(os.path.join(input_dir, sub, "diffusion_pytorch_model.safetensors"))
                module.load_state_dict(sd)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir`` (with their ``training_state.json``), oldest first."""
    root = Path(output_dir)
    found = [p for p in root.iterdir() if p.is_dir() and _CKPT.match(p.name)] if root.is_dir() else []
    found = [p for p in found if (p / "training_state.json").is_file()]
    return sorted(found, key=lambda p: int(_CKPT.match(p.name).group(1)))


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None,
                    train_seconds: float = 0.0, config: dict | None = None) -> Path:  # fmt: skip
    """Saves ``checkpoint-<step>`` on all processes (temp dir + rename on the main one), prunes to ``total_limit``."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "training_state.json").write_text(json.dumps({"global_step": step}))
        (tmp / "train_time.json").write_text(json.dumps({"train_seconds": round(train_seconds, 3)}))
        if config is not None:
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        write_manifest(tmp)  # last: it covers every file above, all processes' RNG states included
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        old = list_checkpoints(output_dir)
        for path in old[: max(0, len(old) - total_limit)] if total_limit else []:
            shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(output_dir: str, resume: str | None) -> Path | None:
    """``None`` / ``"latest"`` (newest complete checkpoint, or none yet) / a path -> the checkpoint to load.

    Raises:
        ValueError: an explicit path that is not a checkpoint folder.
    """
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("resume_from_checkpoint latest: no checkpoint in %s, starting from scratch", output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "training_state.json").is_file():
        raise ValueError(f"resume_from_checkpoint {resume!r} is not a checkpoint folder (no training_state.json)")
    return path


def check_resume(path: Path, config, rank: int, is_main: bool) -> None:
    """Before anything loads: the checkpoint's run must have had the same training flags (else ``ValueError``
    listing them, unless ``--allow_config_change``: then the change is appended to
    ``training_config_history.jsonl``), every file must match the checkpoint's manifest (``ValueError`` naming the
    missing or corrupt file), and a run that uses the global RNG (LoRA dropout) needs its RNG states.
    """
    stored_path, changed = Path(path) / CONFIG_NAME, {}
    if stored_path.is_file():
        stored, now = json.loads(stored_path.read_text()), config.resolved()
        changed = {k: [stored.get(k), now.get(k)] for k in sorted(set(stored) | set(now))
                   if k not in RESUME_MAY_CHANGE and stored.get(k) != now.get(k)}  # fmt: skip
        if changed and not config.output.allow_config_change:
            raise ValueError(
                f"resuming from {path} with different training flags {changed} (checkpoint, now); pass the "
                "checkpoint's values, or --allow_config_change to resume anyway (exactness is then lost)"
            )
    else:
        logger.warning("checkpoint %s stores no training config; flags cannot be compared", path)
    states = Path(path) / f"random_states_{rank}.pkl"
    if config.model.lora_dropout > 0 and (not states.is_file() or states.stat().st_size == 0):
        raise ValueError(
            f"checkpoint file {states} is missing or empty: the RNG state that LoRA dropout draws from cannot be "
            "restored, so the resumed run would not be exact; restore the file or resume from another checkpoint"
        )
    if not verify_manifest(path):
        logger.warning("checkpoint %s has no manifest (written by an older version): its files cannot be verified",
                       path)  # fmt: skip
    if changed and is_main:  # only once every check has passed: the history lists resumes that happened
        logger.warning("resuming from %s with changed flags %s (--allow_config_change)", path, changed)
        history = Path(config.output.output_dir) / "training_config_history.jsonl"
        with open(history, "a", encoding="utf-8") as f:
            f.write(json.dumps({"resumed_from": str(path), "changed": changed}) + "\n")


def load_checkpoint(accelerator, path: Path) -> tuple[int, float]:
    """Loads accelerate state + weights from ``path``; returns its ``global_step`` and ``train_seconds``."""
    accelerator.load_state(str(path))
    step = int(json.loads((path / "training_state.json").read_text())["global_step"])
    return step, train_seconds(path)


def train_seconds(path: Path) -> float:
    """The loop's wall time up to checkpoint ``path`` (0 for checkpoints written before it was recorded)."""
    timing = Path(path) / "train_time.json"
    return float(json.loads(timing.read_text())["train_seconds"]) if timing.is_file() else 0.0
