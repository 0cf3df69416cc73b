"""`fedtune probe`: what a run's starting model scores with each task's head fitted, no training."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .client import ClientRuntime
from .client_state import ClientState
from .federated import federated_data, global_model, state_to_numpy
from .heads import split_stats
from .report import protocol_numbers, run_identity
from .runconfig import RunConfig

# --------------------------------------------------------------------------- reference


def head_fit_reference(cfg: RunConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """What the run's starting model scores with no training: each task's head fitted (LDA)
    from the summed feature statistics of that task's clients, as `federation.head_fit: lda`
    fits it after the last round, then evaluated on the central test set. The probe sums every
    client's statistics; a run with `federation.eval_clients_per_round` below the number of
    clients sums those of the clients that evaluated in the round it fits.

    A run with the head fit that ends near this number learnt its accuracy from the head fit,
    not from fine-tuning. One process plays every client (a simulation-side tool); every
    task has a client (RunConfig.validate checks federation.client_tasks).

    In the personalized-FL protocol (`partition.pool` with `federation.personalization: lda`)
    it also gives what the run's final evaluation reports, on the starting model: each
    client's closed-form personal head (its own statistics shrunk towards the federation's)
    and the fitted global model on the client's local test split, with their means, spreads,
    worst 10% and per-client numbers (`accuracy_personalized`, `accuracy_global_local`, ...).
    What a run's personalized accuracy gains over this, its rounds of training gave. New
    clients (`federation.new_clients`) are reported apart under `new_clients`, as the run
    does. Under DP the run's head fit adds noise to the statistics; the probe's does not.

    `progress`, when given, is called with a line after each client's statistics and each
    client's evaluation (the probe of a large pool takes minutes).
    """
    from .heads import evaluate, lda_head, set_head

    start = time.time()

    def say(line: str) -> None:
        if progress is not None:
            progress(f"probe: {line} ({time.time() - start:.0f} s)")

    model = global_model(cfg)
    arrays = state_to_numpy(model)
    totals: dict[str, dict[str, np.ndarray]] = {}
    runtimes = [ClientRuntime(cfg, pid) for pid in range(cfg.federation.num_clients)]
    for n, rt in enumerate(runtimes, 1):
        for task, client_parts in split_stats(rt.head_stats(arrays, ClientState())).items():
            parts = totals.setdefault(task, {})
            for part, value in client_parts.items():
                parts[part] = parts[part] + value if part in parts else value.copy()
        say(f"client {n}/{len(runtimes)} class statistics")
    split, _ = federated_data(cfg)
    per_task, examples = {}, {}
    for task in model.tasks:
        set_head(model.heads[task], *lda_head(totals[task]))
        per_task[task] = evaluate(model, split.test, task)["accuracy"]
        examples[task] = int(totals[task]["count"].sum())
        say(f"task {task}: central test {per_task[task]:.4f}")
    result: dict[str, Any] = {
        "name": cfg.name,
        **run_identity(cfg),
        "accuracy_per_task": per_task,
        "accuracy_global": float(np.mean(list(per_task.values()))),
        "head_fit_examples": examples,
        "test_size": len(split.test),
    }
    if cfg.partition.pool and cfg.federation.personalization == "lda":
        fitted = state_to_numpy(model)

        def evals(clients: list[ClientRuntime]) -> list[dict[str, Any]]:
            out = []
            for n, rt in enumerate(clients, 1):
                ev, _, _ = rt.evaluate(fitted, ClientState(), fed_stats=totals)
                say(f"client {rt.partition_id} evaluated ({n}/{len(clients)})")
                out.append({"partition_id": rt.partition_id, "num_examples": ev.num_examples, "accuracy_global": ev.accuracy_global, "accuracy_personal": ev.accuracy_personal})
            return out

        result.update(protocol_numbers(evals(runtimes)))
        fed = cfg.federation
        if fed.new_clients:  # as in the run: their heads lean on the training clients' statistics
            result["new_clients"] = protocol_numbers(evals([ClientRuntime(cfg, pid) for pid in range(fed.num_clients, fed.total_clients())]))
    return result
