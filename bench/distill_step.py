"""LCM-LoRA distillation step: one UNet (teacher via ``teacher_mode``) vs a separate teacher UNet copy.

Layouts, same UNet, batch, LoRA and loss (:func:`lcm_kit.loss.consistency_distillation_loss`):

* ``one_unet`` (ours, ``train/distill_lora.py``): LoRA on the teacher's UNet; teacher = that UNet inside
  ``teacher_mode()`` with cond + uncond batched in one call; target = the same UNet with LoRA, no grad.
* ``copy_2calls`` (diffusers' ``train_lcm_distill_lora_sd.py``): ``teacher = copy.deepcopy(unet)`` kept frozen, the
  student is the UNet with LoRA, the teacher runs cond and uncond as two calls, target = the student, no grad.
* ``copy_batched``: the separate copy with our batched cond + uncond call (separates the two effects).

Each layout runs in a fresh subprocess (so peak memory is its own), rounds interleave the layouts. Reported: median
step time (forward + backward + AdamW) over all measured steps, peak RSS of the process (``ru_maxrss``, the
high-water mark of everything the process touched, torch's CPU allocations included) minus the RSS before the
models were built, and the bytes of parameters + buffers + gradients + optimizer state held by the step.

    python bench/distill_step.py                   # defaults: widths 32,64,64,64, 16x16 latents, batch 8, rank 8
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

LAYOUTS = ("one_unet", "copy_2calls", "copy_batched")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _build(layout: str, args):
    import torch
    from diffusers import UNet2DConditionModel

    from lcm_kit.lora import add_lcm_lora
    from lcm_kit.testing import tiny_unet_config

    torch.manual_seed(0)
    widths = tuple(int(w) for w in args.widths.split(","))
    unet = UNet2DConditionModel(**tiny_unet_config(widths, args.latent, args.cross_dim))
    teacher = None if layout == "one_unet" else copy.deepcopy(unet).requires_grad_(False).eval()
    add_lcm_lora(unet, rank=args.rank)
    return unet.train(), teacher


def _callables(layout, unet, teacher, embeds, uncond):
    import torch

    from lcm_kit.lora import teacher_mode

    def run(model, z, t, e):
        return model(z, t, encoder_hidden_states=e).sample

    def teacher_fn(z, t):
        if layout == "copy_2calls":
            return run(teacher, z, t, embeds), run(teacher, z, t, uncond)
        z2, t2, e2 = torch.cat([z, z]), torch.cat([t, t]), torch.cat([embeds, uncond])
        if teacher is None:
            with teacher_mode(unet):
                return run(unet, z2, t2, e2).chunk(2)
        return run(teacher, z2, t2, e2).chunk(2)

    return (lambda z, t, w: run(unet, z, t, embeds)), teacher_fn, (lambda z, t, w: run(unet, z, t, embeds))


def worker(layout: str, args) -> dict:
    """Runs ``args.warmup + args.steps`` training steps of one layout; returns its measurements."""
    import torch

    from lcm_kit.loss import DistillLossConfig, consistency_distillation_loss
    from lcm_kit.schedules import alphas_cumprod_from_betas, make_betas

    torch.set_num_threads(args.threads)
    rss0 = _rss_mb()
    unet, teacher = _build(layout, args)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, 4, args.latent, args.latent, generator=g)
    embeds = torch.randn(args.batch, 77, args.cross_dim, generator=g)
    uncond = torch.randn(1, 77, args.cross_dim, generator=g).expand_as(embeds)
    fns = _callables(layout, unet, teacher, embeds, uncond)
    table, cfg = alphas_cumprod_from_betas(make_betas()), DistillLossConfig()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        out = consistency_distillation_loss(*fns, latents, table, cfg, generator=torch.Generator().manual_seed(i))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep grads allocated so they are counted below
        times.append(time.perf_counter() - t0)
    models = [unet] + ([teacher] if teacher is not None else [])
    held = [t for m in models for t in (*m.parameters(), *m.buffers())] + [p.grad for p in params]
    held += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"layout": layout, "times": times[args.warmup :], "peak_rss_mb": _rss_mb() - rss0,
            "held_mb": _tensor_bytes(held) / 2**20}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="32,64,64,64", help="UNet block_out_channels")
    p.add_argument("--latent", type=int, default=16, help="latent height = width")
    p.add_argument("--cross_dim", type=int, default=32, help="text embedding width")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--steps", type=int, default=5, help="measured steps per process")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per layout, interleaved")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", choices=LAYOUTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    forwarded = list(argv if argv is not None else sys.argv[1:])
    results: dict[str, list[dict]] = {k: [] for k in LAYOUTS}
    for r in range(args.rounds):
        for layout in LAYOUTS[r % 3 :] + LAYOUTS[: r % 3]:  # rotate the order each round
            cmd = [sys.executable, __file__, *forwarded, "--worker", layout]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[layout].append(json.loads(out.strip().splitlines()[-1]))
    report(results, args)


def report(results: dict[str, list[dict]], args) -> None:
    """Prints a markdown table with ratios to ``one_unet``."""
    rows = {}
    for layout, runs in results.items():
        times = [t for r in runs for t in r["times"]]
        per_round = sorted(statistics.median(r["times"]) * 1e3 for r in runs)
        rows[layout] = (statistics.median(times) * 1e3, statistics.median(r["peak_rss_mb"] for r in runs),
                        runs[0]["held_mb"], f"{per_round[0]:.0f}-{per_round[-1]:.0f}")  # fmt: skip
    base = rows["one_unet"]
    print(f"UNet widths {args.widths}, latent {args.latent}x{args.latent}, batch {args.batch}, LoRA rank {args.rank}, "
          f"{args.threads} thread(s); {args.rounds} rounds x {args.steps} steps")  # fmt: skip
    print("| layout | step ms (median) | round medians | x one_unet | peak RSS MB | x | held tensors MB | x |")
    print("|---|---|---|---|---|---|---|---|")
    for layout, (ms, rss, held, spread) in rows.items():
        print(f"| {layout} | {ms:.0f} | {spread} | {ms / base[0]:.2f} | {rss:.0f} | {rss / base[1]:.2f} | "
              f"{held:.1f} | {held / base[2]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
