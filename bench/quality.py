"""Quality and speed of the LCM students against the teacher's own samplers, on the built-in emoji teacher.

    python bench/quality.py [--lora_dir [LABEL=]DIR|none ...] [--full_dir [LABEL=]DIR|none ...] [--tcd_gamma 0]
                            [--num_eval 0] [--no_teacher_lcm] [--student_guidance_scale 1]

Same table as the README's main job (lcm_kit.compare) with wall time per image: teacher DDIM-50 with CFG is the
reference; teacher DDIM-4 and DPM-Solver++-4 (CFG) are its own few-step samplers; "teacher + LCM sampler" is the
teacher UNet with no distillation in LCMPipeline at guidance 1 (1, 2, 4 steps, and TCD gamma=0 at 2 and 4 steps):
the baseline a student has to beat (also sampled with every gamma a student's contract uses). The LCM-LoRA (no CFG)
and the full students (w-embedding; a ct student: CFG, or none at ``--student_guidance_scale 1``) run 1, 2 and
4 steps with their sampling contract (by default the students committed under ``models/``: the main job's LoRA,
seeds 0 and 1; the full LCM and the 4-phase PCM), and with
``--tcd_gamma G`` also 2 and 4 steps of TCD sampling. All from the same initial noise; FID-emoji / KID-emoji
(seeded KID) against the held-out real images.
Wall times are of one batched call over all prompts, to latents: the median of --repeats rounds, each round calling
every method once in a rotated order (lcm_kit.compare.time_interleaved); speed-up is relative to DDIM-50.

Several trained students of one recipe (e.g. seeds): repeat ``--lora_dir`` (or ``--full_dir``), optionally
labelled ``LABEL=DIR`` (default label: the folder name). Their rows carry the label, and a second table gives the
mean and range (min-max) of latent MSE and FID-emoji per configuration and step count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def labelled_folders(values: list[str] | None, default: list[str], flag: str) -> dict[str, str]:
    """``{label: folder}`` from repeated ``[LABEL=]DIR`` values (``none`` values skipped; no value: ``default``).

    Raises:
        ValueError: Naming ``flag`` if two folders get the same label.
    """
    out: dict[str, str] = {}
    for value in values or default:
        if value == "none":
            continue
        label, sep, folder = value.partition("=")
        label, folder = (label, folder) if sep else (Path(value).name, value)
        if label in out:
            raise ValueError(f"{flag}: two folders are labelled {label!r}; name them {flag} LABEL=DIR")
        out[label] = folder
    return out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(ROOT / "models" / "tiny-emoji-sd"))
    p.add_argument("--data_dir", default=str(ROOT / "data" / "emoji32"))
    p.add_argument(
        "--lora_dir",
        action="append",
        help="LCM-LoRA folder, [LABEL=]DIR, repeatable ('none': skip); default: the two committed seeds of the README "
        "main job's recipe",
    )
    p.add_argument(
        "--full_dir",
        action="append",
        help="full LCM pipeline folder, [LABEL=]DIR, repeatable ('none': skip); default: the committed LCM and PCM",
    )
    p.add_argument("--num_eval", type=int, default=0, help="held-out prompts (0: all)")
    p.add_argument("--guidance_scale", type=float, default=5.0, help="teacher CFG scale (DDIM-50 reference)")
    p.add_argument(
        "--student_guidance_scale",
        type=float,
        default=None,
        help="guidance of the full students (w-embedding, or CFG for a plain UNet such as a ct student; 1: none); "
        "default: --guidance_scale",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise, LCM re-noising and KID subsets")
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
    p.add_argument("--no_teacher_lcm", action="store_true", help="leave out the teacher + LCM sampler rows")
    args = p.parse_args(argv)
    from lcm_kit import compare as C
    from lcm_kit.emoji import held_out, load_feature_net

    models = ROOT / "models"
    default_loras = [f"seed0={models / 'tiny-emoji-lcm-lora'}", f"seed1={models / 'tiny-emoji-lcm-lora-seed1'}"]
    loras = labelled_folders(args.lora_dir, default_loras, "--lora_dir")
    fulls = labelled_folders(args.full_dir, [f"lcm={models / 'tiny-emoji-lcm'}", f"pcm={models / 'tiny-emoji-pcm'}"],
                             "--full_dir")  # fmt: skip
    prompts, real = held_out(args.data_dir, args.num_eval or None)
    runs = C.run_comparison(args.teacher, prompts, real, load_feature_net(), loras, fulls, args.guidance_scale,
                            lcm_guidance_scale=args.student_guidance_scale, seed=args.seed, repeats=args.repeats,
                            tcd_gammas=args.tcd_gamma, teacher_lcm=not args.no_teacher_lcm)  # fmt: skip
    table = C.format_table(runs, "DDIM-50")
    summary = C.format_summary(runs)
    print(" ".join(["python", "bench/quality.py", *(argv if argv is not None else sys.argv[1:])]))
    print(table)
    if summary:
        print(f"\nMean (min-max) over the trained students of each configuration:\n{summary}")
    return table + ("\n\n" + summary if summary else "")


if __name__ == "__main__":
    main()
