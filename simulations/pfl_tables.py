"""The personalized-FL protocol's tables (README "Personalization on Fashion-MNIST"), one per
split, built from the runs' summaries.

    python -m simulations.pfl_tables [SUMMARIES] [--out DIR]

SUMMARIES (default simulations/results/pfl_fmnist/summaries) holds each run's summary.json
copied as METHOD_SPLIT_sSEED.json, e.g. `fedrep_a0.1_s1.json` for `fedtune simulate
simulations/pfl/fedrep.yaml --set seed=1 --out runs/pfl/fedrep_a0.1_s1`. A row averages a
method's seeds; a method without a summary for a split is left out of that split's table.
The starting model's probe (`probe_SPLIT_sSEED.json`, a copy of `fedtune probe`'s probe.json)
comes first, as the reference of no training.
Writes table_alpha0.1.md, table_alpha0.5.md, table_pathological.md and
table_alpha0.1_self_balancing.md (split key a0.1sb: Dirichlet 0.1 drawn with PFLlib's
self-balancing rule) into DIR (default: the folder above SUMMARIES).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from simulations.compare_runs import PFL_KEYS, compare, read_summary

METHODS = (  # file-name key, row label (the configs in simulations/pfl/, then the default)
    ("local", "local only (full FT, no federation)"),
    ("fedavg", "FedAvg (full FT)"),
    ("fedavg_ft", "FedAvg + local fine-tuning"),
    ("fedper", "FedPer"),
    ("fedrep", "FedRep"),
    ("fedbabu", "FedBABU"),
    ("ditto", "Ditto (full FT)"),
    ("local_head", "personal linear head alone (full FT)"),
    ("fedrod", "FedRoD (full FT, balanced loss)"),
    ("alast_local_head", "ALaST, own blocks + personal linear heads alone"),
    ("alast_fedrod", "ALaST, own blocks + FedRoD heads"),
    ("alast_own", "ALaST, own blocks + closed-form LDA head"),
    ("alast_lora", "ALaST + LoRA, shared blocks + closed-form LDA head"),
    ("alast", "ALaST, shared blocks + closed-form LDA head (default)"),
)
# Reference rows from files that are not runs: `probe_SPLIT_sSEED.json` is `fedtune probe
# simulations/pfl_fmnist.yaml --set seed=SEED [split settings]` (its probe.json), the starting
# model with each client's closed-form head and no training; first in each table.
REFERENCES = (("probe", "starting model + closed-form head, no training (fedtune probe)"),)
# a0.1sb: Dirichlet 0.1 drawn with PFLlib's (and NIID-Bench's) self-balancing rule, a client over
# the average share getting none of the later classes (`partition.self_balancing`): the split
# behind PFLlib's leaderboard, with fewer classes per client than flwr-datasets' default draw
SPLITS = (("a0.1", "table_alpha0.1.md"), ("a0.5", "table_alpha0.5.md"), ("path", "table_pathological.md"),
          ("a0.1sb", "table_alpha0.1_self_balancing.md"))


def runs_of(summaries: Path, method: str, split: str) -> list[Path]:
    """The method's summaries for one split, by seed."""
    pattern = re.compile(rf"{re.escape(method)}_{re.escape(split)}_s(\d+)\.json")
    found = [(int(m.group(1)), p) for p in summaries.iterdir() if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _split_key(partition: dict) -> str:
    """A summary's partition as the file names' split key (a0.1, a0.5, path, a0.1sb)."""
    if partition.get("scheme") == "pathological":
        return "path"
    return f"a{partition.get('alpha')}" + ("sb" if partition.get("self_balancing") else "")


def check_runs(runs: list[tuple[str, Path]], split: str, mixed_seeds: bool = False) -> None:
    """Refuse a table that would average a failed run, rows over different seeds (unless
    `mixed_seeds`), or a file whose name says another seed or split than its run had: a summary
    records its seed and partition (older ones do not, so then the clients' local test sizes of
    every file of one seed must agree, as one partition gives them)."""
    seeds: dict[str, list[int]] = {}
    clients: dict[int, tuple[Path, dict]] = {}
    shape: dict[str, tuple[Path, object]] = {}  # the run shape every row of a table shares (what run_identity records)
    for label, p in runs:
        summary = read_summary(p)
        for key in ("num_clients", "num_new_clients", "data"):
            if summary.get(key) is not None:
                first = shape.setdefault(key, (p, summary[key]))
                if first[1] != summary[key]:
                    raise SystemExit(f"{p}: its {key} ({summary[key]}) differs from {first[0].name}'s ({first[1]}) in the same table")
        if "error" in summary:
            raise SystemExit(f"{p}: a failed run (its summary has 'error'); remove it or run it again")
        seed = int(p.stem.rsplit("_s", 1)[1])
        if "seed" in summary and summary["seed"] != seed:
            raise SystemExit(f"{p}: named seed {seed}, but its run had seed {summary['seed']}")
        if "partition" in summary and _split_key(summary["partition"]) != split:
            raise SystemExit(f"{p}: named split {split}, but its run's partition is {_split_key(summary['partition'])}")
        sizes = {c["partition_id"]: c["num_examples"] for c in summary.get("clients", [])}
        first_sizes = clients.setdefault(seed, (p, sizes))
        if any(first_sizes[1][pid] != n for pid, n in sizes.items() if pid in first_sizes[1]):  # a client a run did not evaluate is no mismatch
            raise SystemExit(f"{p}: its clients' local test sizes differ from {first_sizes[0].name}'s, of the same split and seed: "
                             "not the same partition (a file under the wrong name?)")
        seeds.setdefault(label, []).append(seed)
    sets = {tuple(v) for v in seeds.values()}
    if len(sets) > 1:
        message = f"split {split}: the rows are over different seeds ({'; '.join(f'{k}: {v}' for k, v in seeds.items())})"
        if not mixed_seeds:
            raise SystemExit(f"{message}; compare methods on the same seeds, or pass --mixed-seeds")
        print(f"warning: {message}", file=sys.stderr)


def build(summaries: Path, out: Path, mixed_seeds: bool = False) -> list[Path]:
    written = []
    for split, name in SPLITS:
        runs = [(label, p) for key, label in REFERENCES + METHODS for p in runs_of(summaries, key, split)]
        check_runs(runs, split, mixed_seeds)
        if runs:
            out.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(compare(runs, PFL_KEYS, blocks=False))
            written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="?", default="simulations/results/pfl_fmnist/summaries",
                        help="folder of METHOD_SPLIT_sSEED.json summaries")
    parser.add_argument("--out", help="folder for the tables (default: the one above SUMMARIES)")
    parser.add_argument("--mixed-seeds", action="store_true", help="build tables whose rows are over different seeds (with a warning)")
    args = parser.parse_args(argv)
    summaries = Path(args.summaries)
    if not summaries.is_dir():
        parser.error(f"{summaries}: no such folder of summaries")
    written = build(summaries, Path(args.out) if args.out else summaries.parent, args.mixed_seeds)
    if not written:
        parser.error(f"{summaries}: no METHOD_SPLIT_sSEED.json summary for any of {', '.join(k for k, _ in METHODS)}")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
