"""Evaluate the tiny teacher on held-out prompts: FID-emoji / KID-emoji, few-step agreement, skin-tone check.

* FID-emoji / KID-emoji (`lcm_kit.eval.feature_fid_kid`, features of models/emoji-features) of DDIM-50 samples
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
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from lcm_kit.eval import feature_fid_kid, latent_mse, load_feature_net, pixel_psnr, to_unit_tensor

SKIN_PROMPTS = ("thumbs up", "waving hand", "raised fist", "person running", "woman", "man")


def sample(pipe, prompts: list[str], noise: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    """Final latents (scaled, as the UNet sees them) for ``prompts`` from the given initial noise."""
    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "latent"}
    return pipe(prompts, latents=noise.clone(), **kwargs).images


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images (N, 3, H, W) in [0, 1]."""
    return (pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


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
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    root = Path(args.data_dir) / "test"
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    prompts = [r["text"] for r in rows]
    real = to_unit_tensor([Image.open(root / r["file_name"]) for r in rows])
    side = pipe.unet.config.sample_size
    noise = torch.randn(len(prompts), 4, side, side, generator=torch.Generator().manual_seed(args.seed))

    ref_latents = sample(pipe, prompts, noise, 50, args.guidance)
    ref_images = decode(pipe, ref_latents)
    results: dict = {"guidance_scale": args.guidance, "num_prompts": len(prompts)}
    results["ddim50_vs_real"] = feature_fid_kid(real, ref_images, load_feature_net())
    n = args.agreement_prompts
    for k in (1, 2, 4, 8):
        latents = sample(pipe, prompts[:n], noise[:n], k, args.guidance)
        results[f"ddim{k}_vs_ddim50"] = {
            "latent_mse": latent_mse(latents, ref_latents[:n]),
            "pixel_psnr_db": pixel_psnr(decode(pipe, latents), ref_images[:n]),
        }
    skin_noise = noise[:1].expand(len(SKIN_PROMPTS), -1, -1, -1)
    light = decode(pipe, sample(pipe, [f"{p}: light skin tone" for p in SKIN_PROMPTS], skin_noise, 50, args.guidance))
    dark = decode(pipe, sample(pipe, [f"{p}: dark skin tone" for p in SKIN_PROMPTS], skin_noise, 50, args.guidance))
    gaps = (light.mean(dim=(1, 2, 3)) - dark.mean(dim=(1, 2, 3))) * 255
    gap = {"mean": float(gaps.mean()), "positive": int((gaps > 0).sum()), "of": len(gaps)}
    results["skin_tone_brightness_gap"] = gap
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
