"""`fedtune simulate`: a Flower simulation of a RunConfig on one machine."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from fedtune.errors import ConfigError
from fedtune.model import read_state
from fedtune.report import write_json
from fedtune.runconfig import RunConfig
from fedtune.typedconfig import to_dict

HERE = Path(__file__).parent
DEFAULT_CONFIG = HERE / "quickstart.yaml"


def check_out(out: Path, resume: bool) -> None:
    """Refuse, before anything is written, an --out that holds a run (without --resume) or a
    --resume whose checkpoint is missing or unreadable."""
    from server.runner import CHECKPOINT

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    if resume:
        read_state(out / CHECKPOINT)  # a CheckpointError naming the file
    elif (out / "metrics.jsonl").exists() or (out / CHECKPOINT).exists():
        raise ConfigError(f"{out} already holds a run (metrics.jsonl/checkpoint); use --resume to continue it or choose another --out")


def simulate(cfg: RunConfig, out: Path, resume: bool = False, progress: bool = True, verbose: bool = False) -> dict:
    """Run `cfg` as a Flower simulation (Ray backend); return summary.json's content."""
    from flwr.simulation import run_simulation

    from clients.app import make_client_app
    from server.app import make_server_app

    out = Path(out)
    check_out(out, resume)
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
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    return json.loads(summary_path.read_text())
