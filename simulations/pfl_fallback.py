"""The closed-form personal head before the federation's statistics exist: how much to shrink a
client's own covariance.

A run's first evaluation (personalization: lda) has no federation statistics yet, so each
client's head uses its own within-class covariance, from a few hundred examples in d = 192
dimensions. This diagnostic builds every client's head on the starting model's features, as
that evaluation does, with the federation's covariance (the reference) and with the client's
own shrunk towards its mean variance by several amounts, and scores each on the clients' local
test splits (examples-weighted).

    python -m simulations.pfl_fallback [--set KEY=VALUE ...] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedtune.heads import own_covariance_shrink

SHRINKS = {"1e-4 (before)": lambda n, d: 1e-4, "d/(n+d) (now)": own_covariance_shrink, "0.5": lambda n, d: 0.5, "0.9": lambda n, d: 0.9}


def measure(overrides: list[str]) -> dict:
    from fedtune.engine import dense_plan
    from fedtune.federated import client_data, global_model
    from fedtune.heads import class_moments, class_stats, discriminant, extract_features
    from fedtune.runconfig import load_run_config

    cfg = load_run_config("simulations/pfl_fmnist.yaml", overrides)
    model = global_model(cfg).eval()
    task = model.tasks[0]
    plan = dense_plan(model)
    classes = model.heads[task].out_features
    owns, tests = [], []
    for pid in range(cfg.federation.num_clients):
        train, test = client_data(cfg, pid)
        owns.append(class_stats(*extract_features(model, train, task, 256, plan), classes))
        tests.append(extract_features(model, test, task, 256, plan))
    _, _, fed_cov = class_moments({k: sum(o[k] for o in owns) for k in owns[0]})
    correct = {k: 0 for k in ("federation's covariance", *SHRINKS)}
    total = scored = single = 0
    for own, (feats, labels) in zip(owns, tests, strict=True):
        count, means, cov = class_moments(own)
        present = count > 0
        if not len(labels):
            continue
        scored += 1
        total += len(labels)
        if present.sum() < 2:  # one class known: every head predicts it (fedtune.client.personal_lda_head)
            single += 1
            for k in correct:
                correct[k] += int((labels == int(present.argmax())).sum())
            continue
        priors, n, d = count / count.sum(), float(count.sum()), cov.shape[0]
        heads = {"federation's covariance": discriminant(means, fed_cov, priors, present)}
        heads.update({k: discriminant(means, cov, priors, present, f(n, d)) for k, f in SHRINKS.items()})
        for k, (w, b) in heads.items():
            correct[k] += int(((feats @ w.T + b).argmax(-1) == labels).sum())
    return {"overrides": overrides, "test_images": total, "clients": scored, "clients_with_one_class": single,
            "accuracy": {k: round(100 * c / total, 2) for k, c in correct.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="overrides of simulations/pfl_fmnist.yaml")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = measure(args.set)
    result["command"] = " ".join(["python -m simulations.pfl_fallback", *(f"--set {s}" for s in args.set)])
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
