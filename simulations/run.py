"""`fedtune simulate`: a Flower simulation of a RunConfig on one machine."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from fedtune.errors import ConfigError, FedtuneError
from fedtune.model import read_state
from fedtune.report import write_json
from fedtune.runconfig import RunConfig
from fedtune.typedconfig import to_dict

HERE = Path(__file__).parent
DEFAULT_CONFIG = HERE / "quickstart.yaml"


def check_out(out: Path, resume: bool, cfg: RunConfig | None = None) -> None:
    """Refuse, before anything is written, an --out that holds a run (without --resume) or a
    --resume whose checkpoint is missing, unreadable or written by a different config."""
    from server.runner import CHECKPOINT, resume_conflicts

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    stopped_early = (out / "metrics.jsonl").exists() and not (out / CHECKPOINT).exists()
    if stopped_early:  # the run wrote its round-0 record, then stopped before its first checkpoint
        raise ConfigError(f"{out} holds a run that stopped before its first checkpoint (metrics.jsonl, no {CHECKPOINT}): "
                          "nothing to continue from; delete the folder or choose another --out")
    if resume:
        _, meta = read_state(out / CHECKPOINT)  # a CheckpointError naming the file
        if cfg is not None:
            resume_conflicts(out / CHECKPOINT, meta, cfg)
    elif (out / CHECKPOINT).exists():
        raise ConfigError(f"{out} already holds a run (metrics.jsonl/checkpoint); use --resume to continue it or choose another --out")
    elif (out / "summary.json").exists() or _independent(out):
        raise ConfigError(f"{out} holds the results of another run (summary.json, or independent task federations in {out}/<task>/); "
                          "choose another --out")


def rounds_recorded(path: Path, rounds: int) -> int:
    """The rounds metrics.jsonl holds a whole record of (round 0, the start, and a line a crash
    cut short do not count)."""
    done = set()
    try:
        with open(path) as handle:
            for line in handle:
                try:
                    r = json.loads(line).get("round")
                except (ValueError, AttributeError):
                    continue
                if isinstance(r, int) and 1 <= r <= rounds:
                    done.add(r)
    except OSError:
        return 0
    return len(done)


def _independent(out: Path) -> bool:
    """Whether `out` holds (the start of) an independent-task-federations run: its config.json says so."""
    try:
        return bool(json.loads((out / "config.json").read_text()).get("federation", {}).get("independent_tasks"))
    except (OSError, ValueError, AttributeError):
        return False


def simulate_flwr_run(cfg: RunConfig, out: Path, resume: bool = False, progress: bool = True, verbose: bool = False) -> dict:
    """The same simulation on the path Flower supports: a private SuperLink running Flower's
    simulation runtime, and the app submitted with `flwr run` (server.app:app and
    clients.app:app read the run config from the run's `config`); the outputs are the same."""
    import subprocess
    import time

    from simulations.deploy import (
        CONNECTION,
        PROJECT,
        DeployError,
        Deployment,
        _bin,
        _tail,
        _toml_value,
        app_dir,
    )

    if cfg.backend.cpus_per_client != int(cfg.backend.cpus_per_client):
        raise ConfigError(f"backend.cpus_per_client is {cfg.backend.cpus_per_client:g}: Flower's simulation runtime behind `flwr run` "
                          "takes whole CPUs per client; use an integer, or backend.launcher: run_simulation")
    check_out(out, resume, cfg)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_json(out / "config.json", to_dict(cfg))
    write_json(out / "run-config.json", to_dict(cfg))  # what this invocation runs (a resume may extend the rounds)
    options = {"num-supernodes": cfg.federation.total_clients(),
               "backend.client-resources.num-cpus": int(cfg.backend.cpus_per_client), "backend.client-resources.num-gpus": 0.0,
               "backend.init-args.logging-level": "INFO" if verbose else "ERROR", "backend.init-args.log-to-driver": verbose}
    run_config = {"config": str((out / "run-config.json").resolve()), "out": str(out.resolve()), "resume": resume,
                  "simulated": True, "state-dir": str((out / "client_state").resolve()), "progress": False}
    bar = None
    start = time.time()
    with Deployment(out / "flwr", simulation=True) as dep:
        dep.start_superlink()
        dep.write_connection(options)
        cmd = [_bin("flwr"), "run", str(app_dir()), CONNECTION, "--stream", "--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())]
        log = dep.workdir / "flwr-run.log"
        with open(log, "wb") as handle:
            run = subprocess.Popen(cmd, stdout=None if verbose else handle, stderr=subprocess.STDOUT, env={**dep.env, "RAY_DEDUP_LOGS": "1"}, cwd=PROJECT)
            try:
                if progress:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=cfg.federation.rounds, desc=cfg.name, unit="round")
                while run.poll() is None:
                    dep.check_alive()
                    if bar is not None and (out / "metrics.jsonl").is_file():
                        done = rounds_recorded(out / "metrics.jsonl", cfg.federation.rounds)
                        if done != bar.n:  # (a resume cuts the records back to its checkpoint: the bar follows)
                            bar.n = done
                            bar.refresh()
                        elif sys.stderr.isatty():  # the elapsed time ticks on a terminal; a log file gets a line per round
                            bar.refresh()
                    time.sleep(1.0)
            finally:
                if bar is not None:
                    bar.close()
                if run.poll() is None:  # the SuperLink died, or Ctrl-C: `flwr run` goes with it
                    run.terminate()
                    try:
                        run.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        run.kill()
                        run.wait()
        summary = out / "summary.json"
        # `flwr run` exits 0 also when its ServerApp failed: a summary from before this
        # invocation (a --resume of a finished run) is not this run's result
        if run.returncode != 0 or not summary.is_file() or summary.stat().st_mtime < start:
            raise DeployError(f"`flwr run` ended (code {run.returncode}) without writing {out / 'summary.json'}; see {log}:\n{_tail(log)}")
    return json.loads((out / "summary.json").read_text())


def task_federations(cfg: RunConfig) -> dict[str, tuple[RunConfig, list[int]]]:
    """federation.independent_tasks: per task, the run of that task alone over the clients that
    hold it (their profiles kept, in order) and those clients' partition ids in `cfg`."""
    from dataclasses import replace

    from fedtune.federated import client_tasks

    out = {}
    for task in cfg.run_tasks():
        holders = [pid for pid in range(cfg.federation.num_clients) if task in client_tasks(cfg, pid)]
        fed = replace(cfg.federation, independent_tasks=False, num_clients=len(holders), client_tasks=None, new_clients=0,
                      profiles=[cfg.profile_of(pid) for pid in holders],
                      clients_per_round=None if cfg.federation.clients_per_round is None else min(cfg.federation.clients_per_round, len(holders)),
                      eval_clients_per_round=None if cfg.federation.eval_clients_per_round is None else min(cfg.federation.eval_clients_per_round, len(holders)))
        task_data = None if cfg.task_data is None else {task: cfg.task_data[task]}
        sub = replace(cfg, name=f"{cfg.name}_{task}", federation=fed, task_data=task_data,
                      tasks=None if task_data is not None else [task], task=None)
        sub.validate()
        out[task] = (sub, holders)
    return out


def simulate_independent(cfg: RunConfig, out: Path, resume: bool = False, progress: bool = True, verbose: bool = False) -> dict:
    """One federation per task (out/<task>/), then summary.json combining them: each task's
    accuracy from its own model, bytes summed, and per client and round the bytes it sent
    over all its tasks' federations.

    Without `resume`, `out` must hold none of them; with it, each task's federation that
    started continues from its checkpoint (checked against its config), one that finished its
    rounds is read back, and one that never started runs."""
    from server.runner import CHECKPOINT

    feds = task_federations(cfg)
    started = {task: (out / task / CHECKPOINT).exists() for task in feds}
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    if (out / "metrics.jsonl").exists() or (out / CHECKPOINT).exists():
        raise ConfigError(f"--out {out} holds a run of one federation (metrics.jsonl/checkpoint), not independent task federations; choose another --out")
    if resume and not any(started.values()):
        raise ConfigError(f"--resume: {out} holds no task federation to continue (no {out}/<task>/{CHECKPOINT} for tasks {', '.join(feds)})")
    for task, (sub_cfg, _) in feds.items():  # each as a run of its own: a started one resumes, the others start afresh
        check_out(out / task, resume and started[task], sub_cfg)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_json(out / "config.json", to_dict(cfg))
    subs = {}
    per_client_round: dict[tuple[int, int], int] = {}
    for task, (sub_cfg, holders) in feds.items():
        sub_out = out / task
        finished = json.loads((sub_out / "summary.json").read_text()) if resume and started[task] and (sub_out / "summary.json").is_file() else None
        if finished is not None and finished.get("rounds") == sub_cfg.federation.rounds and not finished.get("error"):
            subs[task] = finished
        else:
            subs[task] = simulate(sub_cfg, sub_out, resume=resume and started[task], progress=progress, verbose=verbose)
        for line in (sub_out / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            for c in rec.get("clients", []):
                if c.get("accepted") and 0 <= c.get("partition_id", -1) < len(holders):
                    key = (holders[c["partition_id"]], rec["round"])
                    per_client_round[key] = per_client_round.get(key, 0) + int(c.get("bytes_sent") or 0)
    model_bytes = max(s["model_bytes"] for s in subs.values())
    summary = {
        "name": cfg.name, "independent_tasks": True, "tasks": list(subs), "runs": {t: str(out / t) for t in subs},
        "accuracy_per_task": {t: s["accuracy_global"] for t, s in subs.items()},
        "accuracy_global": sum(s["accuracy_global"] for s in subs.values()) / len(subs),
        "accuracy_per_task_before_head_fit": {t: s.get("accuracy_global_before_head_fit") for t, s in subs.items()},
        "accuracy_global_before_head_fit": _mean_or_none([s.get("accuracy_global_before_head_fit") for s in subs.values()]),
        "accuracy_personalized_per_task": {t: s.get("accuracy_personalized") for t, s in subs.items()},
        "bytes_up_total": sum(s["bytes_up_total"] for s in subs.values()),
        "bytes_down_total": sum(s["bytes_down_total"] for s in subs.values()),
        "model_bytes": model_bytes,
        "models_bytes_total": sum(s["model_bytes"] for s in subs.values()),
        "bytes_up_client_max": max(per_client_round.values(), default=0),
        "wall_time_s": round(sum(s["wall_time_s"] for s in subs.values()), 1),
    }
    summary["bytes_up_client_max_vs_model"] = summary["bytes_up_client_max"] / model_bytes
    # a task federation that failed (rounds without an accepted reply) fails the whole run
    empty = {t: s["empty_rounds"] for t, s in subs.items() if s.get("empty_rounds")}
    if empty:
        summary["empty_rounds"] = empty
    errors = [f"task {t}: {s['error']}" for t, s in subs.items() if s.get("error")]
    if errors:
        summary["error"] = "; ".join(errors)
    write_json(out / "summary.json", summary)
    return summary


def _mean_or_none(values: list) -> float | None:
    """The mean of `values`, or None when one is missing (a run without a head fit)."""
    return None if any(v is None for v in values) or not values else sum(values) / len(values)


def simulate(cfg: RunConfig, out: Path, resume: bool = False, progress: bool = True, verbose: bool = False) -> dict:
    """Run `cfg` as a Flower simulation (Ray backend); return summary.json's content."""
    if cfg.federation.independent_tasks:
        return simulate_independent(cfg, Path(out), resume, progress, verbose)
    cpus = os.cpu_count() or 1
    if cfg.backend.cpus_per_client > cpus:
        raise ConfigError(f"backend.cpus_per_client is {cfg.backend.cpus_per_client:g} but this machine has {cpus} CPU(s): no virtual client could start; use at most {cpus}")
    if cfg.backend.launcher == "flwr-run":
        return simulate_flwr_run(cfg, Path(out), resume, progress, verbose)
    from flwr.simulation import run_simulation

    from clients.app import make_client_app
    from server.app import make_server_app

    out = Path(out)
    check_out(out, resume, cfg)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:  # a resumed run keeps the config it started with
        write_json(out / "config.json", to_dict(cfg))
    # Ray workers inherit the environment: one torch thread each, no tokenizer threads, quiet logs.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    backend = {
        "client_resources": {"num_cpus": cfg.backend.cpus_per_client, "num_gpus": 0.0},
        "init_args": {"logging_level": "ERROR", "log_to_driver": verbose, "include_dashboard": False},
    }
    run_simulation(
        server_app=make_server_app(cfg, out, resume, progress),
        client_app=make_client_app(cfg, state_dir=out / "client_state"),
        num_supernodes=cfg.federation.total_clients(),
        backend_config=backend,
        verbose_logging=verbose,
    )
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise FedtuneError(f"the simulation ended without writing {summary_path}; see the log above")
    return json.loads(summary_path.read_text())
