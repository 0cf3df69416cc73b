"""`fedtune probe`: what a run's starting model scores with each task's head fitted, no training."""

from __future__ import annotations

from typing import Any

import numpy as np

from .client import ClientRuntime
from .client_state import ClientState
from .federated import federated_data, global_model, state_to_numpy
from .runconfig import RunConfig

# --------------------------------------------------------------------------- reference


def head_fit_reference(cfg: RunConfig) -> dict[str, Any]:
    """What the run's starting model scores with no training: each task's head fitted (LDA)
    from the summed feature statistics of that task's clients, exactly as `federation.head_fit:
    lda` fits it after the last round, then evaluated on the central test set.

    A run with the head fit that ends near this number learnt its accuracy from the head fit,
    not from fine-tuning. One process plays every client (a simulation-side tool); every
    task has a client (RunConfig.validate checks federation.client_tasks).
    """
    from .heads import evaluate, lda_head, set_head

    model = global_model(cfg)
    arrays = state_to_numpy(model)
    totals: dict[str, dict[str, np.ndarray]] = {}
    for pid in range(cfg.federation.num_clients):
        for key, value in ClientRuntime(cfg, pid).head_stats(arrays, ClientState()).items():
            task, _, part = key.rpartition(".")
            parts = totals.setdefault(task, {})
            parts[part] = parts[part] + value if part in parts else value.copy()
    split, _ = federated_data(cfg)
    per_task, examples = {}, {}
    for task in model.tasks:
        set_head(model.heads[task], *lda_head(totals[task]))
        per_task[task] = evaluate(model, split.test, task)["accuracy"]
        examples[task] = int(totals[task]["count"].sum())
    return {
        "name": cfg.name,
        "accuracy_per_task": per_task,
        "accuracy_global": float(np.mean(list(per_task.values()))),
        "head_fit_examples": examples,
        "test_size": len(split.test),
    }
