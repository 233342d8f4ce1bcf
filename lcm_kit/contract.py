"""The sampling contract: how a distilled student must be sampled, stored with the student.

A trained LCM-LoRA or full LCM records which objective made it, its default number of steps (or the fixed timesteps
of a phased student), the ``LCMKitScheduler`` values it learned (solver grid, boundary scalings, TCD ``gamma``) and
the guidance range ``w`` it was distilled for. :mod:`lcm_kit.distill` writes it into the LoRA file's safetensors
metadata (key :data:`METADATA_KEY`), into the full pipeline's ``scheduler/scheduler_config.json`` and into the model
card; :class:`lcm_kit.LCMPipeline` applies it when the student is loaded, unless the caller overrides it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffusers.loaders import StableDiffusionLoraLoaderMixin

logger = logging.getLogger(__name__)
METADATA_KEY = "lcm_kit.sampling"
CONFIG_KEY = "sampling_contract"  # the scheduler-config key of a full pipeline folder
SCHEDULER_KEYS = ("original_inference_steps", "timestep_scaling", "sigma_data", "prediction_type", "gamma")


@dataclass(frozen=True)
class SamplingContract:
    """How a distilled student samples.

    Attributes:
        objective: ``"lcm"``, ``"pcm"``, ``"tcd"`` or ``"ct"``.
        num_inference_steps: Default number of steps.
        timesteps: A fixed descending schedule (phased students), or ``None`` (any number of steps).
        scheduler: ``LCMKitScheduler`` config values (keys in :data:`SCHEDULER_KEYS`).
        w_range: ``(w_min, w_max)`` guidance it was distilled for, LCM convention (``guidance_scale - 1``);
            ``None`` for a student trained without a guided teacher (``ct``: sample it with CFG).
    """

    objective: str
    num_inference_steps: int
    timesteps: tuple[int, ...] | None
    scheduler: dict[str, Any] = field(default_factory=dict)
    w_range: tuple[float, float] | None = None

    def __post_init__(self):
        unknown = set(self.scheduler) - set(SCHEDULER_KEYS)
        if unknown:
            raise ValueError(f"sampling contract: unknown scheduler keys {sorted(unknown)}")
        if self.timesteps is not None and len(self.timesteps) != self.num_inference_steps:
            raise ValueError(
                f"sampling contract: {len(self.timesteps)} timesteps but {self.num_inference_steps} steps"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.to_json())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingContract:
        """The inverse of :meth:`to_dict` (``ValueError`` on anything else)."""
        try:
            ts, wr = d.get("timesteps"), d.get("w_range")
            return cls(d["objective"], int(d["num_inference_steps"]), tuple(ts) if ts is not None else None,
                       dict(d.get("scheduler", {})), tuple(wr) if wr is not None else None)  # fmt: skip
        except (AttributeError, KeyError, TypeError) as err:
            raise ValueError(f"not a sampling contract: {str(d)[:200]} ({err!r})") from err

    @classmethod
    def from_json(cls, text: str) -> SamplingContract:
        """Parses :meth:`to_json` output (``ValueError`` on anything else)."""
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise ValueError(f"not a sampling contract: {text[:200]!r} ({err})") from err

    def as_metadata(self) -> dict[str, str]:
        """The safetensors metadata entry of a LoRA file."""
        return {METADATA_KEY: self.to_json()}


def read_lora_contract(path: str | os.PathLike) -> SamplingContract | None:
    """The contract in a LoRA safetensors file's metadata, or ``None`` (older files, other tools' LoRAs)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get(METADATA_KEY)
    return SamplingContract.from_json(text) if text else None


def find_lora_file(source: Any, weight_name: str | None = None) -> Path | None:
    """The local safetensors file ``load_lora_weights(source, weight_name=...)`` reads, if it is one (else None)."""
    if not isinstance(source, (str, os.PathLike)):
        return None  # a state dict
    path = Path(source)
    if path.is_file():
        return path
    from .lora import LORA_WEIGHT_NAME

    candidate = path / (weight_name or LORA_WEIGHT_NAME)
    return candidate if candidate.is_file() else None


def call_schedule(scheduler: Any, num_inference_steps: int | None, timesteps: list[int] | None):
    """``(num_inference_steps, timesteps)`` of a pipeline call: explicit arguments win; else the sampling contract in
    ``scheduler.config`` (a distilled student's default steps or fixed schedule); else 4 steps."""
    if num_inference_steps is not None or timesteps is not None:
        return (4 if num_inference_steps is None else num_inference_steps), timesteps
    stored = getattr(scheduler.config, CONFIG_KEY, None)
    if not stored:
        return 4, None
    contract = SamplingContract.from_dict(stored)
    return contract.num_inference_steps, (list(contract.timesteps) if contract.timesteps is not None else None)


class ContractLoading:
    """Adds the sampling contract to a diffusers LoRA loader mixin listed after it: a LoRA file written by the
    distiller carries one in its metadata, and loading it sets the pipeline's ``LCMKitScheduler`` to the contract's
    values (grid, boundary scalings, ``gamma``) and default steps. Assign ``pipe.scheduler`` or pass
    ``num_inference_steps`` / ``timesteps`` afterwards to override it; :meth:`unload_lora_weights` restores the
    scheduler of before. Only local files and folders are read for a contract (a hub id or a state dict loads
    without one)."""

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, *args: Any, **kwargs: Any) -> None:
        super().load_lora_weights(pretrained_model_name_or_path_or_dict, *args, **kwargs)
        path = find_lora_file(pretrained_model_name_or_path_or_dict, kwargs.get("weight_name"))
        contract = read_lora_contract(path) if path is not None and path.suffix == ".safetensors" else None
        if contract is None:
            return
        from .scheduler import LCMKitScheduler

        if getattr(self, "_scheduler_before_contract", None) is None:
            self._scheduler_before_contract = self.scheduler
        self.scheduler = LCMKitScheduler.from_config(self.scheduler.config, **contract.scheduler,
                                                     sampling_contract=contract.to_dict())  # fmt: skip
        logger.info("applied the sampling contract of %s: %s", path, contract)

    def unload_lora_weights(self, *args: Any, **kwargs: Any) -> None:
        super().unload_lora_weights(*args, **kwargs)
        if getattr(self, "_scheduler_before_contract", None) is not None:
            self.scheduler, self._scheduler_before_contract = self._scheduler_before_contract, None


class ContractLoraLoaderMixin(ContractLoading, StableDiffusionLoraLoaderMixin):
    """diffusers' SD LoRA loading plus the sampling contract (:class:`ContractLoading`); ``LCMXLPipeline`` puts
    :class:`ContractLoading` before ``StableDiffusionXLPipeline``'s SDXL loader the same way."""

