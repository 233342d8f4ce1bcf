"""How much time ``LCMPipeline`` adds around its model forwards, and how it compares with diffusers' LCM pipeline.

For each model size, on the same randomly initialised components (an LCM UNet with ``time_cond_proj_dim``):

* ``ours``: median wall time of ``LCMPipeline(...)(prompt, num_inference_steps, output_type="pt")`` -- including
  the VAE decode;
* ``diffusers``: the same call of ``diffusers.LatentConsistencyModelPipeline`` (with ``LCMScheduler``);
* ``forwards``: the model forwards timed alone on the same inputs: one text-encoder forward, ``steps`` UNet
  forwards, one VAE decode (none with ``--output_type latent``).

Runs of the three are interleaved (and the two pipelines alternate which goes first) so load changes on a shared
machine hit all of them. Prints the medians and the medians of the per-repeat ratios
``ours / forwards`` (target <= 1.03) and ``ours / diffusers`` (target <= 1.00).

Not part of the test suite (it takes minutes): ``python bench/pipeline_overhead.py --sizes tiny sd15``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import torch

SIZES = {
    # The tiny SD of NOTES.md (UNet 32/64/64/64, 2 M params), 16x16 latents.
    "tiny": dict(unet=(32, 64, 64, 64), latent=16, heads=4, groups=4, cross=16, text=(16, 2, 2, 32), vae=(8, 16)),
    # SD1.5's UNet widths, layers and attention (860 M params, random weights) at 32x32 latents (256 px); CLIP-L
    # sized text encoder (12 x 768); a 4-level VAE of widths 64/128/256/256 (SD's is 128/256/512/512: 4x the cost).
    "sd15": dict(
        unet=(320, 640, 1280, 1280), latent=32, heads=8, groups=32, cross=768, text=(768, 12, 12, 3072),
        vae=(64, 128, 256, 256), layers=2,
    ),  # fmt: skip
}


DEFAULT_REPEATS = {"tiny": 15, "sd15": 3}


def build_components(size: str, seed: int = 0) -> dict:
    """Random-weight SD components of a named size (LCM UNet: ``time_cond_proj_dim=256``)."""
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lcm_kit.testing import write_byte_clip_tokenizer

    s = SIZES[size]
    n = len(s["unet"])
    tokenizer = write_byte_clip_tokenizer(tempfile.mkdtemp(prefix="lcm_kit_bench_tok_"))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=s["latent"], block_out_channels=s["unet"], layers_per_block=s.get("layers", 1),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), cross_attention_dim=s["cross"],
        attention_head_dim=s["heads"], norm_num_groups=s["groups"], time_cond_proj_dim=256,
    )  # fmt: skip
    nv = len(s["vae"])
    vae = AutoencoderKL(
        block_out_channels=s["vae"], down_block_types=("DownEncoderBlock2D",) * nv,
        up_block_types=("UpDecoderBlock2D",) * nv, latent_channels=4, norm_num_groups=min(s["groups"], s["vae"][0]),
        layers_per_block=s.get("layers", 1),
    )  # fmt: skip
    hidden, layers, heads, inter = s["text"]
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=inter, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    scheduler = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False)
    return dict(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
    )  # fmt: skip


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """``(wall, cpu)`` seconds of one call of ``fn`` (CPU time of this process: steadier on a loaded machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def forward_calls(pipe, prompt: str, steps: int, decode: bool) -> dict[str, Callable[[], object]]:
    """The pipeline's model forwards as standalone calls on its own inputs (prompt ids, latents, t, embeddings)."""
    from lcm_kit import functional as F

    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids  # fmt: skip
    embeds = pipe.text_encoder(ids)[0]
    size = pipe.unet.config.sample_size
    latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))
    w_emb = F.guidance_scale_embedding(torch.tensor([7.5]), pipe.unet.config.time_cond_proj_dim)
    t = torch.tensor(999)
    scale = pipe.vae.config.scaling_factor

    def unet_steps():
        for _ in range(steps):
            pipe.unet(latents, t, encoder_hidden_states=embeds, timestep_cond=w_emb, return_dict=False)

    calls = {"text_encoder": lambda: pipe.text_encoder(ids), "unet x steps": unet_steps}
    if decode:
        calls["vae_decode"] = lambda: pipe.vae.decode(latents / scale, return_dict=False)
    return calls


@torch.no_grad()
def bench_size(size: str, steps: int, repeats: int, prompt: str, output_type: str) -> dict[str, dict[str, float]]:
    """Builds the components, warms up with one run of ``ours`` (every module on the same shapes), then times
    ``ours``, ``diffusers`` and the forwards interleaved (see :func:`run_interleaved`)."""
    from diffusers import LatentConsistencyModelPipeline

    from lcm_kit import LCMPipeline

    components = build_components(size)
    pipes = {
        "ours": LCMPipeline(**components, requires_safety_checker=False),
        "diffusers": LatentConsistencyModelPipeline(**components, requires_safety_checker=False),
    }
    calls: dict[str, Callable[[], object]] = {}
    for name, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        calls[name] = lambda p=pipe: p(prompt, num_inference_steps=steps, guidance_scale=8.5, output_type=output_type,
                                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    calls.update(forward_calls(pipes["ours"], prompt, steps, decode=output_type != "latent"))
    calls["ours"]()  # warm-up
    return run_interleaved(calls, repeats)


def run_interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Times ``calls`` (``ours``, ``diffusers``, then the forwards) round-robin; per clock, the median seconds of
    each, their ``forwards`` sum, and the medians of the per-repeat ratios ``ours/forwards`` and ``ours/diffusers``.
    """
    order = list(calls)
    times = {clock: {name: [] for name in order} for clock in ("wall", "cpu")}
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[1::-1] + order[2:]:  # the two pipelines alternate going first
            wall, cpu = timed(calls[name])
            times["wall"][name].append(wall)
            times["cpu"][name].append(cpu)
    summary = {}
    for clock, ts in times.items():
        m = {name: statistics.median(t) for name, t in ts.items()}
        m["forwards"] = sum(m[k] for k in order[2:])
        forwards = [sum(ts[k][r] for k in order[2:]) for r in range(repeats)]
        m["ours/forwards"] = statistics.median(o / f for o, f in zip(ts["ours"], forwards, strict=True))
        m["ours/diffusers"] = statistics.median(o / d for o, d in zip(ts["ours"], ts["diffusers"], strict=True))
        summary[clock] = m
    return summary


def format_table(rows: Sequence[tuple[str, str, dict[str, float]]]) -> str:
    """A markdown table of ``(size, clock, summary)`` rows: median seconds and the two ratios."""
    cols = ["size", "clock", "ours (s)", "diffusers (s)", "forwards (s)", "text enc", "unet x steps", "vae decode",
            "ours/forwards", "ours/diffusers"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for size, clock, m in rows:
        secs = [m[k] if k in m else float("nan") for k in ("ours", "diffusers", "forwards", "text_encoder",
                                                             "unet x steps", "vae_decode")]  # fmt: skip
        ratios = [f"{m['ours/forwards']:.3f}", f"{m['ours/diffusers']:.3f}"]
        cells = [size, clock] + [f"{x:.4f}" for x in secs] + ratios
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "sd15"], choices=sorted(SIZES), help="model sizes")
    parser.add_argument("--steps", type=int, default=2, help="num_inference_steps of each pipeline call")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each call (tiny 15, sd15 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--prompt", default="a photo of a cat", help="the prompt")
    parser.add_argument("--output_type", default="pt", choices=["pt", "latent"], help="'latent' skips the decode")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        repeats = args.repeats or DEFAULT_REPEATS[size]
        summary = bench_size(size, args.steps, repeats, args.prompt, args.output_type)
        rows += [(size, clock, m) for clock, m in summary.items()]
        print(f"{size}: done", flush=True)
    table = format_table(rows)
    repeats = args.repeats or DEFAULT_REPEATS
    print(f"steps={args.steps} repeats={repeats} threads={args.threads} output_type={args.output_type!r}: "
          "median seconds; ratios are medians of per-repeat ratios")  # fmt: skip
    print(table)
    return table


if __name__ == "__main__":
    main()
