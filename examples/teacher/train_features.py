"""Train the emoji feature network used for FID-emoji / KID-emoji (`lcm_kit.emoji.EmojiFeatureNet`).

A small CNN classifies emoji-test.txt groups and subgroups on the train split of the emoji dataset, at the teacher's
resolution (32 px), with small random shifts and blur so that features change smoothly with image quality. Rows whose
subgroup is "unknown" (emoji newer than emoji-test.txt) are left out. The test split gives the reported accuracy.

    python -m lcm_kit.emoji --out data/emoji32 --size 32
    python examples/teacher/train_features.py --data_dir data/emoji32 --output_dir models/emoji-features
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lcm_kit.emoji import EmojiExample, EmojiFeatureNet, read_split, save_feature_net


def load_split(data_dir: str, split: str, resolution: int) -> tuple[torch.Tensor, list[EmojiExample]]:
    """Images of one split as float (N, 3, H, W) in [0, 1] and their examples (known subgroups only)."""
    rows = [r for r in read_split(data_dir, split) if r.subgroup != "unknown"]
    images = [r.image().resize((resolution, resolution)) for r in rows]
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    return pixels, rows


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift by up to 2 px (white fill) and, for a quarter of the batch, a 3x3 box blur."""
    n, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2), value=1.0)
    dy, dx = torch.randint(0, 5, (2,), generator=gen).tolist()
    x = padded[:, :, dy : dy + h, dx : dx + w]
    blur = torch.rand(n, generator=gen) < 0.25
    x[blur] = F.avg_pool2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return x


def accuracy(net: EmojiFeatureNet, pixels: torch.Tensor, groups: torch.Tensor, subgroups: torch.Tensor) -> dict:
    """Top-1 accuracy of both heads (labels of -1, unseen in train, count as wrong)."""
    with torch.no_grad():
        g, s = net.classify(pixels)
    group_acc = (g.argmax(1) == groups).float().mean().item()
    return {"group_acc": group_acc, "subgroup_acc": (s.argmax(1) == subgroups).float().mean().item()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="data/emoji32")
    parser.add_argument("--output_dir", default="models/emoji-features")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--max_minutes", type=float, default=5.0)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    train_x, train_rows = load_split(args.data_dir, "train", args.resolution)
    test_x, test_rows = load_split(args.data_dir, "test", args.resolution)
    labels = {k: sorted({getattr(r, k) for r in train_rows}) for k in ("group", "subgroup")}
    index = {k: {name: i for i, name in enumerate(v)} for k, v in labels.items()}

    def targets(rows: list[EmojiExample], key: str) -> torch.Tensor:
        return torch.tensor([index[key].get(getattr(r, key), -1) for r in rows])

    train_g, train_s = targets(train_rows, "group"), targets(train_rows, "subgroup")
    net = EmojiFeatureNet(len(labels["group"]), len(labels["subgroup"]), resolution=args.resolution)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps)
    start, step = time.time(), 0
    while step < args.steps and time.time() - start < args.max_minutes * 60:
        idx = torch.randint(len(train_x), (args.batch_size,), generator=gen)
        g, s = net.classify(augment(train_x[idx], gen))
        loss = F.cross_entropy(g, train_g[idx]) + F.cross_entropy(s, train_s[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % 100 == 0:
            print(f"step {step} {time.time() - start:.0f}s loss {loss.item():.3f}", flush=True)
    net.eval()
    test_g, test_s = targets(test_rows, "group"), targets(test_rows, "subgroup")
    summary = {
        "steps": step,
        "seconds": round(time.time() - start),
        "final_loss": round(loss.item(), 4),
        "train": accuracy(net, train_x, train_g, train_s),
        "test": accuracy(net, test_x, test_g, test_s),
        "params": sum(p.numel() for p in net.parameters()),
    }
    save_feature_net(net, args.output_dir, labels)
    (Path(args.output_dir) / "training.json").write_text(json.dumps({**vars(args), **summary}, indent=2))
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
