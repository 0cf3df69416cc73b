"""How skewed the personalized-FL protocol's clients are, with and without PFLlib's
self-balancing rule (`partition.self_balancing`).

For each seed the protocol's Dirichlet split (simulations/pfl_fmnist.yaml: the pooled 7% of
Fashion-MNIST, 20 clients, alpha 0.1 unless --set says otherwise) is drawn both ways, and each
client's labels are summed up as: the share of its largest class, the effective number of
classes (exp of the label entropy) and the classes holding at least 5% of its images, each
examples-weighted over the clients. No model, no training: a few seconds a seed.

    python -m simulations.partition_skew [--seeds 10] [--set KEY=VALUE ...] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def skew(labels: np.ndarray, parts: list[np.ndarray]) -> dict[str, float]:
    """Examples-weighted means over clients of their label distributions' skew."""
    total = sum(len(p) for p in parts)
    largest = effective = common = 0.0
    for part in parts:
        share = np.bincount(labels[part], minlength=int(labels.max()) + 1) / max(len(part), 1)
        held = share[share > 0]
        largest += len(part) * share.max()
        effective += len(part) * float(np.exp(-(held * np.log(held)).sum()))
        common += len(part) * int((share >= 0.05).sum())
    return {"largest_class_share": largest / total, "effective_classes": effective / total, "classes_over_5pct": common / total}


def measure(seeds: int, overrides: list[str]) -> dict:
    from fedtune.federated import federated_data
    from fedtune.runconfig import load_run_config

    rows = []
    for balancing in (False, True):
        per_seed = []
        for seed in range(seeds):
            cfg = load_run_config("simulations/pfl_fmnist.yaml", [*overrides, f"seed={seed}", f"partition.self_balancing={str(balancing).lower()}"])
            split, parts = federated_data(cfg)
            labels = split.train.labels[split.train.tasks[0]].numpy()
            per_seed.append(skew(labels, parts[: cfg.federation.num_clients]))
        rows.append({"self_balancing": balancing, "seeds": seeds,
                     **{k: float(np.mean([s[k] for s in per_seed])) for k in per_seed[0]},
                     "largest_class_share_per_seed": [round(s["largest_class_share"], 4) for s in per_seed]})
    return {"config": "simulations/pfl_fmnist.yaml", "overrides": overrides, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default 10)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override (repeatable)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds: must be at least 1")
    result = measure(args.seeds, args.set)
    for row in result["rows"]:
        print(f"self_balancing={str(row['self_balancing']).lower():5}  largest class {100 * row['largest_class_share']:.1f}%  "
              f"effective classes {row['effective_classes']:.2f}  classes over 5% {row['classes_over_5pct']:.2f}  (seeds 0-{args.seeds - 1})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
