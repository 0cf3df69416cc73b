"""`fedtune bench`: the methods side by side on one model, one data set, one process.

Every method starts from the same pretrained weights, trains on the same data for the
same number of epochs with the same seeds, and is measured in the same run: median step
time, training FLOPs per step, activation bytes saved for backward, trainable parameters,
planning time, and test accuracy four ways: with every token or with the method's own
tokens dropped (what a device that also infers cheaply gets), each with the head as
trained and with a discriminant (LDA) head fitted on the training set's features. Ratios
are against `full`. With `budgets`, each method also runs at fractions of full
fine-tuning's total training FLOPs (accuracy against compute). Writes bench.json, bench.md
and plots/.

`--cost-only` measures costs alone (random weights and images, a few steps per method, one
process per method so each peak RSS is its own): the papers' scale, e.g. ViT-B/16 at 224.
"""

from __future__ import annotations

import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .accounting import flop_counter_mode
from .data import DataConfig, DataSplit, ImageSet, load_data
from .errors import ConfigError, FedtuneError, PlanError
from .heads import class_stats, extract_features, lda_head
from .methods import METHOD_NAMES, Method, MethodConfig, make_method, prepare_model
from .model import FedViT, ModelConfig, build_model, check_takes_images
from .profiles import UNLIMITED, DeviceProfile, get_profile
from .report import save_figure, write_json, write_text
from .trainer import TrainConfig, Trainer
from .typedconfig import check_choices, deep_merge, from_dict, to_dict
from .weights import resolve_pretrained

DEFAULT_METHODS = ["full", "head", "bsr", "alast", "sherl", "alast+lora"]
Headline = Literal["lda", "none"]

# Named method settings a bench can list beside the plain method names (overrides of `method`).
DEFAULT_VARIANTS: dict[str, dict] = {
    # ALaST at the tight budget: at most 1/8 of full fine-tuning's memory, fewer tokens
    "alast_tight": {"name": "alast", "alast": {"memory_fraction": 0.1, "mean_budget": 0.5}},
    # the ablation: the same number of trained blocks and token budget, blocks fixed (the last
    # ones that fit), budgets uniform and never adapted
    "alast_fixed": {"name": "alast", "alast": {"adapt": False, "select": "last"}},
    # ALaST with the budget rule of its public re-implementations: b += alpha (Δ_t - Δ_{t-1}), clipped
    "alast_delta": {"name": "alast", "alast": {"update": "delta"}},
}


@dataclass
class BenchConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(pretrained="default"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, batch_size=64, head_lr=5e-3, flops_every=40))
    method: MethodConfig = field(default_factory=MethodConfig)  # options shared by all methods (name ignored)
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))  # name, name+lora, or a variant
    variants: dict[str, dict] = field(default_factory=dict)  # name -> method overrides, added to (or replacing) DEFAULT_VARIANTS
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # accuracy is averaged over these
    task: str | None = None  # the task to fine-tune (None: the data set's first)
    headline: Headline = "lda"  # test_accuracy is every token with this head: lda (fitted after training) | none (as trained)
    head_fit_samples: int | None = None  # fit the LDA head on at most this many training images (None: all)
    budgets: list[float] = field(default_factory=list)  # also run each method at these fractions of full's total training FLOPs
    budget_seeds: list[int] | None = None  # seeds of the budget runs (None: all seeds)
    eval_autocast: bool = False  # evaluate (features for the head fit and the test) in bfloat16 autocast
    cost_steps: int = 6  # --cost-only: steps per method (the first counts FLOPs and warms up; the median of the rest is the step time)
    device: Literal["cpu", "cuda"] = "cpu"  # where the accuracy runs train and evaluate (--cost-only uses CUDA when present)
    profile: str | None = None  # a device profile every method plans within (None: no limit: the bench compares methods, not devices)

    def __post_init__(self) -> None:
        # a config's own variants add to the named ones (a name given again replaces that one)
        self.variants = {**{k: dict(v) for k, v in DEFAULT_VARIANTS.items()}, **self.variants}

    def check_data(self, prefix: str = "") -> None:
        """The model takes the images the data gives (a training bench; --cost-only makes its own)."""
        check_takes_images(self.model, self.data.img_size, self.data.channels, prefix)

    def validate(self, prefix: str = "") -> None:
        for m in self.methods:
            base = m.removesuffix("+lora")
            if base not in METHOD_NAMES and base not in self.variants:
                raise ConfigError(f"{prefix}methods: unknown method {m!r}; choose from {', '.join(METHOD_NAMES)} (optionally +lora) or a variant ({', '.join(self.variants)})")
        for name, spec in self.variants.items():
            if not isinstance(spec, dict) or spec.get("name") not in METHOD_NAMES:
                raise ConfigError(f"{prefix}variants.{name}: needs a 'name' key naming one of {', '.join(METHOD_NAMES)}")
        for m in self.methods:  # each method's settings read now, not when its turn comes after hours of the others
            try:
                method_config(self.method, m, self.variants)
            except ConfigError as exc:
                raise ConfigError(f"{prefix}methods: {m}: {exc}") from exc
        if self.train.epochs < 1:
            raise ConfigError(f"{prefix}train.epochs: must be >= 1 (the bench trains every method for them), got {self.train.epochs}")
        if "full" not in self.methods:
            raise ConfigError(f"{prefix}methods: must include 'full' (ratios are against it)")
        if not self.seeds:
            raise ConfigError(f"{prefix}seeds: need at least one seed")
        check_choices(self, prefix)
        for b in self.budgets:
            if not b > 0:
                raise ConfigError(f"{prefix}budgets: fractions of full's training FLOPs must be positive, got {b}")
        if self.head_fit_samples is not None and self.head_fit_samples < 2:
            raise ConfigError(f"{prefix}head_fit_samples: must be >= 2 or null, got {self.head_fit_samples}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{prefix}device: 'cuda' but torch sees no CUDA device here; use 'cpu'")
        if self.profile is not None:
            get_profile(self.profile)  # an unknown name is a ConfigError naming the known ones
        if self.cost_steps < 3:
            raise ConfigError(f"{prefix}cost_steps: must be >= 3 (the first counts FLOPs and warms up, the rest are timed), got {self.cost_steps}")


BUDGET_TOLERANCE = 1.5  # a budget point within this factor of a method's equal-epoch run reuses that run


def bench_profile(cfg: BenchConfig) -> DeviceProfile:
    """The profile the bench's methods plan within, resolved once per bench (`auto` measures
    this machine's free memory, which changes as the bench runs): `cfg.profile`, or none that
    binds (a plan for ViT-B at 224 and a large batch passes the workstation profile's 16 GiB,
    and BSR would drop blocks to fit it: the row would no longer be BSR's plan)."""
    return get_profile(cfg.profile) if cfg.profile else UNLIMITED


def method_profile(spec: str, profile: DeviceProfile) -> DeviceProfile:
    """What `spec` plans within: `full`, the reference every ratio is against, without a limit
    (its plan never shrinks, and what fits a small device is what the other methods are for);
    every other method within the bench's `profile`."""
    return UNLIMITED if spec == "full" else profile


def check_plans(cfg: BenchConfig, model_cfg: ModelConfig, num_classes: int, profile: DeviceProfile) -> None:
    """Build every method's plan before the first one trains, so that a method whose plan
    cannot fit `profile` is named now, not after hours of training the others."""
    if profile is UNLIMITED:
        return
    for spec in cfg.methods:
        model = build_model(replace(model_cfg, pretrained=None), {"task": num_classes})
        mcfg = method_config(cfg.method, spec, cfg.variants)
        prepare_model(model, mcfg)
        try:
            make_method(mcfg, model, method_profile(spec, profile), cfg.train.batch_size, "task")
        except PlanError as exc:
            raise ConfigError(f"bench.profile: {profile.name!r}: method {spec}: {exc} (every method but full plans within the profile)") from exc


def quick(cfg: BenchConfig) -> BenchConfig:
    """A variant that finishes in well under a minute (a smoke test of the whole bench)."""
    train = replace(cfg.train, epochs=1, max_steps=3, flops_every=2)
    data = replace(cfg.data, max_test=120, max_train=min(cfg.data.max_train or 256, 256))
    return replace(cfg, train=train, data=data, seeds=cfg.seeds[:1], budgets=cfg.budgets[:1], budget_seeds=None, head_fit_samples=128)


def method_config(base: MethodConfig, spec: str, variants: dict[str, dict] | None = None) -> MethodConfig:
    """The method config of `spec`: a method name or a variant, with +lora for LoRA adapters."""
    name = spec.removesuffix("+lora")
    data = to_dict(base)
    if variants and name in variants:
        data = deep_merge(data, variants[name])
    else:
        data["name"] = name
    if spec.endswith("+lora"):
        data["lora"]["enabled"] = True
    return from_dict(MethodConfig, data)


# --------------------------------------------------------------------------- evaluation


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else float("nan")


def evaluate_method(model: FedViT, method: Method, train: ImageSet, test: ImageSet, task: str, cfg: BenchConfig) -> dict:
    """Test accuracy with every token and with the method's dropped tokens, each with the head
    as trained and with an LDA head fitted on the training features of the same plan."""
    fit_set = train
    n = cfg.head_fit_samples
    if n is not None and len(train) > n:
        fit_set = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n])
    head = model.heads[task]
    out: dict[str, dict] = {}
    bs = cfg.train.eval_batch_size
    for tokens, drop in (("all_tokens", False), ("dropped_tokens", True)):
        if drop and not method.drops_tokens:
            continue
        plan = method.inference_plan(drop)
        start = time.perf_counter()
        feats, labels = extract_features(model, test, task, bs, plan, cfg.eval_autocast)
        with torch.no_grad():
            no_fit = _accuracy(head(feats.to(head.weight.dtype)), labels)
        counter = flop_counter_mode()
        with counter:
            fit_feats, fit_labels = extract_features(model, fit_set, task, bs, plan, cfg.eval_autocast)
        feats, labels = feats.cpu(), labels.cpu()
        w, b = lda_head(class_stats(fit_feats.cpu(), fit_labels.cpu(), head.out_features))
        out[tokens] = {
            "no_head_fit": no_fit,
            "lda_head_fit": _accuracy(feats @ w.T + b, labels),
            "head_fit_flops": float(counter.get_total_flops()),
            "eval_s": round(time.perf_counter() - start, 2),
        }
    return out


def headline_accuracy(evals: dict, headline: str) -> float:
    return evals["all_tokens"]["lda_head_fit" if headline == "lda" else "no_head_fit"]


# --------------------------------------------------------------------------- runs


def _run_one(cfg: BenchConfig, model_cfg: ModelConfig, data, task: str, spec: str, seed: int, max_steps: int | None, progress: bool, profile: DeviceProfile) -> dict:
    torch.manual_seed(seed)
    model = build_model(model_cfg, {task: data.train.num_classes[task]})
    mcfg = method_config(cfg.method, spec, cfg.variants)
    prepare_model(model, mcfg)
    model.to(cfg.device)
    method = make_method(mcfg, model, method_profile(spec, profile), cfg.train.batch_size, task, seed=seed)
    tcfg = replace(cfg.train, seed=seed)
    if max_steps is not None:
        per_epoch = math.ceil(len(data.train) / tcfg.batch_size)
        tcfg = replace(tcfg, epochs=max(1, math.ceil(max_steps / per_epoch)), max_steps=max_steps)
    trainer = Trainer(model, method, tcfg, task)
    bar = _bar(f"{spec} (seed {seed})", progress)
    res = trainer.train(data.train, progress=(lambda d, t, s, b=bar: _tick(b, d, t, s)) if bar is not None else None)
    if bar is not None:
        bar.close()
    summary = res.summary()
    evals = evaluate_method(model, method, data.train, data.test, task, cfg)
    # the run's training compute: its steps, any head fit training itself did (train.head_fit: before, LP-FT)
    # and the forward passes that chose blocks or experts before it (ALaST's survey_batches, an MoE's train_experts)
    summary["train_head_fit_flops"] = summary["head_fit_flops"]
    summary["train_flops_total"] = summary["train_flops_per_step"] * summary["steps"] + summary["train_head_fit_flops"] + summary["survey_flops"]
    summary["head_fit_flops"] = evals["all_tokens"]["head_fit_flops"]  # the evaluation's LDA fit: one feature pass (every token)
    return {**summary, "test_accuracy": headline_accuracy(evals, cfg.headline), "evaluations": evals, "seed": seed, "plan": method.describe()}


def on_device(data: DataSplit, device: str) -> DataSplit:
    """`data` with its train and test sets on `device` (itself on the CPU)."""
    return data if device == "cpu" else replace(data, train=data.train.to(device), test=data.test.to(device))


def run_bench(cfg: BenchConfig, out: Path, progress: bool = True, command: str | None = None) -> dict:
    cfg.validate("bench.")
    cfg.check_data("bench.")
    model_cfg = resolve_pretrained(cfg.model)
    data = on_device(load_data(cfg.data), cfg.device)
    task = cfg.task or data.train.tasks[0]
    if task not in data.train.tasks:
        raise ConfigError(f"bench.task: {task!r} is not a task of the data set {cfg.data.name}; it has {', '.join(data.train.tasks)}")
    profile = bench_profile(cfg)
    check_plans(cfg, model_cfg, data.train.num_classes[task], profile)
    results: dict[str, dict] = {}
    started = time.time()
    total = len(cfg.methods) * len(cfg.seeds)
    done = 0
    for spec in cfg.methods:
        runs = []
        for seed in cfg.seeds:
            t0 = time.time()
            runs.append(_run_one(cfg, model_cfg, data, task, spec, seed, None, progress, profile))
            done += 1
            _log(progress, f"[{done}/{total}] {spec} seed {seed}: {100 * runs[-1]['test_accuracy']:.2f}% ({time.time() - t0:.0f} s)")
        results[spec] = _combine(runs)
    full = results["full"]
    for r in results.values():
        r["ratios_vs_full"] = _ratios(r, full)
        r["budgets"] = []
    for fraction in cfg.budgets:
        target = fraction * full["train_flops_total"]
        for spec, r in results.items():
            own = r["train_flops_total"]
            if max(target / own, own / target) < BUDGET_TOLERANCE:  # the equal-epoch run is this point already (bench.md says so)
                continue
            steps = max(1, round((target - r["train_head_fit_flops"] - r.get("survey_flops", 0.0)) / max(r["train_flops_per_step"], 1.0)))
            runs = []
            for seed in cfg.budget_seeds or cfg.seeds:
                t0 = time.time()
                runs.append(_run_one(cfg, model_cfg, data, task, spec, seed, steps, progress, profile))
                _log(progress, f"[budget {fraction:g}x full] {spec} seed {seed}, {steps} steps: {100 * runs[-1]['test_accuracy']:.2f}% ({time.time() - t0:.0f} s)")
            point = _combine(runs)
            point.pop("runs")
            point["fraction_of_full"] = fraction
            point["steps"] = steps
            point["seeds"] = [x["seed"] for x in runs]
            r["budgets"].append(point)
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
        "device": cfg.device if cfg.device == "cpu" else torch.cuda.get_device_name(0),
        "wall_time_s": round(time.time() - started, 1),
        **provenance(command),
        "methods": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", report)
    write_text(out / "bench.md", markdown_table(report))
    plot_bench(report, out / "plots")
    return report


def provenance(command: str | None = None) -> dict:
    """How a result was made: the command line (`command`, else this process's), the fedtune
    commit (where it runs from a git checkout) and the versions that decide the numbers."""
    import subprocess

    import timm

    try:
        here = Path(__file__).resolve().parent
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        # fedtune's own checkout only (not a repository it happens to be installed inside), marked -dirty when it has changes
        commit = (subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
                  if top and Path(top) == here.parent else "") or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "commit": commit,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                     "cuda": torch.version.cuda if torch.cuda.is_available() else None},
    }


def _log(enabled: bool, line: str) -> None:
    if enabled:
        print(line, file=sys.stderr, flush=True)


_MEDIAN_KEYS = ("step_time_s", "train_flops_per_step", "activation_bytes", "trainable_params", "trainable_state_bytes", "train_flops_total", "head_fit_s", "head_fit_flops", "train_head_fit_flops", "survey_flops", "plan_time_s", "blocks_trained_mean")


def _combine(runs: list[dict]) -> dict:
    accs = [r["test_accuracy"] for r in runs]
    out = {k: float(np.median([r[k] for r in runs])) for k in _MEDIAN_KEYS}
    out["activation_bytes"] = int(out["activation_bytes"])
    out["trainable_params"] = int(out["trainable_params"])
    out["test_accuracy"] = float(np.mean(accs))
    out["test_accuracy_std"] = float(np.std(accs))
    out["test_accuracy_per_seed"] = accs
    evaluations: dict[str, dict] = {}
    for tokens in runs[0]["evaluations"]:
        evaluations[tokens] = {}
        for key in ("no_head_fit", "lda_head_fit"):
            vals = [r["evaluations"][tokens][key] for r in runs]
            evaluations[tokens][key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "per_seed": vals}
    out["evaluations"] = evaluations
    out["block_choice_freq"] = [float(v) for v in np.mean([r["block_choice_freq"] for r in runs], axis=0)]
    out["runs"] = runs
    return out


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else float("nan")


def _ratios(r: dict, full: dict) -> dict:
    return {
        "step_time": _ratio(r["step_time_s"], full["step_time_s"]),
        "train_flops": _ratio(r["train_flops_per_step"], full["train_flops_per_step"]),
        "train_flops_total": _ratio(r["train_flops_total"], full["train_flops_total"]),
        "activation_bytes": _ratio(r["activation_bytes"], full["activation_bytes"]),
        "trainable_params": _ratio(r["trainable_params"], full["trainable_params"]),
        "speedup": _ratio(full["step_time_s"], r["step_time_s"]),
        "accuracy_delta_points": round(100 * (r["test_accuracy"] - full["test_accuracy"]), 2),
    }


def _acc(r: dict, tokens: str, key: str) -> str:
    e = r["evaluations"].get(tokens)
    if e is None:
        return "="
    return f"{100 * e[key]['mean']:.2f} ± {100 * e[key]['std']:.2f}"


def markdown_table(report: dict) -> str:
    headline = "with the LDA head fit" if report["config"].get("headline", "lda") == "lda" else "with the head as trained"
    lines = [
        f"Model {report['model']} ({Path(str(report['pretrained'])).name if report['pretrained'] else 'random init'}), data {report['data']} "
        f"(task {report['task']}: {report['train_size']} train / {report['test_size']} test images), batch {report['batch_size']}, "
        f"{report['epochs']} epochs, seeds {report['seeds']}, {report.get('device', 'cpu')}, {report['torch_threads']} CPU threads, {report['wall_time_s']:.0f} s in all. "
        "Ratios against full fine-tuning measured in the same run. Test accuracy (mean ± sd over the seeds, the population sd: n in the denominator) with every token "
        "and with the method's own tokens dropped at test time ('=': the method drops none), each with the head as trained "
        f"and with a discriminant head fitted on the training features; Δ is the headline (every token, {headline}) against full.",
        "",
        "| method | step time (s) | speed-up | train GFLOP/step | FLOPs vs full | activation MiB | act. vs full | trainable params | plan ms/step | blocks/step | all tokens, no fit | all tokens, LDA fit | dropped, no fit | dropped, LDA fit | Δ (pts) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["methods"].items():
        q = r["ratios_vs_full"]
        lines.append(
            f"| {name} | {r['step_time_s']:.3f} | {q['speedup']:.2f}x | {r['train_flops_per_step'] / 1e9:.1f} | {q['train_flops']:.3f} | "
            f"{r['activation_bytes'] / 2**20:.1f} | {q['activation_bytes']:.3f} | {r['trainable_params']:,} | "
            f"{1000 * r['plan_time_s']:.1f} | {r['blocks_trained_mean']:.2f} | "
            f"{_acc(r, 'all_tokens', 'no_head_fit')} | {_acc(r, 'all_tokens', 'lda_head_fit')} | "
            f"{_acc(r, 'dropped_tokens', 'no_head_fit')} | {_acc(r, 'dropped_tokens', 'lda_head_fit')} | {q['accuracy_delta_points']:+.2f} |"
        )
    points = budget_rows(report)
    if points:
        lines += [
            "",
            "Accuracy against compute: each method also trained at these fractions of full fine-tuning's total training FLOPs "
            "(steps scaled; the same schedule, data and seeds), headline accuracy. A method whose equal-epoch run already lies "
            f"within {BUDGET_TOLERANCE:g}x of a fraction is not trained again for it: its row there is the equal-epoch run, "
            "at the fraction it measured (after the arrow), over the bench's seeds.",
            "",
            "| method | fraction of full's FLOPs | steps | seeds | total TFLOP | test acc. | all tokens, no fit | dropped, LDA fit |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, fraction, p in points:
            where = f"{fraction:g}" if "fraction_of_full" in p else f"{fraction:g} → {p['train_flops_total'] / report['methods']['full']['train_flops_total']:.3f}"
            lines.append(
                f"| {name} | {where} | {p.get('steps', report['epochs'])}{'' if 'steps' in p else ' epochs'} | {p.get('seeds', report['seeds'])} | {p['train_flops_total'] / 1e12:.1f} | "
                f"{100 * p['test_accuracy']:.2f} ± {100 * p['test_accuracy_std']:.2f} | {_acc(p, 'all_tokens', 'no_head_fit')} | {_acc(p, 'dropped_tokens', 'lda_head_fit')} |"
            )
    return "\n".join(lines) + "\n"


def budget_rows(report: dict) -> list[tuple[str, float, dict]]:
    """(method, fraction, result) for each method and each of the bench's budget fractions:
    the run trained for it, or the equal-epoch run that stood in for it (`BUDGET_TOLERANCE`)."""
    rows = []
    for name, r in report["methods"].items():
        trained = {p["fraction_of_full"]: p for p in r.get("budgets", [])}
        for fraction in report["config"].get("budgets") or []:
            rows.append((name, fraction, trained.get(fraction, r)))
    return rows


def plot_bench(report: dict, folder: Path) -> list[Path]:
    """plots/accuracy_vs_compute.png and, for methods that choose blocks, plots/alast_blocks.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in report["methods"].items():
        pts = sorted([(r["train_flops_total"], r["activation_bytes"], r["test_accuracy"])] + [(p["train_flops_total"], p["activation_bytes"], p["test_accuracy"]) for p in r.get("budgets", [])])
        xs, mem, ys = zip(*pts, strict=True)
        (line,) = axes[0].plot(np.array(xs) / 1e12, 100 * np.array(ys), marker="o", label=name)
        axes[1].scatter(np.array(mem) / 2**20, 100 * np.array(ys), color=line.get_color(), label=name)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("total training compute (TFLOP)")
    axes[1].set_xlabel("activation memory per step (MiB)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel(f"test accuracy (%), {report['test_size']} images")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['data']}: accuracy against training compute and memory (mean over seeds {report['seeds']})")
    fig.tight_layout()
    path = folder / "accuracy_vs_compute.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    written.append(path)
    adaptive = {n: r for n, r in report["methods"].items() if r["runs"][0]["plan"].get("method") == "alast"}
    if adaptive:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        width = 0.8 / len(adaptive)
        for j, (name, r) in enumerate(adaptive.items()):
            freq = r["block_choice_freq"]
            axes[0].bar(np.arange(len(freq)) + j * width, freq, width=width, label=name)
            counts = np.bincount(r["runs"][0]["blocks_trained_per_step"])
            axes[1].bar(np.arange(len(counts)) + j * width, counts / max(counts.sum(), 1), width=width, label=name)
        axes[0].set_xlabel("block")
        axes[0].set_ylabel("fraction of steps it trained")
        axes[1].set_xlabel("blocks trained in a step")
        axes[1].set_ylabel("fraction of steps (first seed)")
        for ax in axes:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        path = folder / "alast_blocks.png"
        save_figure(fig, path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _bar(desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc=desc, unit="step", leave=False)


def _tick(bar, done: int, total: int, stats) -> None:
    bar.total = total
    bar.update(1)
    bar.set_postfix(loss=f"{stats.loss:.3f}", s=f"{stats.step_time_s:.2f}")


# --------------------------------------------------------------------------- cost only


def _reset_peak_rss() -> bool:
    """Set this process's peak RSS back to its current RSS (Linux >= 4.0: clear_refs 5), so the
    peak measured next is that of what follows (the training steps), not of the set-up before
    them (the planner's calibration copies the model once; glibc keeps part of what was freed
    resident until it is trimmed); False where it cannot."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM where /proc has it, else getrusage (KiB on Linux, bytes on macOS)."""
    from .profiles import proc_kib_field

    peak = proc_kib_field("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _cost_worker(args: tuple) -> dict:
    cfg_dict, spec, device, profile = args
    cfg = from_dict(BenchConfig, cfg_dict)
    torch.manual_seed(0)
    num_classes = 10
    model = build_model(replace(cfg.model, pretrained=None), {"task": num_classes}).to(device)
    mcfg = method_config(cfg.method, spec, cfg.variants)
    prepare_model(model, mcfg)
    model.to(device)
    method = make_method(mcfg, model, method_profile(spec, profile), cfg.train.batch_size, "task")
    trainer = Trainer(model, method, replace(cfg.train, max_steps=cfg.cost_steps, warmup_steps=0), "task")
    g = torch.Generator().manual_seed(0)
    size, chans = cfg.model.img_size, cfg.model.in_chans
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps_only = _reset_peak_rss()
    stats = []
    for step in range(cfg.cost_steps):
        x = torch.randn(cfg.train.batch_size, chans, size, size, generator=g).to(device)
        y = torch.randint(0, num_classes, (cfg.train.batch_size,), generator=g).to(device)
        s, _, _ = trainer.train_step(x, y, count_flops=step == 0)
        if device == "cuda":
            torch.cuda.synchronize()
        stats.append(s)
    timed = [s.step_time_s for s in stats[1:]]
    return {
        "train_flops_per_step": float(stats[0].train_flops),
        "activation_bytes": int(max(s.activation_bytes for s in stats)),
        "trainable_params": int(stats[0].trainable_params),
        "trainable_state_bytes": int(stats[0].trainable_state_bytes),
        "step_time_s": float(np.median(timed)),
        "step_time_range_s": [float(min(timed)), float(max(timed))],
        "peak_rss_bytes": _peak_rss_bytes(),
        "peak_rss_scope": "training steps" if steps_only else "whole process (set-up included)",
        "cuda_max_allocated_bytes": int(torch.cuda.max_memory_allocated()) if device == "cuda" else None,
        "plan": method.describe(),
    }


def run_cost(cfg: BenchConfig, out: Path, progress: bool = True, command: str | None = None) -> dict:
    """Costs alone at the model's size: each method in its own process (so its peak RSS is its own)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    cfg.validate("bench.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    profile = bench_profile(cfg)
    check_plans(cfg, cfg.model, 10, profile)
    started = time.time()
    results: dict[str, dict] = {}
    ctx = mp.get_context("spawn")
    for i, spec in enumerate(cfg.methods):
        t0 = time.time()
        _log(progress, f"[{i + 1}/{len(cfg.methods)}] {spec}: {cfg.cost_steps} steps ...")
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            try:
                results[spec] = pool.submit(_cost_worker, (to_dict(cfg), spec, device, profile)).result()
            except BrokenProcessPool as exc:  # killed (the OOM killer at a paper's scale), not an exception it raised
                raise FedtuneError(f"bench --cost-only: the process measuring {spec!r} died ({exc}); out of memory? "
                                   f"try a smaller train.batch_size (now {cfg.train.batch_size}); methods done: {', '.join(results) or 'none'}") from exc
            except torch.OutOfMemoryError as exc:  # the GPU's memory, which the process survives
                raise FedtuneError(f"bench --cost-only: {spec!r} ran out of {device} memory at batch {cfg.train.batch_size}; "
                                   f"try a smaller train.batch_size; methods done: {', '.join(results) or 'none'}") from exc
        _log(progress, f"{spec}: {results[spec]['step_time_s']:.3f} s/step ({time.time() - t0:.0f} s)")
    full = results["full"]
    for r in results.values():
        r["ratios_vs_full"] = {
            "train_flops": _ratio(r["train_flops_per_step"], full["train_flops_per_step"]),
            "activation_bytes": _ratio(r["activation_bytes"], full["activation_bytes"]),
            "trainable_state": _ratio(r["trainable_state_bytes"], full["trainable_state_bytes"]),
            "speedup": _ratio(full["step_time_s"], r["step_time_s"]),
            "peak_rss": _ratio(r["peak_rss_bytes"], full["peak_rss_bytes"]),
            "cuda_max_allocated": _ratio(r["cuda_max_allocated_bytes"], full["cuda_max_allocated_bytes"]) if device == "cuda" else None,
        }
    m = cfg.model
    report = {
        "config": to_dict(cfg),
        "cost_only": True,
        "model": m.name,
        "img_size": m.img_size,
        "patch_size": m.patch_size,
        "tokens": (m.img_size // m.patch_size) ** 2 + 1,
        "batch_size": cfg.train.batch_size,
        "device": device if device == "cpu" else torch.cuda.get_device_name(0),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "wall_time_s": round(time.time() - started, 1),
        **provenance(command),
        "methods": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", report)
    write_text(out / "bench.md", cost_table(report))
    return report


def cost_table(report: dict) -> str:
    gpu = report["device"] != "cpu"
    lines = [
        f"Costs only: {report['model']} at {report['img_size']}x{report['img_size']} ({report['tokens']} tokens), random weights, "
        f"batch {report['batch_size']}, {report.get('device', 'cpu')}, {report['torch_threads']} CPU threads; one process per method; ratios against full in the same run. "
        f"Step time: the median of the steps after the first (their range in bench.json); peak RSS: "
        f"{next(iter(report['methods'].values())).get('peak_rss_scope', 'whole process (set-up included)')}.",
        "",
        "| method | train GFLOP/step | FLOPs vs full | activation MiB | act. vs full | trainable state MiB | step time (s) | speed-up | peak RSS MiB | RSS vs full |"
        + (" CUDA max alloc. MiB | vs full |" if gpu else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if gpu else ""),
    ]
    for name, r in report["methods"].items():
        q = r["ratios_vs_full"]
        row = (
            f"| {name} | {r['train_flops_per_step'] / 1e9:.1f} | {q['train_flops']:.3f} | {r['activation_bytes'] / 2**20:.1f} | {q['activation_bytes']:.3f} | "
            f"{r['trainable_state_bytes'] / 2**20:.1f} | {r['step_time_s']:.3f} | {q['speedup']:.2f}x | {r['peak_rss_bytes'] / 2**20:.0f} | {q['peak_rss']:.3f} |"
        )
        if gpu:
            row += f" {r['cuda_max_allocated_bytes'] / 2**20:.0f} | {q['cuda_max_allocated']:.3f} |"
        lines.append(row)
    return "\n".join(lines) + "\n"
