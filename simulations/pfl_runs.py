"""The runs behind the personalized-FL tables (README "Personalization on Fashion-MNIST"):
one command per table row.

    python -m simulations.pfl_runs                                   # every row's runs: done or to do
    python -m simulations.pfl_runs --method fedrep --split a0.5 --run  # one row: its seeds, one run at a time
    python -m simulations.pfl_runs --run                             # every row still to do

METHOD is a row of the tables (the overlays in simulations/pfl/, and `alast`, the default
simulations/pfl_fmnist.yaml); SPLIT is a0.1 (Dirichlet 0.1), a0.5 (Dirichlet 0.5), path
(2 classes per client) or a0.1sb (Dirichlet 0.1 drawn with PFLlib's self-balancing rule; by
default only the rows measured there: local, fedrep, ditto and the default). A run writes runs/pfl/METHOD_SPLIT_sSEED (`--runs`); its summary.json
is copied into the summaries folder as METHOD_SPLIT_sSEED.json, what `simulations.pfl_tables`
reads, and the tables are rebuilt after each run. A run whose summary is already there is
skipped unless `--force`; a run folder that already holds a finished run only has its
summary copied, one left by an interrupted run is resumed (`--resume`), and with `--force`
an existing run folder is moved aside (to NAME.old-TIME), never overwritten. The runs are
long (5-15 minutes each on 2 CPU cores): run one row at a time, and never two of these
commands at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fedtune.report import replace_durably
from server.runner import RESUME_MAY_CHANGE
from simulations.compare_runs import read_summary
from simulations.pfl_tables import METHODS, build

ROOT = Path(__file__).resolve().parent
SPLITS = {"a0.1": [], "a0.5": ["partition.alpha=0.5"], "path": ["partition.scheme=pathological"],
          "a0.1sb": ["partition.self_balancing=true"]}
# the rows measured on a split when no --method is given (default: every row)
SPLIT_METHODS = {"a0.1sb": ("local", "fedrep", "ditto", "alast")}


def config_of(method: str) -> Path:
    """The run config of a table row."""
    return ROOT / "pfl_fmnist.yaml" if method == "alast" else ROOT / "pfl" / f"{method}.yaml"


def command(method: str, split: str, seed: int, runs: Path) -> list[str]:
    """`fedtune simulate` for one run of a row."""
    sets = [f"seed={seed}", *SPLITS[split]]
    return ["fedtune", "simulate", os.path.relpath(config_of(method)), *[a for s in sets for a in ("--set", s)], "--out", str(runs / f"{method}_{split}_s{seed}")]


def plan(methods: list[str] | None, splits: list[str], seeds: list[int], summaries: Path, runs: Path) -> list[tuple[str, list[str], bool]]:
    """(name, command, done) for every run asked for, rows in the tables' order; `methods` None:
    each split's rows (SPLIT_METHODS, else every row)."""
    keys = [k for k, _ in METHODS]
    return [(f"{m}_{sp}_s{s}", command(m, sp, s, runs), (summaries / f"{m}_{sp}_s{s}.json").is_file())
            for m in methods or keys for sp in splits if methods or m in SPLIT_METHODS.get(sp, keys) for s in seeds]


# config keys that do not change what a run computes: those a resume may change, but the rounds and the final evaluation
SAME_RUN = tuple(k for k in RESUME_MAY_CHANGE if k not in ("federation.rounds", "federation.final_evaluation"))


def config_changes(folder: Path, cmd: list[str]) -> list[str]:
    """The config keys in which the finished run in `folder` differs from what `cmd` would run
    (its run-config.json, else config.json; a folder with neither: ["config.json"])."""
    from fedtune.runconfig import RunConfig, load_run_config
    from fedtune.typedconfig import differences, from_dict, to_dict

    path = next((p for p in (folder / "run-config.json", folder / "config.json") if p.is_file()), None)
    if path is None:
        return ["config.json (missing)"]
    from fedtune.errors import ConfigError

    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    try:
        want = to_dict(load_run_config(cmd[2], sets))
    except ConfigError as exc:
        return [f"the row's own config ({exc})"]
    try:
        have = to_dict(from_dict(RunConfig, json.loads(path.read_text())))  # keys added since take their defaults
    except (ValueError, TypeError, KeyError) as exc:
        return [f"{path.name} (unreadable: {exc})"]
    return [k for k in differences(have, want) if not k.startswith(SAME_RUN)]


def _simulate(cmd: list[str]) -> int:
    exe = shutil.which("fedtune") or shutil.which("fedtune", path=str(Path(sys.executable).parent))
    if exe is None:
        raise SystemExit("fedtune: command not found (install the project: pip install -e .)")
    return subprocess.run([exe, *cmd[1:]], check=False).returncode


def main(argv: list[str] | None = None, simulate: Callable[[list[str]], int] = _simulate) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    keys = [k for k, _ in METHODS]
    parser.add_argument("--method", action="append", choices=keys, help="a table row (repeatable; default: each split's rows, every row but on a0.1sb)")
    parser.add_argument("--split", action="append", choices=list(SPLITS), help="a split (repeatable; default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--run", action="store_true", help="run what is not done yet (without it: only list)")
    parser.add_argument("--force", action="store_true", help="with --run: run again what is done")
    parser.add_argument("--runs", default="runs/pfl", help="folder of the run folders (default runs/pfl)")
    parser.add_argument("--summaries", default=str(ROOT / "results" / "pfl_fmnist" / "summaries"),
                        help="folder of METHOD_SPLIT_sSEED.json summaries (default: the stored ones)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds: must be at least 1")
    summaries, runs = Path(args.summaries), Path(args.runs)
    todo = plan(args.method, args.split or list(SPLITS), list(range(args.seeds)), summaries, runs)
    failed = []
    for name, cmd, done in todo:
        if not args.run or (done and not args.force):
            print(f"{'done' if done else 'to do':5}  {' '.join(cmd)}")
            continue
        folder = Path(cmd[-1])
        if folder.exists() and args.force:
            aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(aside)
            print(f"moved  {folder} -> {aside}")
        if (folder / "summary.json").is_file():
            changed = config_changes(folder, cmd)
            if changed:  # a stale run (an older config, another row's run) never becomes this row
                failed.append(f"{name} ({folder} holds a run whose config differs in {', '.join(changed[:6])}; --force runs it again)")
                continue
            print(f"copy   {folder / 'summary.json'} (finished earlier)")
            rc = 0
        else:
            if (folder / "checkpoint.safetensors").is_file():
                cmd = [*cmd, "--resume"]  # an interrupted run: go on from its last completed round
            elif (folder / "metrics.jsonl").is_file():  # stopped before its first checkpoint: nothing to go on from
                aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
                folder.rename(aside)
                print(f"moved  {folder} -> {aside} (stopped before its first checkpoint)")
            print(f"run    {' '.join(cmd)}", flush=True)
            rc = simulate(cmd)
        out = folder / "summary.json"
        if rc != 0 or not out.is_file():
            failed.append(f"{name} (exit {rc}; see {folder})")
            continue
        error = read_summary(out).get("error")
        if error:  # a run that failed (rounds without an accepted reply) still writes its summary: never a table row
            failed.append(f"{name} ({error}; see {folder}; --force runs it again)")
            continue
        summaries.mkdir(parents=True, exist_ok=True)
        tmp = summaries / f".{name}.json.tmp"  # a copy cut short never looks like a finished run's summary
        shutil.copyfile(out, tmp)
        replace_durably(tmp, summaries / f"{name}.json")
        for table in build(summaries, summaries.parent, mixed_seeds=True):  # rows part-way through their seeds
            print(f"       {table}")
    if failed:
        print("failed: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
