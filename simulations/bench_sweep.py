"""Hyperparameter sweep for the Fashion-MNIST bench, on a validation split.

The bench's own training subset (the same seeded 4,000 images) trains every point; a
disjoint, seeded set of other training images (10,000 by default) scores it, so the test
set is never looked at while choosing settings. Each point is one bench run (`_run_one`:
the same model, method, trainer and evaluation as `fedtune bench`), over the given seeds.

    python -m simulations.bench_sweep --grid GRID.yaml --out runs/sweep [--device cuda]

GRID.yaml: `bench` (a bench config path, default simulations/bench_fmnist.yaml), `seeds`,
`val_size`, `points`: a list of {name, method (a bench method or variant), variant
(method overrides, optional), train (TrainConfig overrides, optional)}, and `set` (bench
config overrides). Results are appended to OUT/sweep.jsonl as they come (an OUT that already
holds one is refused: its rows could be another grid's), and OUT/sweep.md tabulates them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from fedtune.bench import BenchConfig, _run_one, bench_profile, method_config, on_device
from fedtune.cli import _load
from fedtune.data import DataConfig, load_data
from fedtune.data.core import DataSplit, _cap
from fedtune.errors import ConfigError, FedtuneError
from fedtune.methods import METHOD_NAMES
from fedtune.typedconfig import deep_merge, from_dict, to_dict
from fedtune.weights import resolve_pretrained


def split_train_val(cfg: DataConfig, val_size: int) -> DataSplit:
    """The bench's training subset and `val_size` other training images (seeded) as 'test'."""
    full = load_data(replace(cfg, max_train=None, max_test=1))
    n = len(full.train)
    train_idx = _cap(np.arange(n), cfg.max_train, cfg.seed, 1)
    rest = np.setdiff1d(np.arange(n), train_idx)
    val_idx = _cap(rest, val_size, cfg.seed, 3)
    return DataSplit(cfg.name, full.train.subset(train_idx), full.train.subset(val_idx))


def check_grid(grid, path: str, methods: list[str]) -> None:
    """A grid names its points, each once, each with one of `methods` (the bench's methods and
    the variants of its config) or a 'variant' of its own."""
    if not isinstance(grid, dict) or not isinstance(grid.get("points"), list) or not grid["points"]:
        raise ConfigError(f"{path}: a grid is a mapping with a non-empty list 'points'")
    unknown = sorted(set(grid) - {"bench", "set", "seeds", "val_size", "points"})
    if unknown:
        raise ConfigError(f"{path}: unknown grid key(s) {', '.join(map(repr, unknown))}; a grid has bench, set, seeds, val_size and points")
    names = [p.get("name") if isinstance(p, dict) else None for p in grid["points"]]
    for i, (point, name) in enumerate(zip(grid["points"], names, strict=True)):
        if not name:
            raise ConfigError(f"{path}: points[{i}] needs a 'name'")
        if names.count(name) > 1:
            raise ConfigError(f"{path}: point {name!r} is listed twice")
        method = point.get("method", name)
        if method.removesuffix("+lora") not in methods and "variant" not in point:
            raise ConfigError(f"{path}: point {name!r}: unknown method {method!r}; give 'method' (one of {', '.join(methods)}) or a 'variant'")


def point_config(base: BenchConfig, point: dict, path: str) -> tuple[BenchConfig, str]:
    """The bench config and method of one grid point: its train overrides and variant applied,
    and checked (a bad point is named before any point runs, not when its turn comes)."""
    try:
        train = from_dict(type(base.train), deep_merge(to_dict(base.train), point.get("train", {})), prefix="train.")
        variants = dict(base.variants)
        method = point.get("method", point["name"])
        if "variant" in point:
            variants[point["name"]] = deep_merge(dict(variants.get(method.removesuffix("+lora"), {"name": method.removesuffix("+lora")})), point["variant"])
            method = point["name"] + ("+lora" if method.endswith("+lora") else "")
        method_config(base.method, method, variants)
    except ConfigError as exc:
        raise ConfigError(f"{path}: point {point['name']!r}: {exc}") from exc
    return replace(base, train=train, variants=variants), method


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--deadline-s", type=float, default=None, help="start no new point after this many seconds")
    args = ap.parse_args(argv)
    try:
        grid = yaml.safe_load(Path(args.grid).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--grid {args.grid}: cannot read it ({exc})") from exc
    spec = grid if isinstance(grid, dict) else {}
    base: BenchConfig = _load(BenchConfig, spec.get("bench", "simulations/bench_fmnist.yaml"), spec.get("set", []))
    check_grid(grid, args.grid, [*METHOD_NAMES, *base.variants])  # base.variants: the defaults and the config's own
    base = replace(base, device=args.device)
    base.validate()  # the device too
    points = [(point, *point_config(base, point, args.grid)) for point in grid["points"]]
    seeds, val_size = grid.get("seeds", base.seeds), grid.get("val_size", 10_000)
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise ConfigError(f"{args.grid}: seeds: a non-empty list of whole numbers, got {seeds!r}")
    if not isinstance(val_size, int) or isinstance(val_size, bool) or val_size < 1:
        raise ConfigError(f"{args.grid}: val_size: a whole number >= 1, got {val_size!r}")
    out = Path(args.out)
    if (out / "sweep.jsonl").exists():  # rows of another grid or bench config would be read as this sweep's
        raise ConfigError(f"--out {out} already holds a sweep (sweep.jsonl); give another folder or move it")
    data = on_device(split_train_val(base.data, val_size), args.device)
    task = base.task or data.train.tasks[0]
    model_cfg = resolve_pretrained(base.model)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = []
    for point, cfg, method in points:
        if args.deadline_s is not None and time.time() - started > args.deadline_s:
            print(f"deadline: skipping {point['name']}", file=sys.stderr, flush=True)
            continue
        runs, profile = [], bench_profile(cfg)
        for seed in seeds:
            t0 = time.time()
            r = _run_one(cfg, model_cfg, data, task, method, seed, None, False, profile)
            runs.append({"seed": seed, "val_lda": r["evaluations"]["all_tokens"]["lda_head_fit"], "val_no_fit": r["evaluations"]["all_tokens"]["no_head_fit"],
                         "flops_per_step": r["train_flops_per_step"], "activation_bytes": r["activation_bytes"],
                         "blocks": r.get("blocks_trained_mean"), "steps": r["steps"], "s": round(time.time() - t0, 1)})
        row = {"name": point["name"], "method": method, "point": point, "runs": runs,
               "val_lda_mean": statistics.mean(x["val_lda"] for x in runs),
               "val_no_fit_mean": statistics.mean(x["val_no_fit"] for x in runs),
               "flops_per_step": statistics.median(x["flops_per_step"] for x in runs),
               "activation_bytes": statistics.median(x["activation_bytes"] for x in runs)}
        rows.append(row)
        with (out / "sweep.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['name']}: val LDA {100 * row['val_lda_mean']:.2f} no fit {100 * row['val_no_fit_mean']:.2f} "
              f"({sum(x['s'] for x in runs):.0f} s)", file=sys.stderr, flush=True)
    full = next((r for r in rows if r["method"] == "full" and not r["point"].get("train")), None)
    lines = [f"Validation: {len(data.test)} training images outside the {len(data.train)}-image training subset; seeds {seeds}; "
             f"device {args.device}; ratios against the default-lr full run.", "",
             "| point | val, LDA fit | val, no fit | FLOPs vs full | act. vs full |", "|---|---|---|---|---|"]
    for r in rows:
        fr = f"{r['flops_per_step'] / full['flops_per_step']:.3f}" if full else "-"
        ar = f"{r['activation_bytes'] / full['activation_bytes']:.3f}" if full else "-"
        lines.append(f"| {r['name']} | {100 * r['val_lda_mean']:.2f} | {100 * r['val_no_fit_mean']:.2f} | {fr} | {ar} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    try:
        main()
    except FedtuneError as exc:  # a bad grid, config or --out: the problem named, not a traceback
        sys.exit(f"bench_sweep: error: {exc}")
