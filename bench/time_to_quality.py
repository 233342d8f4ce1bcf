"""Time to quality: training wall time until each objective's student first reaches a FID-emoji at 4 steps.

    python bench/time_to_quality.py                                   # lcm, pcm, tcd; LoRA; 50-step chunks to 400
    python bench/time_to_quality.py --mode full --target_fid 8 --objectives lcm tcd

The objectives are interleaved: in round r every objective not yet at the target trains its next ``--chunk`` steps
(``train/distill_lora.py`` resumed from its own checkpoint, order rotated each round), then its checkpoint is
sampled with its sampling contract (4 steps; a phased student on its 4 phase edges) on ``--num_eval`` held-out
prompts and scored with FID-emoji against the held-out real images. Training time is the loop's own wall time
recorded in the checkpoint (``train_time.json``: steps, not model loading or the evaluations). All objectives get
the same recipe (``--distill_args``), the teacher and the data of the README main job.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# --cache_dtype fp32: the committed figures were measured from an fp32 cache (before fp16 became the default)
RECIPE = ("--train_batch_size 32 --lora_rank 16 --learning_rate 1e-4 --lr_warmup_steps 20 --w_min 4 --w_max 4 "
          "--validation_steps 0 --report_to none --mixed_precision no --center_crop true "
          "--cache_dtype fp32")  # fmt: skip


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objectives", nargs="+", default=["lcm", "pcm", "tcd"], choices=["lcm", "pcm", "tcd"])
    p.add_argument("--mode", default="lora", choices=["lora", "full"])
    p.add_argument("--teacher", default=str(ROOT / "models" / "tiny-emoji-sd"))
    p.add_argument("--data_dir", default=str(ROOT / "data" / "emoji32"))
    p.add_argument("--output_dir", default=str(ROOT / "outputs" / "time-to-quality"))
    p.add_argument("--chunk", type=int, default=50, help="steps each objective trains per round")
    p.add_argument("--max_steps", type=int, default=400)
    p.add_argument("--target_fid", type=float, default=12.0, help="FID-emoji at 4 steps to reach")
    p.add_argument("--num_eval", type=int, default=190, help="held-out prompts sampled per evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distill_args", default=RECIPE, help="the shared recipe (train/distill_lora.py flags)")
    args = p.parse_args(argv)
    if args.chunk < 1 or args.max_steps < args.chunk:
        raise ValueError(f"need 1 <= --chunk <= --max_steps, got {args.chunk}, {args.max_steps}")
    return args


def distill_argv(args, objective: str, steps: int) -> list[str]:
    from lcm_kit.loading import native_resolution

    out = Path(args.output_dir) / objective
    return [
        "--pretrained_teacher_model", args.teacher, "--train_data_dir", str(Path(args.data_dir) / "train"),
        "--cache_dir", str(Path(args.data_dir) / "cache"), "--output_dir", str(out), "--mode", args.mode,
        "--objective", objective, "--num_phases", "4", "--max_train_steps", str(steps), "--checkpointing_steps",
        str(args.chunk), "--resume_from_checkpoint", "latest", "--seed", str(args.seed),
        "--resolution", str(native_resolution(args.teacher)),
        *shlex.split(args.distill_args),
    ]  # fmt: skip


def student_pipeline(args, objective: str, ckpt: Path):
    """An ``LCMPipeline`` of the checkpoint's student with its contract's scheduler, and the call's step args."""
    from diffusers import UNet2DConditionModel

    from lcm_kit.distill import parse_config
    from lcm_kit.distill.objectives import make_objective
    from lcm_kit.pipeline import LCMPipeline
    from lcm_kit.scheduler import LCMKitScheduler

    pipe = LCMPipeline.from_pretrained(args.teacher)
    cfg = parse_config(distill_argv(args, objective, args.max_steps))
    objective_cfg = cfg.with_prediction_type(pipe.scheduler.config.prediction_type).objective
    contract = make_objective(objective_cfg, pipe.scheduler.alphas_cumprod).sampling()
    if args.mode == "lora":
        pipe.load_lora_weights(str(ckpt))
        pipe.fuse_lora()
    else:
        pipe.unet = UNet2DConditionModel.from_pretrained(ckpt / "unet_target")
    pipe.scheduler = LCMKitScheduler.from_config(pipe.scheduler.config, **contract.scheduler)
    steps = {"timesteps": list(contract.timesteps)} if contract.timesteps else {"num_inference_steps": 4}
    return pipe, steps


def evaluate(args, objective: str, ckpt: Path, prompts, real, noise, net) -> float:
    import torch

    from lcm_kit.compare import _decode
    from lcm_kit.emoji import feature_fid_kid

    pipe, steps = student_pipeline(args, objective, ckpt)
    pipe.set_progress_bar_config(disable=True)
    guidance = 1.0 if args.mode == "lora" else 5.0
    latents = pipe(list(prompts), guidance_scale=guidance, latents=noise.clone(), output_type="latent",
                   generator=torch.Generator().manual_seed(args.seed), **steps).images  # fmt: skip
    return feature_fid_kid(real, _decode(pipe.vae, latents), net)["fid_emoji"]


def main(argv=None) -> list[dict]:
    from lcm_kit import compare as C
    from lcm_kit.distill.checkpoints import train_seconds
    from lcm_kit.emoji import held_out, load_feature_net

    args = parse_args(argv)
    prompts, real = held_out(args.data_dir, args.num_eval)
    unet = json.loads((Path(args.teacher) / "unet" / "config.json").read_text())
    noise = C.initial_noise(len(prompts), (unet["in_channels"], unet["sample_size"], unet["sample_size"]), args.seed)
    net, rows, reached = load_feature_net(), [], {}
    script = ROOT / "train" / "distill_lora.py"
    for r, steps in enumerate(range(args.chunk, args.max_steps + 1, args.chunk)):
        todo = [o for o in args.objectives if o not in reached]
        for objective in todo[r % len(todo):] + todo[: r % len(todo)] if todo else []:
            subprocess.run([sys.executable, str(script), *distill_argv(args, objective, steps)], check=True,
                           cwd=ROOT, stdout=subprocess.DEVNULL)  # fmt: skip
            ckpt = Path(args.output_dir) / objective / f"checkpoint-{steps}"
            fid = evaluate(args, objective, ckpt, prompts, real, noise, net)
            rows.append({"objective": objective, "steps": steps, "train_s": train_seconds(ckpt), "fid": fid})
            print(json.dumps(rows[-1]), flush=True)
            if fid <= args.target_fid:
                reached[objective] = rows[-1]
    print("\n| objective | target FID-emoji (4 steps) | steps to target | train time to target | best FID |\n"
          "|---|---|---|---|---|")
    for o in args.objectives:
        best = min((x["fid"] for x in rows if x["objective"] == o), default=float("nan"))
        hit = reached.get(o)
        when = (f"{hit['steps']} | {hit['train_s']:.0f} s" if hit else f"not reached in {args.max_steps} | -")
        print(f"| {o} | {args.target_fid:g} | {when} | {best:.2f} |")
    return rows


if __name__ == "__main__":
    main()
