"""Train a tiny, text-conditioned Stable-Diffusion-format teacher on rendered emoji, on a CPU.

Nothing here can download Stable Diffusion, so the project ships its own SD1.5-shaped teacher: the same classes
(`AutoencoderKL`, `CLIPTextModel` + `CLIPTokenizer`, `UNet2DConditionModel`), the same noise schedule (scaled_linear,
beta 0.00085 -> 0.012, 1000 steps, epsilon prediction) and the same folder layout, loadable with
`StableDiffusionPipeline.from_pretrained`. Only the sizes differ.

Design choices (2 CPU cores, about an hour):
    * 32 px images and an f4 VAE (4 latent channels, 8x8 latents). An f8 VAE at 64 px measured ~8 s per step here
      (too slow to train in minutes); at 32 px an f4 VAE reaches ~21 dB in ~25 minutes and gives the UNet the same 8x8
      latent grid SD1.5 would see for a 64 px image.
    * UNet blocks (64, 96, 128), cross-attention at the two higher resolutions, 4.8 M parameters; a 3-layer,
      128-wide CLIP text encoder over a 4,514-token truncated CLIP BPE vocabulary, trained jointly with the UNet.
      The saved folder stays under 30 MB in float32 safetensors.
    * Phase 1 trains the VAE (L1 + MSE + 1e-6 KL); phase 2 caches its posteriors, sets ``scaling_factor`` to
      1 / std of the latents (SD's 0.18215 plays the same role) and trains UNet + text encoder with 10% caption
      dropout (for classifier-free guidance), Min-SNR-5 loss weighting, an EMA of the weights (saved), and a cosine
      learning rate annealed over the wall-clock budget.
    * Both phases checkpoint to ``work_dir`` (safetensors, atomic) every ``ckpt_minutes``; rerunning the same
      command resumes. Losses go to ``work_dir/loss.csv``. Budgets are wall-clock, so runs are not bit-exact.
    * On a shared CPU run with ``OMP_WAIT_POLICY=PASSIVE``: with other processes busy, the default spinning OpenMP
      threads made a 2-thread VAE step ~4x slower (9 s vs 2.3 s) here.

Example (see models/tiny-emoji-sd/README.md for the command that built the committed teacher)::

    python -m lcm_kit.emoji --out data/emoji32 --size 32
    python examples/teacher/train_teacher.py --data_dir data/emoji32 --tokenizer models/tiny-emoji-sd/tokenizer \
        --output_dir models/tiny-emoji-sd --work_dir runs/teacher --max_minutes 97
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lcm_kit.atomic import save_safetensors
from lcm_kit.emoji import read_split


@dataclass(frozen=True)
class Args:
    data_dir: str = field(default="data/emoji32", metadata={"help": "imagefolder from `python -m lcm_kit.emoji`"})
    tokenizer: str = field(default="models/tiny-emoji-sd/tokenizer", metadata={"help": "CLIPTokenizer folder"})
    output_dir: str = field(default="models/tiny-emoji-sd", metadata={"help": "where the SD folder is saved"})
    work_dir: str = field(default="runs/teacher", metadata={"help": "checkpoints and loss.csv"})
    resolution: int = field(default=32, metadata={"help": "image side in pixels"})
    seed: int = field(default=0, metadata={"help": "seed of init, batches and noise"})
    max_minutes: float = field(default=97.0, metadata={"help": "wall-clock budget for both phases"})
    vae_minutes: float = field(default=26.0, metadata={"help": "wall-clock budget of the VAE phase"})
    vae_steps: int = field(default=100_000, metadata={"help": "max VAE steps"})
    unet_steps: int = field(default=100_000, metadata={"help": "max UNet steps"})
    vae_batch: int = field(default=16, metadata={"help": "VAE batch size"})
    unet_batch: int = field(default=32, metadata={"help": "UNet batch size"})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE peak learning rate"})
    unet_lr: float = field(default=8e-4, metadata={"help": "UNet + text encoder peak learning rate"})
    caption_dropout: float = field(default=0.1, metadata={"help": "probability of training on the empty prompt"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of UNet + text encoder"})
    ckpt_minutes: float = field(default=4.0, metadata={"help": "checkpoint interval"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})

    def __post_init__(self) -> None:
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.vae_minutes >= self.max_minutes:
            raise ValueError(f"vae_minutes ({self.vae_minutes}) must be < max_minutes ({self.max_minutes})")


def parse_args(argv: list[str] | None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(Args):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f.metadata["help"])
    return Args(**vars(parser.parse_args(argv)))


def build_models(vocab_size: int, bos: int, eos: int) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    """The tiny SD1.5-shaped trio (VAE f4 / 4 channels, CLIP text encoder, cross-attention UNet)."""
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, sample_size=32,
    )  # fmt: skip
    text_config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(64, 96, 128), layers_per_block=1, cross_attention_dim=128,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    )  # fmt: skip
    return vae, CLIPTextModel(text_config), unet


def load_split(data_dir: str, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Train images as a float tensor in [-1, 1], shape (N, 3, H, W), and their captions."""
    rows, arrays = read_split(data_dir, "train"), []
    for r in rows:
        image = r.image()
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.LANCZOS)
        arrays.append(np.asarray(image))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, [r.text for r in rows]


def pack(modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Flatten module weights and AdamW state into one safetensors dict."""
    out = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    for idx, state in opt.state_dict()["state"].items():
        out.update({f"opt.{idx}.{k}": torch.as_tensor(v) for k, v in state.items()})
    return out


def unpack(path: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer) -> dict:
    """Inverse of `pack`; returns the checkpoint's meta dict."""
    tensors = load_file(str(path))
    for name, m in modules.items():
        m.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["meta"])


def lr_at(base: float, step: int, progress: float, warmup: int = 100) -> float:
    """Linear warmup, then cosine from ``base`` to ``base / 10`` over ``progress`` in [0, 1]."""
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


class Logger:
    def __init__(self, work_dir: Path) -> None:
        self.path = work_dir / "loss.csv"

    def __call__(self, phase: str, step: int, elapsed: float, loss: float, lr: float) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([phase, step, round(elapsed, 1), f"{loss:.5f}", f"{lr:.2e}"])
        print(f"[{phase}] step {step} {elapsed / 60:.1f} min loss {loss:.4f} lr {lr:.1e}", flush=True)


def run_phase(name, args, modules, params, loss_fn, budget_s, max_steps, lr, log, on_step=None) -> dict:
    """Generic resumable loop: AdamW, grad clip 1.0, time-annealed LR, periodic atomic checkpoints."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ckpt = Path(args.work_dir) / f"{name}.safetensors"
    meta = unpack(ckpt, modules, opt) if ckpt.exists() else {"step": 0, "elapsed": 0.0, "done": False}
    start, last_ckpt, running = time.time() - meta["elapsed"], time.time(), []
    while not meta["done"]:
        meta["elapsed"] = time.time() - start
        progress = max(meta["step"] / max_steps, meta["elapsed"] / budget_s)
        meta["done"] = progress >= 1.0
        if not meta["done"]:
            cur_lr = lr_at(lr, meta["step"], progress)
            for g in opt.param_groups:
                g["lr"] = cur_lr
            loss = loss_fn(meta["step"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if on_step is not None:
                on_step(meta["step"])
            running.append(loss.item())
            meta["step"] += 1
            if meta["step"] % 50 == 0:
                log(name, meta["step"], meta["elapsed"], sum(running) / len(running), cur_lr)
                meta["last_loss"], running = sum(running) / len(running), []
        if meta["done"] or time.time() - last_ckpt > args.ckpt_minutes * 60:
            save_safetensors(pack(modules, opt), ckpt, {"meta": json.dumps(meta)})  # atomic, JSON meta entry
            last_ckpt = time.time()
    return meta


def train_vae(args: Args, vae: AutoencoderKL, pixels: torch.Tensor, log: Logger) -> dict:
    """Phase 1: the VAE alone, L1 + MSE reconstruction + 1e-6 KL."""
    gen = torch.Generator().manual_seed(args.seed)

    def loss_fn(step: int) -> torch.Tensor:
        x = pixels[torch.randint(len(pixels), (args.vae_batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()

    return run_phase("vae", args, {"vae": vae}, list(vae.parameters()), loss_fn, args.vae_minutes * 60, args.vae_steps,
                     args.vae_lr, log)  # fmt: skip


@torch.no_grad()
def cache_posteriors(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, shape (N, 4, h, w) each; sets ``vae.config.scaling_factor``."""
    dists = [vae.encode(chunk).latent_dist for chunk in pixels.split(256)]
    mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    sampled = mean + std * torch.randn_like(std)
    vae.register_to_config(scaling_factor=round(1.0 / sampled.std().item(), 5))
    return mean, std


def train_unet(args, unet, text_encoder, tokenizer, latents, captions, scaling_factor, log) -> tuple[dict, dict]:
    """Phase 2: UNet + text encoder on cached VAE posteriors; returns (meta, EMA copies)."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    snr = noise_scheduler.alphas_cumprod / (1 - noise_scheduler.alphas_cumprod)
    weight = snr.clamp(max=5.0) / snr  # Min-SNR-5 for epsilon prediction (Hang et al. 2023, eq. 8)
    tok = lambda texts: tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")  # noqa: E731
    ids, empty = tok(captions).input_ids, tok([""]).input_ids
    mean, std = latents
    ema = {"unet": copy.deepcopy(unet).requires_grad_(False), "text_encoder": copy.deepcopy(text_encoder)}
    ema["text_encoder"].requires_grad_(False)
    params = [p for m in (unet, text_encoder) for p in m.parameters()]

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(len(mean), (args.unet_batch,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling_factor
        batch_ids = ids[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < args.caption_dropout
        batch_ids[drop] = empty
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        pred = unet(noisy, t, text_encoder(batch_ids)[0]).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        return (weight[t] * per_sample).mean()

    def ema_update(step: int) -> None:
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, live in (("unet", unet), ("text_encoder", text_encoder)):
                for e, p in zip(ema[name].parameters(), live.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)

    modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema["unet"], "ema_text": ema["text_encoder"]}
    budget = (args.max_minutes - args.vae_minutes) * 60 - 60  # keep a minute to save
    meta = run_phase("unet", args, modules, params, loss_fn, budget, args.unet_steps, args.unet_lr, log, ema_update)
    return meta, ema


def save_teacher(output_dir: str, vae, text_encoder, tokenizer, unet, tokenizer_dir: str) -> None:
    """Save as a diffusers SD folder with SD1.5's PNDM scheduler config (``set_alpha_to_one=False``).

    ``vocab.json`` and ``merges.txt`` are copied next to ``tokenizer.json`` so slow (transformers 4.x) tokenizers load.
    """
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    )  # fmt: skip
    scheduler.register_to_config(set_alpha_to_one=False, clip_sample=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(output_dir, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        if (Path(tokenizer_dir) / name).exists():
            shutil.copyfile(Path(tokenizer_dir) / name, Path(output_dir) / "tokenizer" / name)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "args.json").write_text(json.dumps(vars(args), indent=2))
    log, t0 = Logger(work), time.time()
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer)
    pixels, captions = load_split(args.data_dir, args.resolution)
    vae, text_encoder, unet = build_models(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    vae_meta = train_vae(args, vae, pixels, log)
    vae.eval().requires_grad_(False)
    latents = cache_posteriors(vae, pixels)
    unet_meta, ema = train_unet(args, unet, text_encoder, tokenizer, latents, captions, vae.config.scaling_factor, log)
    save_teacher(args.output_dir, vae, ema["text_encoder"], tokenizer, ema["unet"], args.tokenizer)
    summary = {"vae": vae_meta, "unet": unet_meta, "scaling_factor": vae.config.scaling_factor,
               "params_m": {n: round(sum(p.numel() for p in m.parameters()) / 1e6, 3)
                            for n, m in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet))},
               "wall_minutes_this_run": round((time.time() - t0) / 60, 1)}  # fmt: skip
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
