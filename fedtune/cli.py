"""The `fedtune` command."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .errors import FedtuneError
from .typedconfig import apply_overrides, from_dict, read_yaml


def _load(cls, path: str | None, overrides: list[str]):
    data = read_yaml(path) if path else {}
    return from_dict(cls, apply_overrides(data, overrides or []))


def output_folder(out: Path) -> None:
    """Make the output folder `out` before any work, so a bad one fails at once (not after hours
    of training): a file there or an uncreatable folder is a ConfigError."""
    from .errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from exc


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, quick, run_bench, run_cost

    # the flags are overrides like --set's, so they are validated with the rest of the config
    flags = [f"methods={json.dumps(args.methods.split(','))}"] if args.methods else []
    if args.seeds is not None:
        flags.append(f"seeds={json.dumps(list(range(args.seeds)))}")
    if args.epochs is not None:
        flags.append(f"train.epochs={args.epochs}")
    cfg = _load(BenchConfig, args.config, [*(args.set or []), *flags])
    if args.quick:
        cfg = quick(cfg)
    if not args.cost_only:  # --cost-only makes its own images at the model's size
        cfg.check_data("bench.")
    output_folder(Path(args.out))  # (earlier results there are replaced: harnesses rerun into one folder)
    run = run_cost if args.cost_only else run_bench
    report = run(cfg, Path(args.out), progress=not args.no_progress, command=shlex.join(["fedtune", *args.argv]))
    print((Path(args.out) / "bench.md").read_text())
    print(f"wrote {Path(args.out) / 'bench.json'} ({report['wall_time_s']} s)")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .model import model_from_checkpoint
    from .pretrain import PretrainConfig, pretrain, pretrain_accuracy
    from .weights import cache_dir

    cfg = _load(PretrainConfig, args.config, args.set)
    out = Path(args.out) if args.out else cache_dir() / "pretrained" / f"{cfg.key()}.safetensors"
    if out.suffix != ".safetensors":  # it is written as safetensors, and read back by its suffix
        raise ConfigError(f"--out {out}: the pretrained file is written as safetensors; give a name ending in .safetensors")
    if out.exists() and not args.force:
        from .pretrain import made_by_another

        _, meta = model_from_checkpoint(out)
        changed = made_by_another(meta, cfg)
        if changed:  # the held-out set below is built from the config: it must be the file's own
            raise ConfigError(f"{out} holds a pretraining of another config (differs in {', '.join(changed[:6])}); use --force to train again, or another --out")
        print(f"cached: {out} (use --force to train again)")
    else:
        pretrain(cfg, out, progress=not args.no_progress)
    model, _ = model_from_checkpoint(out)
    print(json.dumps({"checkpoint": str(out), "held_out_accuracy": pretrain_accuracy(model, cfg)}, indent=2))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.run import DEFAULT_CONFIG, simulate

    from .runconfig import load_run_config

    path = args.config or DEFAULT_CONFIG
    cfg = load_run_config(path, args.set)
    out = Path(args.out or f"runs/{cfg.name}")
    summary = simulate(cfg, out, resume=args.resume, progress=not args.no_progress, verbose=args.verbose)
    keys = ("accuracy_global", "accuracy_global_local", "accuracy_personalized", "bytes_up_total", "bytes_down_total", "bytes_up_ratio_vs_full_fedavg", "traffic_ratio_vs_full_fedavg", "rounds", "wall_time_s", "peak_rss_bytes")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=2))
    if summary.get("independent_tasks"):  # one federation per task, each in its own folder
        print(f"wrote {out / 'summary.json'} and one run folder per task: {', '.join(str(out / t) for t in summary.get('runs', {}))}")
    else:
        print(f"wrote {out / 'summary.json'}, {out / 'metrics.jsonl'}, {out / 'plots'} and {out / 'checkpoint.safetensors'}")
    if summary.get("error"):
        print(f"fedtune: error: {summary['error']}", file=sys.stderr)
        return 3
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from simulations.run import DEFAULT_CONFIG

    from .probe import head_fit_reference
    from .report import write_json
    from .runconfig import load_run_config

    cfg = load_run_config(args.config or DEFAULT_CONFIG, args.set)
    out = Path(args.out or f"runs/{cfg.name}-probe")
    output_folder(out)
    result = head_fit_reference(cfg, progress=lambda line: print(line, file=sys.stderr, flush=True))
    write_json(out / "probe.json", result)
    print(json.dumps(result, indent=2))
    print(f"wrote {out / 'probe.json'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import STAGE_PREFIX, export_run

    out = Path(args.out)
    # a staging folder a killed export left behind does not count (the next export removes it);
    # an --out that is a file, export_run refuses
    if out.is_dir() and any(not p.name.startswith(STAGE_PREFIX) for p in out.iterdir()) and not args.force:
        print(f"fedtune: error: {out} is not empty; choose another --out or pass --force", file=sys.stderr)
        return 2
    created = not out.exists()
    if out.is_dir() or created:
        output_folder(out)  # an uncreatable folder fails now, not after the model and data are loaded
    try:
        summary = export_run(args.run_dir, args.task, out, args.client, args.experts_per_block)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):  # a refused export leaves no empty folder behind
            out.rmdir()
        raise
    print(json.dumps(summary, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .export import predict

    for row in predict(args.model_dir, args.images):
        print(f"{row['image']}\t{row['class']}\t{row['probability']:.3f}")
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    from .profiles import PROFILES, measured_profile

    print(f"{'name':12s} {'memory (MiB)':>13s} {'GFLOP/sample':>13s}  description")
    for p in [*PROFILES.values(), measured_profile()]:
        flops = "unlimited" if p.flops_per_sample >= 1e14 else f"{p.flops_per_sample / 1e9:.2f}"
        print(f"{p.name:12s} {p.memory_bytes / 2**20:13.0f} {flops:>13s}  {p.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated, block-selective fine-tuning of ViTs on edge devices.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="run the fine-tuning methods side by side; write bench.json and bench.md")
    p.add_argument("--config", help="YAML bench config (default: the embedded default)")
    p.add_argument("--out", default="runs/bench", help="output folder")
    p.add_argument("--quick", action="store_true", help="a few steps per method (under a minute)")
    p.add_argument("--cost-only", action="store_true", help="measure costs alone (random weights and images, cost_steps (a bench config key) steps per method, one process each): FLOPs, activations, state, step time, peak memory")
    p.add_argument("--methods", help="comma-separated methods, e.g. full,bsr,alast,alast+lora")
    p.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    p.add_argument("--epochs", type=int, help="epochs per method")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("pretrain", help="pretrain the default backbone reproducibly (cached)")
    p.add_argument("--config", help="YAML pretrain config")
    p.add_argument("--out", help="checkpoint path (default: the cache)")
    p.add_argument("--force", action="store_true", help="train again even if cached")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("simulate", help="run a federated simulation (Flower, one machine)")
    p.add_argument("config", nargs="?", help="YAML run config (default: simulations/quickstart.yaml)")
    p.add_argument("--out", help="output folder (default: runs/<name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed round")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("probe", help="a run's starting model with heads fitted from its clients' data, no training: the reference a run's head fit starts from")
    p.add_argument("config", nargs="?", help="YAML run config (default: simulations/quickstart.yaml)")
    p.add_argument("--out", help="output folder for probe.json (default: runs/<name>-probe)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("export", help="export a run's personalized model for one task (and client)")
    p.add_argument("run_dir", help="a run folder (with checkpoint.safetensors)")
    p.add_argument("--task", help="the task (default: the run's first; with --client, the client's first)")
    p.add_argument("--client", type=int, help="a client's partition id: include its personal parameters and head")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.add_argument("--experts-per-block", type=int, help="MoE runs: keep only this many experts per MoE block, the task's most used (1: each MoE block becomes a dense MLP)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="predict image files with an exported model")
    p.add_argument("model_dir", help="a folder written by `fedtune export`")
    p.add_argument("images", nargs="+", help="image files")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("profiles", help="list the device profiles")
    p.set_defaults(func=cmd_profiles)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line, for the results that record it
    try:
        return args.func(args)
    except FedtuneError as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedtune: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130


def _resume_hint(args: argparse.Namespace) -> str:
    """For an interrupted simulate whose --out holds a checkpoint (its own or a task
    federation's): the command that continues it."""
    out = Path(args.out) if args.command == "simulate" and args.out else None
    if out is None or not ((out / "checkpoint.safetensors").exists() or any(out.glob("*/checkpoint.safetensors"))):
        return ""
    return f": continue it with the same command and --resume (--out {out})"


if __name__ == "__main__":
    sys.exit(main())
