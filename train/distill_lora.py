"""Latent consistency distillation of a Stable Diffusion 1.x/2.x or SDXL teacher: LCM-LoRA (default) or a full LCM.

    accelerate launch train/distill_lora.py --pretrained_teacher_model PATH --train_data_dir DIR --output_dir OUT

``--mode lora``: one UNet in memory, the LoRA adapter is the student, the teacher is the same UNet with the adapter
off (``lcm_kit.lora.teacher_mode``), the target is the adapted UNet without gradients (no EMA), as diffusers'
LCM-LoRA scripts. ``--mode full``: a student UNet with a guidance embedding, initialised from the teacher, plus an
EMA target network. Defaults follow diffusers' reference LCM scripts (see each flag's help). ``--dry_run``
validates everything, loads the models and one batch, prints the plan and trains nothing. An SDXL teacher (its UNet
has ``addition_embed_type="text_time"``) is found from its folder: both text encoders, pooled embeddings and size /
crop ids, zeroed unconditional text, 1024 px and w_min 3 by default (:mod:`lcm_kit.conditioning`). The flags are
the fields
of ``lcm_kit.distill.config``; the work is ``lcm_kit.distill.run``.
"""

from __future__ import annotations

import logging
import sys

from lcm_kit.distill import parse_config, run


def main(argv: list[str] | None = None) -> int:
    """Entry point (also called in-process by tests). Returns 0; raises ``ValueError`` on bad input."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(parse_config(argv, description=__doc__.splitlines()[0]))


if __name__ == "__main__":
    sys.exit(main())
