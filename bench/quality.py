"""Quality and speed of the LCM students against the teacher's own samplers, on the built-in emoji teacher.

    python bench/quality.py [--lora_dir DIR|none] [--full_dir DIR|none] [--tcd_gamma 0] [--num_eval 0]

Same table as the README's main job (lcm_kit.compare) with wall time per image: teacher DDIM-50 with CFG is the
reference; teacher DDIM-4 and DPM-Solver++-4 (CFG) are its own few-step samplers; the LCM-LoRA (no CFG) and the
full LCM (w-embedding) run 1, 2 and 4 steps (by default the two students committed under ``models/``), and with
``--tcd_gamma G`` also 2 and 4 steps of TCD sampling. All from the same initial noise. Wall times are of one
batched call over all prompts, to latents: the median of --repeats rounds, each round calling every method once in
a rotated order (lcm_kit.compare.time_interleaved); speed-up is relative to DDIM-50 in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(ROOT / "models" / "tiny-emoji-sd"))
    p.add_argument("--data_dir", default=str(ROOT / "data" / "emoji32"))
    p.add_argument(
        "--lora_dir",
        default=str(ROOT / "models" / "tiny-emoji-lcm-lora"),
        help="LCM-LoRA folder ('none': skip); default: the committed one (the README main job's recipe)",
    )
    p.add_argument(
        "--full_dir",
        default=str(ROOT / "models" / "tiny-emoji-lcm"),
        help="full LCM pipeline folder ('none': skip); default: the committed one",
    )
    p.add_argument("--num_eval", type=int, default=0, help="held-out prompts (0: all)")
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeats", type=int, default=3, help="timing rounds (every method once per round); the median is reported"
    )
    p.add_argument(
        "--tcd_gamma",
        type=float,
        action="append",
        default=[],
        help="also sample each student at 2 and 4 steps with this TCD gamma (0: deterministic); repeatable",
    )
    args = p.parse_args(argv)
    from lcm_kit import compare as C

    lora_dir, full_dir = (None if d == "none" else d for d in (args.lora_dir, args.full_dir))
    runs, _ = C.run_comparison(args.teacher, args.data_dir, lora_dir, full_dir, args.num_eval or None,
                               args.guidance_scale, seed=args.seed, repeats=args.repeats,
                               tcd_gammas=args.tcd_gamma)  # fmt: skip
    table = C.format_table(runs, "DDIM-50")
    print(" ".join(["python", "bench/quality.py", *(argv if argv is not None else sys.argv[1:])]))
    print(table)
    return table


if __name__ == "__main__":
    main()
