"""Quality and speed of the LCM students against the teacher's own samplers, on the built-in emoji teacher.

    python bench/quality.py --lora_dir outputs/emoji-lcm-lora [--full_dir outputs/emoji-lcm-full] [--num_eval 0]

Same table as the README's main job (lcm_kit.compare) with wall time per image: teacher DDIM-50 with CFG is the
reference; teacher DDIM-4 and DPM-Solver++-4 (CFG) are its own few-step samplers; the LCM-LoRA (no CFG) and, when
given, the full LCM (w-embedding) run 1, 2 and 4 steps. All from the same initial noise. Wall times are of one
batched call over all prompts (median of --repeats after a warm-up); speed-up is relative to DDIM-50 in the
same run.
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
    p.add_argument("--lora_dir", default=str(ROOT / "outputs" / "emoji-lcm-lora"))
    p.add_argument("--full_dir", default=None)
    p.add_argument("--num_eval", type=int, default=0, help="held-out prompts (0: all)")
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method; the median is reported")
    p.add_argument(
        "--tcd_gamma",
        type=float,
        action="append",
        default=[],
        help="also sample each student at 2 and 4 steps with this TCD gamma (0: deterministic); repeatable",
    )
    args = p.parse_args(argv)
    from lcm_kit import compare as C

    runs, _ = C.run_comparison(args.teacher, args.data_dir, args.lora_dir, args.full_dir, args.num_eval or None,
                               args.guidance_scale, seed=args.seed, repeats=args.repeats,
                               tcd_gammas=args.tcd_gamma)  # fmt: skip
    table = C.format_table(runs, "DDIM-50")
    print(" ".join(["python", "bench/quality.py", *(argv if argv is not None else sys.argv[1:])]))
    print(table)
    return table


if __name__ == "__main__":
    main()
