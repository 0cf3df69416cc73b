"""`fedtune bench`: the methods side by side on one model, one data set, one process.

Every method starts from the same pretrained weights, trains for the same
number of epochs with the same seeds, and is measured in the same run:
median step time, training FLOPs per step, activation bytes saved for
backward, trainable parameters and final test accuracy (dense model, every
token), each also as a ratio against `full`. Writes bench.json and bench.md.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import DataConfig, load_data
from .errors import ConfigError
from .methods import METHOD_NAMES, MethodConfig, make_method, prepare_model
from .model import ModelConfig, build_model
from .pretrain import DEFAULT_BACKBONE, default_backbone
from .trainer import TrainConfig, Trainer
from .typedconfig import from_dict, to_dict

DEFAULT_METHODS = ["full", "head", "bsr", "alast", "sherl", "alast+lora"]


@dataclass
class BenchConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(pretrained="default"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, batch_size=64, head_lr=5e-3, flops_every=40, head_fit="after", head_fit_kind="lda"))
    method: MethodConfig = field(default_factory=MethodConfig)  # options shared by all methods (name ignored)
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))  # name or name+lora
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # accuracy is averaged over these
    task: str | None = None  # the task to fine-tune (None: the data set's first)

    def validate(self, prefix: str = "") -> None:
        for m in self.methods:
            base = m.removesuffix("+lora")
            if base not in METHOD_NAMES:
                raise ConfigError(f"{prefix}methods: unknown method {m!r}; choose from {', '.join(METHOD_NAMES)} (optionally +lora)")
        if "full" not in self.methods:
            raise ConfigError(f"{prefix}methods: must include 'full' (ratios are against it)")
        if not self.seeds:
            raise ConfigError(f"{prefix}seeds: need at least one seed")


def quick(cfg: BenchConfig) -> BenchConfig:
    """A variant that finishes in well under a minute (a smoke test of the whole bench)."""
    train = TrainConfig(**{**cfg.train.__dict__, "epochs": 1, "max_steps": 3, "flops_every": 2, "head_fit_samples": 128})
    data = DataConfig(**{**cfg.data.__dict__, "max_test": 120})
    return BenchConfig(**{**cfg.__dict__, "train": train, "data": data, "seeds": cfg.seeds[:1]})


def resolve_pretrained(model: ModelConfig) -> ModelConfig:
    """'default' means the shipped backbone (made by `fedtune pretrain`)."""
    if model.pretrained != "default":
        return model
    path = default_backbone()
    if path is None:
        raise ConfigError(f"model.pretrained: the default backbone {DEFAULT_BACKBONE} is missing; run `fedtune pretrain --out {DEFAULT_BACKBONE}`")
    return ModelConfig(**{**model.__dict__, "pretrained": str(path)})


def method_config(base: MethodConfig, spec: str) -> MethodConfig:
    name = spec.removesuffix("+lora")
    data = to_dict(base)
    data["name"] = name
    data["lora"]["enabled"] = spec.endswith("+lora")
    return from_dict(MethodConfig, data)


def run_bench(cfg: BenchConfig, out: Path, progress: bool = True) -> dict:
    cfg.validate("bench.")
    model_cfg = resolve_pretrained(cfg.model)
    data = load_data(cfg.data)
    task = cfg.task or data.train.tasks[0]
    num_classes = {task: data.train.num_classes[task]}
    results: dict[str, dict] = {}
    started = time.time()
    for spec in cfg.methods:
        runs = []
        for seed in cfg.seeds:
            torch.manual_seed(seed)
            model = build_model(model_cfg, num_classes)
            mcfg = method_config(cfg.method, spec)
            prepare_model(model, mcfg)
            method = make_method(mcfg, model, None, cfg.train.batch_size, task, seed=seed)
            tcfg = TrainConfig(**{**cfg.train.__dict__, "seed": seed})
            trainer = Trainer(model, method, tcfg, task)
            bar = _bar(spec, seed, progress)
            res = trainer.train(data.train, progress=(lambda d, t, s, b=bar: _tick(b, d, t, s)) if bar is not None else None)
            if bar is not None:
                bar.close()
            ev = trainer.evaluate(data.test)
            summary = res.summary()
            # the whole run's training compute: the steps plus any head fits (see train.head_fit)
            summary["train_flops_total"] = summary["train_flops_per_step"] * summary["steps"] + summary["head_fit_flops"]
            runs.append({**summary, "test_accuracy": ev["accuracy"], "test_loss": ev["loss"], "seed": seed, "plan": method.describe()})
        results[spec] = _combine(runs)
    full = results["full"]
    for r in results.values():
        r["ratios_vs_full"] = {
            "step_time": _ratio(r["step_time_s"], full["step_time_s"]),
            "train_flops": _ratio(r["train_flops_per_step"], full["train_flops_per_step"]),
            "train_flops_total": _ratio(r["train_flops_total"], full["train_flops_total"]),
            "activation_bytes": _ratio(r["activation_bytes"], full["activation_bytes"]),
            "trainable_params": _ratio(r["trainable_params"], full["trainable_params"]),
            "speedup": _ratio(full["step_time_s"], r["step_time_s"]),
            "accuracy_delta_points": round(100 * (r["test_accuracy"] - full["test_accuracy"]), 2),
        }
    report = {
        "config": to_dict(cfg),
        "model": model_cfg.name,
        "pretrained": model_cfg.pretrained,
        "data": cfg.data.name,
        "task": task,
        "train_size": len(data.train),
        "test_size": len(data.test),
        "seeds": cfg.seeds,
        "batch_size": cfg.train.batch_size,
        "epochs": cfg.train.epochs,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "wall_time_s": round(time.time() - started, 1),
        "methods": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.md").write_text(markdown_table(report))
    return report


def _combine(runs: list[dict]) -> dict:
    accs = [r["test_accuracy"] for r in runs]
    keys = ("step_time_s", "train_flops_per_step", "activation_bytes", "trainable_params", "trainable_state_bytes", "train_flops_total", "head_fit_s")
    out = {k: float(np.median([r[k] for r in runs])) for k in keys}
    out["activation_bytes"] = int(out["activation_bytes"])
    out["trainable_params"] = int(out["trainable_params"])
    out["test_accuracy"] = float(np.mean(accs))
    out["test_accuracy_std"] = float(np.std(accs))
    out["test_accuracy_per_seed"] = accs
    out["runs"] = runs
    return out


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else float("nan")


def markdown_table(report: dict) -> str:
    train = report["config"]["train"]
    head_fit = train.get("head_fit", "none")
    if head_fit != "none":
        head_fit += f" ({train.get('head_fit_kind', 'logistic')})"
    lines = [
        f"Model {report['model']}, data {report['data']} (task {report['task']}: {report['train_size']} train / "
        f"{report['test_size']} test images), batch {report['batch_size']}, {report['epochs']} epochs, seeds {report['seeds']}, "
        f"{report['torch_threads']} CPU threads; head fit: {head_fit}; "
        "ratios against full fine-tuning measured in the same run.",
        "",
        "| method | step time (s) | speed-up | train GFLOP/step | FLOPs vs full | activation MiB | act. vs full | trainable params | total FLOPs vs full | head fit (s) | test acc. (mean ± sd) | Δ acc. (pts) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["methods"].items():
        q = r["ratios_vs_full"]
        lines.append(
            f"| {name} | {r['step_time_s']:.3f} | {q['speedup']:.2f}x | {r['train_flops_per_step'] / 1e9:.1f} | {q['train_flops']:.3f} | "
            f"{r['activation_bytes'] / 2**20:.1f} | {q['activation_bytes']:.3f} | {r['trainable_params']:,} | "
            f"{q['train_flops_total']:.3f} | {r['head_fit_s']:.1f} | "
            f"{100 * r['test_accuracy']:.2f} ± {100 * r['test_accuracy_std']:.2f} | {q['accuracy_delta_points']:+.2f} |"
        )
    return "\n".join(lines) + "\n"


def _bar(spec: str, seed: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc=f"{spec} (seed {seed})", unit="step", leave=False)


def _tick(bar, done: int, total: int, stats) -> None:
    bar.total = total
    bar.update(1)
    bar.set_postfix(loss=f"{stats.loss:.3f}", s=f"{stats.step_time_s:.2f}")
