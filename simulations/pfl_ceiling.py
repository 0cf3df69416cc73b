"""How far the personalized-FL protocol's closed-form heads go with features learnt from
Fashion-MNIST itself: a diagnostic, not a method.

    python -m simulations.pfl_ceiling [--backbone vit|cnn] [--epochs N] [--seeds 3] [--set KEY=VALUE ...]

The protocol (simulations/pfl_fmnist.yaml) uses a seeded 7% of Fashion-MNIST (its pool) and a
backbone pretrained on rendered glyphs. This script trains a backbone with labels, centrally,
on the Fashion-MNIST training images outside that pool (no client's train or test image
among them), freezes it, and scores on each seed's clients, on their local test splits:

- each client's closed-form personal head (`personal_lda_head`: own class means shrunk
  towards the federation's, the federation's covariance, own priors), as the runs do;
- the global discriminant head (the federation's summed statistics), as the server fits it;
- each client's 5-nearest-neighbour vote over its own training images (cosine).

As references on the same clients: the protocol's starting model (the glyph-pretrained
ViT, no training) and the raw pixels (5-NN only). `vit` fine-tunes the protocol's own
starting model (every parameter); `cnn` trains a small convolutional network from scratch.
One measured point of what features learnt from in-domain data give this protocol's data with
frozen closed-form heads, not an upper bound (a stronger backbone or head may do better) and
never a result for the protocol's table: the backbone has seen 56,000 labelled in-domain images
no client has. Seeds 0 to --seeds - 1 (the run seed: partition and starting model; the pool
is the same for every seed). Writes ceiling_BACKBONE_eEPOCHS.json and .md into --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedtune.data import load_data
from fedtune.data.core import _cap
from fedtune.federated import client_data, global_model
from fedtune.heads import class_stats, lda_head, personal_lda_head
from fedtune.report import protocol_numbers, write_json
from fedtune.runconfig import RunConfig, load_run_config

CONFIG, SEEDS = "simulations/pfl_fmnist.yaml", 3  # the stored results' settings

Features = Callable[[torch.Tensor], torch.Tensor]  # model images [N, C, H, W] -> features [N, d]


def outside_pool(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fashion-MNIST's official train and test images that the protocol's pool leaves out
    (the pool is `_cap` of each file with data.max_train / data.max_test and data.seed)."""
    if cfg.data.name != "fashion_mnist" or not cfg.partition.pool:
        raise SystemExit("pfl_ceiling: the protocol must pool Fashion-MNIST (simulations/pfl_fmnist.yaml)")
    split = load_data(replace(cfg.data, max_train=None, max_test=None))
    task = split.train.tasks[0]
    out = []
    for stream, (part, limit) in enumerate(((split.train, cfg.data.max_train), (split.test, cfg.data.max_test)), start=1):
        keep = np.setdiff1d(np.arange(len(part)), _cap(np.arange(len(part)), limit, cfg.data.seed, stream))
        if not len(keep):
            raise SystemExit(f"pfl_ceiling: no {'training' if stream == 1 else 'test'} image lies outside the pool (data.max_train / data.max_test take them all)")
        out += [part.images[keep], part.labels[task][keep]]
    return out[0], out[1], out[2], out[3]


def train_backbone(kind: str, cfg: RunConfig, images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> tuple[Features, nn.Module]:
    """Train `kind` with cross-entropy on (images, labels); return its feature function and head."""
    torch.manual_seed(seed)
    if kind == "vit":
        model = global_model(cfg)
        body, head, lr = model, model.heads[model.tasks[0]], 5e-4

        def feats(x: torch.Tensor) -> torch.Tensor:
            return model.forward_features(x)[0]
    else:
        body = nn.Sequential(nn.Conv2d(images.shape[1], 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * (images.shape[-1] // 4) ** 2, 192), nn.ReLU())
        head, lr, feats = nn.Linear(192, 10), 1e-3, body
    params = list({id(p): p for p in list(body.parameters()) + list(head.parameters())}.values())
    opt = torch.optim.AdamW(params, lr, weight_decay=0.05 if kind == "vit" else 0.0)
    steps = epochs * ((len(images) + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    gen, start, step = torch.Generator().manual_seed(seed), time.time(), 0
    body.train()
    for epoch in range(epochs):
        for batch in torch.randperm(len(images), generator=gen).split(128):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "vit"):
                loss = F.cross_entropy(head(feats(images[batch])).float(), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0 or step == steps:
                print(f"  {kind} epoch {epoch + 1}/{epochs} step {step}/{steps} loss {float(loss.detach()):.3f} ({time.time() - start:.0f} s)", flush=True)
    body.eval()
    return feats, head


@torch.no_grad()
def batched(fn: Features, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(images[i : i + 512]).float() for i in range(0, len(images), 512)])


def knn_accuracy(test: torch.Tensor, test_y: torch.Tensor, train: torch.Tensor, train_y: torch.Tensor, k: int = 5, classes: int = 10) -> float:
    """The share of `test` whose k nearest `train` features (cosine) vote for its label; a tie
    goes to the tied class whose neighbours rank nearer."""
    sim = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    k = min(k, len(train))
    near = 1e-3 / torch.arange(1, k + 1, dtype=torch.float32)  # less than one vote in all
    votes = (F.one_hot(train_y[sim.topk(k, dim=1).indices], classes).float() * (1.0 + near[None, :, None])).sum(1)
    return float((votes.argmax(1) == test_y).float().mean())


def score(cfg: RunConfig, fn: Features, heads: bool = True) -> dict[str, Any]:
    """The protocol's per-client numbers with features `fn`, frozen: the closed-form personal
    and global heads (when `heads`) and the 5-NN vote, each summarized like a run's."""
    splits = [client_data(cfg, pid) for pid in range(cfg.federation.num_clients)]
    task = splits[0][0].tasks[0]
    classes = splits[0][0].num_classes[task]
    data = [(batched(fn, train.images), train.labels[task], batched(fn, test.images), test.labels[task]) for train, test in splits]
    own = [class_stats(tr, ty, classes) for tr, ty, _, _ in data]
    fed = {part: sum(o[part] for o in own) for part in own[0]}
    glob = lda_head(fed) if heads else None
    evals, knn = [], []
    for pid, ((tr, ty, te, tey), o) in enumerate(zip(data, own, strict=True)):
        if not len(tey):  # a client without a local test image has no accuracy (as in the runs' summaries)
            continue
        knn.append({"partition_id": pid, "num_examples": len(tey), "accuracy_personal": knn_accuracy(te, tey, tr, ty, classes=classes)})
        if heads:
            w, b = personal_lda_head(o, fed, cfg.federation.lda_shrink)
            evals.append({"partition_id": pid, "num_examples": len(tey),
                          "accuracy_global": float(((te @ glob[0].T + glob[1]).argmax(1) == tey).float().mean()),
                          "accuracy_personal": float(((te @ w.T + b).argmax(1) == tey).float().mean())})
    out = {"knn5": protocol_numbers(knn)["accuracy_personalized"]}
    if heads:
        nums = protocol_numbers(evals)
        out.update({k: nums[k] for k in ("accuracy_personalized", "accuracy_personalized_worst10", "accuracy_global_local", "personalized_at_least_global_fraction")})
    return out


def pixels(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0].flatten(1)


def report(result: dict[str, Any]) -> str:
    """The markdown of a result (ceiling_BACKBONE_eEPOCHS.md)."""
    n, seeds = result["backbone_train_images"], len(result["seeds"])
    return (f"# Closed-form heads on frozen features, the protocol's clients (seeds 0-{seeds - 1}), local test splits\n\n"
            f"`{result['command']}` ({result['wall_time_s']:.0f} s). The {result['backbone']} was trained with labels on {n:,} Fashion-MNIST "
            f"training images outside the protocol's pool, {result['epochs']} epochs; {100 * result['backbone_test_accuracy']:.1f}% on the "
            f"{result['backbone_test_images']:,} official test images outside the pool. Frozen features from in-domain labels: one "
            "measured point, not an upper bound, and not a federated result. Mean ± standard deviation over the seeds (each seed's "
            "value)." + (f" {result['note']}" if result.get("note") else "") + "\n\n" + table(result))


def table(result: dict[str, Any]) -> str:
    rows = [("pixels: the model's 32x32 inputs, one channel (reference)", "pixels"), ("starting model: glyph-pretrained ViT, no training (reference)", "start"),
            (f"{result['backbone']} trained on the {result['backbone_train_images']:,} images outside the pool", "trained")]
    cols = (("accuracy_personalized", "closed-form personal head"), ("accuracy_personalized_worst10", "its worst 10%"),
            ("accuracy_global_local", "global head (local tests)"), ("knn5", "own 5-NN"))

    def cell(key: str, col: str) -> str:
        vals = [s[key].get(col) for s in result["seeds"].values()]
        if any(v is None for v in vals):
            return "-"
        pts = [100 * v for v in vals]
        return f"{np.mean(pts):.1f} ± {np.std(pts, ddof=1) if len(pts) > 1 else 0.0:.1f} ({', '.join(f'{p:.1f}' for p in pts)})"

    lines = ["| features | " + " | ".join(c for _, c in cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {label} | " + " | ".join(cell(key, col) for col, _ in cols) + " |" for label, key in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--backbone", choices=("vit", "cnn"), default="cnn")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=SEEDS)
    ap.add_argument("--max-images", type=int, default=None, help="train the backbone on at most this many outside images (quick checks)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="simulations/results/pfl_fmnist/ceiling")
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.seeds < 1:
        ap.error("--epochs and --seeds must be at least 1")
    start = time.time()
    cfg = load_run_config(args.config, args.overrides)
    train_x, train_y, test_x, test_y = outside_pool(cfg)
    if args.max_images:
        train_x, train_y = train_x[: args.max_images], train_y[: args.max_images]
    print(f"training a {args.backbone} on {len(train_x):,} Fashion-MNIST training images outside the pool, {args.epochs} epochs", flush=True)
    fn, head = train_backbone(args.backbone, cfg, train_x, train_y, args.epochs, seed=0)
    central = float((batched(lambda x: head(fn(x)), test_x).argmax(1) == test_y).float().mean())
    print(f"  its accuracy on the {len(test_x):,} official test images outside the pool: {100 * central:.1f}", flush=True)
    start_model = global_model(cfg)
    start_model.eval()
    result: dict[str, Any] = {"config": args.config, "overrides": args.overrides, "backbone": args.backbone, "epochs": args.epochs,
                              "backbone_train_images": len(train_x), "backbone_test_images": len(test_x),
                              "backbone_test_accuracy": central, "seeds": {}}
    for seed in range(args.seeds):
        scfg = load_run_config(args.config, [*args.overrides, f"seed={seed}"])
        result["seeds"][seed] = {
            "pixels": score(scfg, pixels, heads=False),
            "start": score(scfg, lambda x: start_model.forward_features(x)[0]),
            "trained": score(scfg, fn),
        }
        print(f"  seed {seed}: " + json.dumps({k: {m: round(100 * v, 1) for m, v in s.items()} for k, s in result["seeds"][seed].items()}), flush=True)
    result["wall_time_s"] = time.time() - start
    result["command"] = f"python -m simulations.pfl_ceiling --backbone {args.backbone} --epochs {args.epochs} --seeds {args.seeds}" + (
        f" --max-images {args.max_images}" if args.max_images else "") + "".join(f" --set {o}" for o in args.overrides)
    # a quick check (fewer images or seeds, other settings) never overwrites the stored results of the full command
    extra = ([f"max{args.max_images}"] if args.max_images else []) + ([f"seeds{args.seeds}"] if args.seeds != SEEDS else [])
    if args.overrides or args.config != CONFIG:
        extra.append(hashlib.sha256("\n".join([args.config, *args.overrides]).encode()).hexdigest()[:8])
    out, name = Path(args.out), "_".join([f"ceiling_{args.backbone}_e{args.epochs}", *extra])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", result)
    (out / f"{name}.md").write_text(report(result))
    print(f"wrote {out / name}.json and .md", flush=True)


if __name__ == "__main__":
    main()
