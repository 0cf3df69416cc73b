"""Compare finished runs side by side: their summaries and which blocks each client trained.

    python -m simulations.compare_runs --out COMPARISON.md LABEL=RUN_DIR [LABEL=RUN_DIR ...]

Runs with the same LABEL (e.g. one per seed) are averaged in the summary table; the block
table is printed for the first run of each label.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

SUMMARY_KEYS = (  # key, column, scale, decimals
    ("accuracy_global", "global acc. (%)", 100.0, 1),
    ("accuracy_global_before_head_fit", "before the head fit (%)", 100.0, 1),
    ("accuracy_global_local", "global, local tests (%)", 100.0, 1),
    ("accuracy_personalized", "personalized (%)", 100.0, 1),
    ("accuracy_personalized_worst10", "personalized, worst 10% (%)", 100.0, 1),
    ("bytes_up_ratio_vs_full_fedavg", "bytes up vs full FedAvg", 1.0, 3),
    ("traffic_ratio_vs_full_fedavg", "up + down vs full FedAvg", 1.0, 3),
    ("wall_time_s", "wall time (s)", 1.0, 0),
)

PFL_KEYS = (  # the personalized-FL protocol's table (--table pfl)
    ("accuracy_global_local", "global (%)", 100.0, 1),
    ("accuracy_global_local_std", "global std", 100.0, 1),
    ("accuracy_global_local_worst10", "global worst 10% (%)", 100.0, 1),
    ("accuracy_personalized", "personalized (%)", 100.0, 1),
    ("accuracy_personalized_std", "personalized std", 100.0, 1),
    ("accuracy_personalized_worst10", "personalized worst 10% (%)", 100.0, 1),
    ("personalized_at_least_global_fraction", "clients pers. >= global", 1.0, 2),
    ("bytes_up_total", "MiB up", 2.0**-20, 0),
    ("bytes_down_total", "MiB down", 2.0**-20, 0),
    ("traffic_ratio_vs_full_fedavg", "up + down vs full FedAvg", 1.0, 3),
    ("wall_time_s", "wall time (s)", 1.0, 0),
)

ROBUST_KEYS = (  # attacks, robust aggregation and differential privacy (--table robust)
    ("accuracy_global_before_head_fit", "global, before the head fit (%)", 100.0, 1),
    ("accuracy_global", "global (%)", 100.0, 1),
    ("accuracy_personalized", "personalized (%)", 100.0, 1),
    ("dp.epsilon", "DP epsilon", 1.0, 2),
    ("wall_time_s", "wall time (s)", 1.0, 0),
)
EXPORT_KEYS = (  # fedtune export folders (--table export): size, cost and accuracy against the dense model
    ("test_accuracy", "test acc. (%)", 100.0, 1),
    ("run_model_test_accuracy", "run model's test acc. (%)", 100.0, 1),
    ("agreement_with_run_model", "agrees with run model", 1.0, 3),
    ("bytes", "MiB", 2.0**-20, 2),
    ("dense_bytes", "dense MiB", 2.0**-20, 2),
    ("inference_flops_per_image", "MFLOP/image", 1e-6, 0),
    ("dense_inference_flops_per_image", "dense MFLOP/image", 1e-6, 0),
    ("onnx_max_abs_diff", "ONNX max diff", 1.0, 5),
)
TABLES = {"runs": SUMMARY_KEYS, "pfl": PFL_KEYS, "robust": ROBUST_KEYS, "tasks": (), "export": EXPORT_KEYS}
RESULT_FILES = ("summary.json", "probe.json", "export.json")  # what a folder may hold, in this order
TABLE_FILES = {"tasks": RESULT_FILES[:2], "export": RESULT_FILES[2:]}  # the files a table reads (others: summary.json)


def task_keys(runs: list[tuple[str, Path]]) -> tuple:
    """The multitask table's columns (--table tasks): each task's accuracy after and before
    the server's head fit, their means, and the largest reply as a fraction of the model.
    A folder with a probe.json (`fedtune probe`) gives the reference row: the head fit on
    the starting model, no training."""
    tasks: list[str] = []
    for _, run in runs:
        for task in _read(run).get("accuracy_per_task") or {}:
            tasks += [task] if task not in tasks else []
    keys = [(f"accuracy_per_task.{t}", f"{t} (%)", 100.0, 1) for t in tasks]
    keys += [("accuracy_global", "mean (%)", 100.0, 1)]
    keys += [(f"accuracy_per_task_before_head_fit.{t}", f"{t} before head fit (%)", 100.0, 1) for t in tasks]
    keys += [("accuracy_global_before_head_fit", "mean before head fit (%)", 100.0, 1),
             ("bytes_up_client_max_vs_model", "largest reply / model", 1.0, 3), ("wall_time_s", "wall time (s)", 1.0, 0)]
    return tuple(keys)


def read_summary(path: Path) -> dict:
    """A result file's JSON object; one that is missing, cut short or not an object ends the
    command with a message naming it, not a traceback."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: cannot read it as a result file ({exc})") from exc
    if not isinstance(summary, dict):
        raise SystemExit(f"{path}: not a result file (its JSON is a {type(summary).__name__}, not an object)")
    return summary


def _read(run: Path) -> dict:
    """A run's summary.json, a probe folder's probe.json or an export folder's export.json;
    `run` may also be such a file itself (a summary kept apart from its run folder)."""
    path = run if run.is_file() else next((run / f for f in RESULT_FILES if (run / f).is_file()), run / "summary.json")
    summary = read_summary(path)
    before = summary.get("accuracy_per_task_before_head_fit")
    if summary.get("accuracy_global_before_head_fit") is None and before and None not in before.values():
        # independent per-task federations summarised before they reported the mean themselves
        summary["accuracy_global_before_head_fit"] = sum(before.values()) / len(before)
    return summary


def _get(summary: dict, key: str):
    """summary[key], where a dotted key reads nested dicts ("dp.epsilon")."""
    for part in key.split("."):
        if not isinstance(summary, dict):
            return None
        summary = summary.get(part)
    return summary


def trained_blocks(run: Path) -> dict[tuple[int, str], dict[int, list[int]]]:
    """(partition id, profile) -> round -> the blocks that client trained (accepted replies)."""
    rows: dict[tuple[int, str], dict[int, list[int]]] = {}
    if not (run / "metrics.jsonl").is_file():
        raise SystemExit(f"{run}: no metrics.jsonl (the per-round records this table reads)")
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for c in rec.get("clients", []):
            if c.get("accepted"):
                blocks = [i for i, n in enumerate(c.get("block_updates") or []) if n]
                rows.setdefault((c["partition_id"], c["profile"]), {})[rec["round"]] = blocks
    return rows


def _cell(values: list[float], scale: float, decimals: int) -> str:
    """Mean ± sd (each run's value); a run without the value shows as "-" among them, so a
    cell never averages fewer runs than the row names unseen."""
    have = [v * scale for v in values if v is not None]
    if not have:
        return "-"
    if len(values) == 1:
        return f"{have[0]:.{decimals}f}"
    each = ", ".join("-" if v is None else f"{v * scale:.{decimals}f}" for v in values)
    if len(have) == 1:
        return f"{have[0]:.{decimals}f} ({each})"
    return f"{statistics.mean(have):.{decimals}f} ± {statistics.stdev(have):.{decimals}f} ({each})"


def compare(runs: list[tuple[str, Path]], keys: tuple = SUMMARY_KEYS, blocks: bool = True) -> str:
    by_label: dict[str, list[Path]] = {}
    for label, run in runs:
        by_label.setdefault(label, []).append(run)
    summaries = {label: [_read(r) for r in rs] for label, rs in by_label.items()}
    for label, rs in by_label.items():
        for run, summary in zip(rs, summaries[label], strict=True):
            if summary.get("error"):
                raise SystemExit(f"{run}: a failed run (its summary has 'error': {summary['error']}); it is no row of a comparison")
            if keys and all(_get(summary, k) is None for k, _, _, _ in keys):
                raise SystemExit(f"{run}: has none of this table's columns ({', '.join(k for k, _, _, _ in keys[:4])} ...): not a result of this kind")
            if blocks and "rounds" not in summary:
                raise SystemExit(f"{run}: its summary has no 'rounds' (independent task federations? use --table tasks)")
    lines = ["| run | runs | " + " | ".join(h for _, h, _, _ in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for label, sums in summaries.items():
        cells = [_cell([_get(s, k) for s in sums], scale, dec) for k, _, scale, dec in keys]
        lines.append(f"| {label} | {len(sums)} | " + " | ".join(cells) + " |")
    for label, rs in by_label.items() if blocks else ():
        rounds = summaries[label][0]["rounds"]
        lines += ["", f"Blocks each client trained per round, {label} (`{rs[0]}`):", ""]
        lines.append("| client | profile | " + " | ".join(f"round {r}" for r in range(1, rounds + 1)) + " |")
        lines.append("|---|---|" + "---|" * rounds)
        for (pid, profile), per_round in sorted(trained_blocks(rs[0]).items()):
            cells = [",".join(map(str, per_round.get(r, []))) or "none" for r in range(1, rounds + 1)]
            lines.append(f"| {pid} | {profile} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_privacy(runs: list[tuple[str, Path]], path: Path) -> None:
    """Accuracy (global, before any head fit) against the DP epsilon the accountant reported;
    runs without DP are drawn as a horizontal line (epsilon infinite)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_label: dict[str, list[tuple[float | None, float]]] = {}
    for label, run in runs:
        s = _read(run)
        # before the server's head fit where the run made one (what DP's noise does to the
        # trained model); a run without one has a single accuracy
        acc = s["accuracy_global_before_head_fit"] if s.get("accuracy_global_before_head_fit") is not None else s.get("accuracy_global")
        if acc is None:
            raise SystemExit(f"--plot-privacy: {run} has no global accuracy in its summary")
        by_label.setdefault(label, []).append((_get(s, "dp.epsilon"), acc))
    points, plain = [], []
    for label, rows in by_label.items():  # the runs of one label (its seeds): one point, their means, as the table
        acc = 100 * sum(a for _, a in rows) / len(rows)
        eps = [e for e, _ in rows if e is not None]
        if len(eps) not in (0, len(rows)):
            raise SystemExit(f"--plot-privacy: label {label!r} mixes runs with and without DP")
        if not eps:
            plain.append((acc, label))
        else:
            points.append((sum(eps) / len(eps), acc, label))
    if not points:
        raise SystemExit("--plot-privacy: no run has dp.epsilon in its summary.json")
    points.sort()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="client-level DP")
    for eps, acc, label in points:
        ax.annotate(label, (eps, acc), textcoords="offset points", xytext=(4, -10), fontsize=8)
    for acc, label in plain:
        ax.axhline(acc, ls="--", color="gray", lw=1)
        ax.annotate(f"{label} (epsilon infinite)", (points[0][0], acc), textcoords="offset points", xytext=(0, 3), fontsize=8, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (at the run's delta)")
    ax.set_ylabel("global accuracy (%)")
    ax.set_title("Accuracy against privacy spent")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR (a folder fedtune simulate wrote; with --table tasks also a fedtune probe folder; with --table export, fedtune export folders); every table but runs also takes LABEL=FILE.json, such a folder's result file copied elsewhere")
    parser.add_argument("--out", help="write the markdown here too")
    parser.add_argument("--plot-privacy", metavar="PNG", help="also plot accuracy against the runs' DP epsilon")
    parser.add_argument("--table", choices=tuple(TABLES), default="runs", help="runs: accuracy, bytes up and each client's blocks | pfl: the personalized-FL protocol's columns | robust: accuracy before and after the head fit, and DP's epsilon | tasks: each task's accuracy before and after the head fit | export: fedtune export folders' size, cost and accuracy")
    args = parser.parse_args(argv)
    runs = []
    wanted = TABLE_FILES.get(args.table, RESULT_FILES[:1])
    for spec in args.runs:
        label, sep, folder = spec.partition("=")
        # a table without the block rows also reads a result file kept apart from its folder
        as_file = args.table != "runs" and Path(folder).suffix == ".json" and Path(folder).is_file()
        if not sep or not (as_file or any((Path(folder) / f).is_file() for f in wanted)):
            files = " or ".join(wanted)
            parser.error(f"{spec!r}: expected LABEL=FOLDER with {files} in FOLDER"
                         + ("" if args.table == "runs" else ", or LABEL=FILE.json (such a file)"))
        runs.append((label, Path(folder)))
    keys = task_keys(runs) if args.table == "tasks" else TABLES[args.table]
    text = compare(runs, keys, blocks=args.table == "runs")
    if args.plot_privacy:
        plot_privacy(runs, Path(args.plot_privacy))
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
