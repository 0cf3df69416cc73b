"""Run outputs people can open: metrics.jsonl per round, summary.json, PNG plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def rss_bytes() -> tuple[int, int]:
    """(this process's RSS, RSS of this process and all its descendants, e.g. Ray workers)."""
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return me.memory_info().rss, total


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: ignore it
                continue
    return out


def replace_durably(tmp: Path, path: Path) -> None:
    """Move a fully written `tmp` onto `path` so that a crash or power loss leaves either the
    old file or the new one: the data reach the disk before the rename, the rename before
    returning."""
    fd = os.open(tmp, os.O_RDWR)  # fsync needs a handle open for writing on Windows
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a platform whose folders cannot be opened (Windows): the rename stands
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2))


def write_text(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file: a crash leaves the earlier file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    replace_durably(tmp, path)


def save_figure(fig: Any, path: Path, **kwargs: Any) -> None:
    """A matplotlib figure into `path` (its format from the suffix) through a temporary file,
    so that a crash mid-write leaves the earlier plot, not a truncated one."""
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)
    replace_durably(tmp, path)


def plot_run(rounds: list[dict[str, Any]], out: Path, depth: int, moe_blocks: list[int] | None = None) -> list[Path]:
    """Accuracy per round, bytes per round against full FedAvg, the trained-blocks heatmap and,
    for an MoE model, expert usage per task and per client."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    r = [x["round"] for x in rounds]

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(r, [100 * x["accuracy_global"] for x in rounds], marker="o", label="global (central test)")
    pers = [(x["round"], x.get("accuracy_personalized")) for x in rounds if x.get("accuracy_personalized") is not None]
    if pers:
        ax.plot([p[0] for p in pers], [100 * p[1] for p in pers], marker="s", label="personalized (clients' local tests)")
    ax.set_xticks(r)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out / "accuracy.png")
    save_figure(fig, paths[-1], dpi=120)
    plt.close(fig)

    rr = [x for x in rounds if x["round"] > 0]
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.2
    x0 = np.array([x["round"] for x in rr], dtype=float)
    bars = (("bytes_up", "up (this run)", -1.5, "tab:blue"), ("bytes_up_full_fedavg", "up, full-model FedAvg", -0.5, "lightsteelblue"),
            ("bytes_down", "down (this run)", 0.5, "tab:orange"), ("bytes_down_full_fedavg", "down, full-model FedAvg", 1.5, "navajowhite"))
    for key, label, offset, colour in bars:
        ax.bar(x0 + offset * w, [x.get(key, 0) / 2**20 for x in rr], w, label=label, color=colour)
    ax.set_xticks([x["round"] for x in rr])
    ax.set_xlabel("round")
    ax.set_ylabel("MiB per round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "bytes.png")
    save_figure(fig, paths[-1], dpi=120)
    plt.close(fig)

    rows, labels = [], []
    for x in rr:
        for c in sorted(x.get("clients", []), key=lambda c: c.get("partition_id", -1)):
            if c.get("accepted") is False:  # a rejected reply trained nothing the model kept
                continue
            updates = c.get("block_updates")
            if updates:
                steps = max(1, c.get("steps", 1))
                rows.append([u / steps for u in updates])
                labels.append(f"r{x['round']} c{c.get('partition_id')}")
    if rows:
        # a row per client round, up to a readable page (long runs of many clients: every k-th label)
        fig, ax = plt.subplots(figsize=(6, min(24, max(3, 0.18 * len(rows)))))
        im = ax.imshow(np.array(rows), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(depth))
        ax.set_xlabel("block")
        stride = max(1, -(-len(labels) // 130))
        ax.set_yticks(range(0, len(labels), stride))
        ax.set_yticklabels(labels[::stride], fontsize=5)
        ax.set_title("share of local steps that trained each block")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths.append(out / "blocks.png")
        save_figure(fig, paths[-1], dpi=120)
        plt.close(fig)
    if moe_blocks:
        paths += _plot_experts(rounds, out, moe_blocks, plt)
    return paths


def _plot_experts(rounds: list[dict[str, Any]], out: Path, moe_blocks: list[int], plt) -> list[Path]:
    """experts_per_task.png / experts_per_client.png: per MoE block, the share of each task's
    (client's) routed tokens that went to each expert over the run, on one colour scale, with
    the percentages written in the cells when the grid is small enough to read them."""
    per_task: dict[str, np.ndarray] = {}
    per_client: dict[int, np.ndarray] = {}
    client_label: dict[int, str] = {}
    for r in rounds:
        for c in r.get("clients", []):
            if c.get("accepted") is False:
                continue
            for task, flat in (c.get("experts") or {}).items():
                counts = np.asarray(flat, dtype=float).reshape(len(moe_blocks), -1)
                per_task[task] = per_task.get(task, 0) + counts
                per_client[c["partition_id"]] = per_client.get(c["partition_id"], 0) + counts
                client_label[c["partition_id"]] = f"client {c['partition_id']} ({c.get('profile', '?')}: {', '.join(c.get('tasks') or (c.get('experts') or {}))})"
    if not per_task:
        return []
    paths = []
    for name, table in (("experts_per_task", per_task), ("experts_per_client", per_client)):
        keys = sorted(table, key=str)
        shares = {b: np.array([table[k][j] / max(table[k][j].sum(), 1) for k in keys]) for j, b in enumerate(moe_blocks)}
        top = max(float(m.max()) for m in shares.values()) or 1.0
        experts = next(iter(shares.values())).shape[1]
        annotate = experts <= 16 and len(keys) <= 16
        fig, axes = plt.subplots(1, len(moe_blocks), figsize=(0.45 * experts * len(moe_blocks) + 3.5, 0.45 * len(keys) + 1.8), squeeze=False)
        for j, b in enumerate(moe_blocks):
            ax = axes[0, j]
            im = ax.imshow(100 * shares[b], aspect="auto", cmap="Blues", vmin=0, vmax=100 * top)
            ax.set_title(f"block {b}")
            ax.set_xlabel("expert")
            ax.set_xticks(range(experts))
            ax.set_yticks(range(len(keys)))
            ax.set_yticklabels([str(k) if name.endswith("task") else client_label.get(k, f"client {k}") for k in keys] if j == 0 else [], fontsize=7)
            if annotate:
                for (y, x), v in np.ndenumerate(shares[b]):
                    ax.text(x, y, f"{100 * v:.0f}", ha="center", va="center", fontsize=6, color="white" if v > 0.6 * top else "black")
        fig.colorbar(im, ax=list(axes[0]), label="% of the routed tokens (before capacity)", fraction=0.03)
        fig.suptitle("share of each " + name.split("_")[-1] + "'s routed tokens per expert, over the run (uniform: " + f"{100 / experts:.3g}%)", y=1.04)
        paths.append(out / f"{name}.png")
        save_figure(fig, paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return paths


def run_identity(cfg: Any) -> dict[str, Any]:
    """What makes two runs' numbers comparable: the seed, the partition, the clients (training
    and new: the partition is over both) and the data (source, seed, caps, size). Summaries and probes carry it; simulations.pfl_tables checks it."""
    from .typedconfig import to_dict

    data = to_dict(cfg.data)
    return {"seed": cfg.seed, "partition": to_dict(cfg.partition), "num_clients": cfg.federation.num_clients, "num_new_clients": cfg.federation.new_clients,
            "data": {k: data[k] for k in ("name", "seed", "max_train", "max_test", "img_size")}}


def protocol_numbers(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the clients' evaluations: each client's global and personalized accuracy on its
    local test split, their examples-weighted means, standard deviations and worst-10% means."""
    clients = sorted(({"partition_id": int(e.get("partition_id", -1)), "num_examples": e.get("num_examples"),
                       "accuracy_global_local": e.get("accuracy_global"), "accuracy_personalized": e.get("accuracy_personal")} for e in evals),
                     key=lambda c: c["partition_id"])
    out: dict[str, Any] = {"clients": clients}
    for key in ("accuracy_global_local", "accuracy_personalized"):
        have = [c for c in clients if c[key] is not None]
        accs = np.array([c[key] for c in have], dtype=float)
        weights = np.array([c["num_examples"] for c in have], dtype=float)
        worst = np.sort(accs)[: max(1, int(np.ceil(0.1 * len(accs))))] if len(accs) else accs
        out[key] = float((accs * weights).sum() / weights.sum()) if len(accs) and weights.sum() > 0 else None
        out[f"{key}_std"] = float(accs.std()) if len(accs) else None
        out[f"{key}_worst10"] = float(worst.mean()) if len(worst) else None
    both = [c for c in clients if c["accuracy_personalized"] is not None and c["accuracy_global_local"] is not None]
    out["personalized_at_least_global_fraction"] = sum(c["accuracy_personalized"] >= c["accuracy_global_local"] for c in both) / len(both) if both else None
    return out
