"""Evaluate the tiny teacher on held-out prompts: FID-emoji / KID-emoji, few-step agreement, skin-tone check.

* FID-emoji / KID-emoji (`lcm_kit.emoji.feature_fid_kid`, features of models/emoji-features) of DDIM-50 samples
  of the held-out captions against the held-out real images. Not Inception-FID; compare only with each other.
* Agreement of DDIM-k with DDIM-50 from the same initial noise and guidance (`latent_mse`, `pixel_psnr` on [0, 1]
  images): the reference numbers a distilled k-step student is compared against.
* Text conditioning: "...: light skin tone" vs "...: dark skin tone" from the same noise; mean brightness gap.

    python examples/teacher/evaluate_teacher.py --model models/tiny-emoji-sd --data_dir data/emoji32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from lcm_kit.compare import run_teacher
from lcm_kit.emoji import feature_fid_kid, held_out, load_feature_net
from lcm_kit.eval import latent_mse, pixel_psnr

SKIN_PROMPTS = ("thumbs up", "waving hand", "raised fist", "person running", "woman", "man")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-emoji-sd")
    parser.add_argument("--data_dir", default="data/emoji32")
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--agreement_prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="optional JSON output path")
    args = parser.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    prompts, real = held_out(args.data_dir)
    side = pipe.unet.config.sample_size
    noise = torch.randn(len(prompts), 4, side, side, generator=torch.Generator().manual_seed(args.seed))

    def ddim(texts: list[str], z: torch.Tensor, steps: int):  # DDIM (eta 0) with CFG from the given noise
        return run_teacher(pipe, texts, z, "ddim", steps, args.guidance)

    ref = ddim(prompts, noise, 50)
    results: dict = {"guidance_scale": args.guidance, "num_prompts": len(prompts)}
    results["ddim50_vs_real"] = feature_fid_kid(real, ref.images, load_feature_net())
    n = args.agreement_prompts
    for k in (1, 2, 4, 8):
        few = ddim(prompts[:n], noise[:n], k)
        results[f"ddim{k}_vs_ddim50"] = {
            "latent_mse": latent_mse(few.latents, ref.latents[:n]),
            "pixel_psnr_db": pixel_psnr(few.images, ref.images[:n]),
        }
    skin_noise = noise[:1].expand(len(SKIN_PROMPTS), -1, -1, -1)
    light = ddim([f"{p}: light skin tone" for p in SKIN_PROMPTS], skin_noise, 50).images
    dark = ddim([f"{p}: dark skin tone" for p in SKIN_PROMPTS], skin_noise, 50).images
    gaps = (light.mean(dim=(1, 2, 3)) - dark.mean(dim=(1, 2, 3))) * 255
    gap = {"mean": float(gaps.mean()), "positive": int((gaps > 0).sum()), "of": len(gaps)}
    results["skin_tone_brightness_gap"] = gap
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
