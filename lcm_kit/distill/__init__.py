"""The training side: distil a frozen SD or SDXL teacher into an LCM-LoRA or a full LCM (``train/distill_lora.py``).

Files in the order the data flows through them:

* :mod:`~lcm_kit.distill.config` -- the run config, one frozen dataclass tree (model, data, objective, optim,
  output) parsed from the command line;
* :mod:`~lcm_kit.distill.setup` -- the accelerator, the data loader (images or the latent cache), the optimizer;
* :mod:`~lcm_kit.distill.networks` -- teacher / student / target for the ``lora`` and ``full`` layouts, and the
  plain functions an objective calls;
* :mod:`~lcm_kit.distill.objectives` -- the ``Objective`` protocol and its implementations (``lcm``): a new loss
  goes here;
* :mod:`~lcm_kit.distill.loop` -- the accelerate loop (exact resume, EMA, NaN guard, validation hooks) and
  :func:`run`;
* :mod:`~lcm_kit.distill.checkpoints` -- checkpoint save / load / resume resolution;
* :mod:`~lcm_kit.distill.outputs` -- the student's scheduler, LoRA / kohya / full-pipeline files, model card,
  validation grids: a new output format goes here.

Data sources and the latent cache live in :mod:`lcm_kit.data` / :mod:`lcm_kit.latent_cache`, LoRA files in
:mod:`lcm_kit.lora`, the formulas in :mod:`lcm_kit.functional` / :mod:`lcm_kit.loss`.
"""

from .config import ModelConfig, ObjectiveConfig, OptimConfig, OutputConfig, RunConfig, parse_config
from .loop import run

__all__ = ["ModelConfig", "ObjectiveConfig", "OptimConfig", "OutputConfig", "RunConfig", "parse_config", "run"]
