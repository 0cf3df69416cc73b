"""`fedtune bench` writes bench.json/bench.md/plots with every method, its evaluations and ratios (tiny model)."""

import json

import pytest

from fedtune.cli import main

TINY_BENCH = """
model: {name: vit_tiny_patch16_224, img_size: 16, patch_size: 4, depth: 4, embed_dim: 32, num_heads: 2, pretrained: null}
data: {name: digits, img_size: 16, max_train: 64, max_test: 32}
train: {epochs: 1, batch_size: 16, flops_every: 2}
method: {alast: {memory_fraction: null, k: 2}}
seeds: [0]
"""


def test_bench_writes_json_table_and_plots(tmp_path):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(TINY_BENCH + "methods: [full, head, bsr, alast, alast_tight, alast_fixed, sherl, alast+lora]\nbudgets: [0.25]\n")
    out = tmp_path / "out"
    assert main(["bench", "--config", str(cfg), "--out", str(out)]) == 0  # with progress bars, the default
    report = json.loads((out / "bench.json").read_text())
    assert report["test_size"] == 32 and report["config"]["seeds"] == [0]
    for name in ("full", "head", "bsr", "alast", "alast_tight", "alast_fixed", "sherl", "alast+lora"):
        m = report["methods"][name]
        for key in ("step_time_s", "train_flops_per_step", "activation_bytes", "trainable_params", "test_accuracy", "plan_time_s", "blocks_trained_mean"):
            assert key in m, (name, key)
        assert m["test_accuracy"] * report["test_size"] == pytest.approx(round(m["test_accuracy"] * report["test_size"]))  # images right of 32
        assert m["train_flops_per_step"] > 0
        ev = m["evaluations"]
        assert set(ev["all_tokens"]) == {"no_head_fit", "lda_head_fit"}
        assert m["test_accuracy"] == ev["all_tokens"]["lda_head_fit"]["mean"]  # the headline: every token, LDA head
        assert ("dropped_tokens" in ev) == (name not in ("full", "head", "sherl")), name
        assert m["head_fit_flops"] > 0
    full, bsr, alast = report["methods"]["full"], report["methods"]["bsr"], report["methods"]["alast"]
    assert bsr["train_flops_per_step"] < full["train_flops_per_step"]
    assert bsr["activation_bytes"] < full["activation_bytes"]
    assert full["ratios_vs_full"]["train_flops"] == 1.0
    assert alast["blocks_trained_mean"] == 2.0 and sum(alast["block_choice_freq"]) == 2.0
    assert alast["plan_time_s"] > 0
    # budgets: full runs at a quarter of its compute; the cheap methods at full's when it is far from their own
    assert full["budgets"] and full["budgets"][0]["steps"] == 1
    assert all(p["fraction_of_full"] == 0.25 for m in report["methods"].values() for p in m["budgets"])
    assert (out / "plots" / "accuracy_vs_compute.png").stat().st_size > 0
    assert (out / "plots" / "alast_blocks.png").stat().st_size > 0
    text = (out / "bench.md").read_text()
    assert "| alast+lora |" in text and "| alast_tight |" in text and "fraction of full's FLOPs" in text


def test_bench_cost_only(tmp_path):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(TINY_BENCH + "methods: [full, bsr, alast]\ncost_steps: 3\n")
    out = tmp_path / "cost"
    assert main(["bench", "--cost-only", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["cost_only"] and report["tokens"] == 17
    assert report["command"].endswith("--no-progress") and report["versions"]["torch"]  # how it was made
    full, bsr = report["methods"]["full"], report["methods"]["bsr"]
    lo, hi = full["step_time_range_s"]
    assert 0 < lo <= full["step_time_s"] <= hi
    assert full["peak_rss_scope"] == "training steps"  # Linux: the set-up's peak (the planner's calibration copy) left out
    assert full["peak_rss_bytes"] > 50 * 2**20  # torch alone is resident: a peak read in the wrong unit would not be
    assert bsr["ratios_vs_full"]["train_flops"] < 1.0 and bsr["ratios_vs_full"]["activation_bytes"] < 1.0
    assert "| alast |" in (out / "bench.md").read_text()


def _killed(args):  # a cost worker that the OOM killer takes (in the spawned process)
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def test_bench_cost_only_worker_killed_is_an_error_naming_the_method(tmp_path, monkeypatch, capsys):
    import fedtune.bench

    monkeypatch.setattr(fedtune.bench, "_cost_worker", _killed)
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(TINY_BENCH + "methods: [full, bsr]\ncost_steps: 3\n")
    out = tmp_path / "cost"
    assert main(["bench", "--cost-only", "--config", str(cfg), "--out", str(out), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "'full' died" in err and "out of memory?" in err and "train.batch_size" in err
    assert not (out / "bench.json").exists()


def test_bench_rejects_unknown_method(tmp_path, capsys):
    assert main(["bench", "--methods", "full,warp", "--out", str(tmp_path)]) == 2
    assert "unknown method 'warp'" in capsys.readouterr().err
    assert main(["bench", "--epochs", "-1", "--out", str(tmp_path)]) == 2
    assert "train.epochs" in capsys.readouterr().err, "the flags are validated like the config they override"
    assert main(["bench", "--epochs", "0", "--out", str(tmp_path)]) == 2
    assert "train.epochs: must be >= 1" in capsys.readouterr().err
    # a variant's settings are read before anything trains, not when its turn comes
    assert main(["bench", "--set", "methods=[full,x]", "--set", "variants.x={name: alast, alast: {kk: 4}}", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "methods: x:" in err and "kk" in err
    assert main(["bench", "--cost-only", "--set", "cost_steps=2", "--out", str(tmp_path)]) == 2
    assert "cost_steps: must be >= 3" in capsys.readouterr().err
    assert main(["bench", "--set", "model.img_size=64", "--out", str(tmp_path)]) == 2
    assert "model.img_size (64) and data.img_size (32) differ" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "nothing written for a refused config"
    # --cost-only makes its own images at the model's size: README's ViT-B/16 224 command stands
    from fedtune.bench import BenchConfig
    from fedtune.cli import _load

    _load(BenchConfig, None, ["model.name=vit_base_patch16_224", "model.img_size=224", "model.patch_size=16", "model.pretrained=null"]).validate("bench.")


def test_bench_config_variants_add_to_the_named_ones():
    from fedtune.bench import BenchConfig, method_config
    from fedtune.cli import _load

    cfg = _load(BenchConfig, None, ["methods=[full,alast_tight,alast_k4]", "variants.alast_k4={name: alast, alast: {k: 4, memory_fraction: 0.24}}", "variants.alast_fixed={name: alast, alast: {adapt: false}}"])
    own = method_config(cfg.method, "alast_k4", cfg.variants).alast
    assert own.k == 4 and own.memory_fraction == 0.24
    assert method_config(cfg.method, "alast_tight", cfg.variants).alast.memory_fraction == 0.1  # a named one kept
    fixed = method_config(cfg.method, "alast_fixed", cfg.variants).alast
    assert fixed.adapt is False and fixed.select == "top"  # a name given again replaces that variant


def test_bench_variant_without_a_method_name_is_a_clear_error():
    from fedtune.bench import BenchConfig
    from fedtune.cli import _load
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"variants\.alast_k4: needs a 'name' key"):
        _load(BenchConfig, None, ["variants.alast_k4={alast: {k: 4}}"])


def test_bench_on_cuda_without_a_gpu_is_a_clear_error():
    import torch

    from fedtune.bench import BenchConfig
    from fedtune.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=r"bench\.device: 'cuda' but torch sees no CUDA device"):
        BenchConfig(device="cuda").validate("bench.")


def test_sweep_trains_on_the_bench_subset_and_scores_on_other_training_images(tmp_path):
    """The sweep's validation images are training images outside the bench's own training
    subset (never the test set); each point's train and variant overrides take effect."""
    import torch

    from fedtune.data import DataConfig, load_data
    from fedtune.errors import ConfigError
    from simulations.bench_sweep import main as sweep
    from simulations.bench_sweep import split_train_val
    from tests.test_data import _write_fashion

    _write_fashion(tmp_path / "fm", gz=False, n_train=60, n_test=10)
    cfg = DataConfig(name="fashion_mnist", root=str(tmp_path / "fm"), img_size=16, max_train=20)
    split = split_train_val(cfg, val_size=25)
    bench_train = load_data(cfg).train
    assert torch.equal(split.train.images, bench_train.images) and len(split.test) == 25
    flat_train, flat_val = split.train.images.flatten(1), split.test.images.flatten(1)
    assert not (flat_val[:, None] == flat_train[None]).all(-1).any()  # no validation image is a training one
    full = load_data(DataConfig(name="fashion_mnist", root=str(tmp_path / "fm"), img_size=16))
    in_full_train = (flat_val[:, None] == full.train.images.flatten(1)[None]).all(-1).any(1)
    in_test = (flat_val[:, None] == full.test.images.flatten(1)[None]).all(-1).any(1)
    assert in_full_train.all() and not in_test.any(), "validation images come from the train set, never the test set"

    bench = tmp_path / "bench.yaml"
    bench.write_text(TINY_BENCH.replace("data: {name: digits, img_size: 16, max_train: 64, max_test: 32}",
                                        f"data: {{name: fashion_mnist, root: {tmp_path / 'fm'}, img_size: 16, max_train: 20}}"))
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"bench: {bench}\nseeds: [0]\nval_size: 25\npoints:\n  - {{name: full}}\n"
                    "  - {name: full_1step, method: full, train: {max_steps: 1}}\n"
                    "  - {name: alast_k1, method: alast, variant: {alast: {k: 1}}}\n")
    sweep(["--grid", str(grid), "--out", str(tmp_path / "out")])
    rows = {r["name"]: r for r in map(json.loads, (tmp_path / "out" / "sweep.jsonl").read_text().splitlines())}
    assert set(rows) == {"full", "full_1step", "alast_k1"}
    assert rows["full"]["runs"][0]["steps"] == 2 and rows["full_1step"]["runs"][0]["steps"] == 1  # the point's train override
    assert rows["alast_k1"]["runs"][0]["blocks"] == 1.0  # the variant's k, not the bench's 2
    assert "| alast_k1 |" in (tmp_path / "out" / "sweep.md").read_text()
    with pytest.raises(ConfigError, match="already holds a sweep"):  # another grid's rows never join this one's
        sweep(["--grid", str(grid), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("text, message", [
    ("seeds: [0]\n", "non-empty list 'points'"),
    ("points:\n  - {method: full}\n", r"points\[0\] needs a 'name'"),
    ("points:\n  - {name: a, method: full}\n  - {name: a, method: alast}\n", "'a' is listed twice"),
    ("points:\n  - {name: fulll}\n", "point 'fulll': unknown method 'fulll'"),
    # each point's settings are checked before the first point runs, not when its turn comes
    ("points:\n  - {name: full}\n  - {name: a, method: alast, variant: {alast: {kk: 1}}}\n", "point 'a': .*unknown key"),
    ("points:\n  - {name: full}\n  - {name: b, method: full, train: {batch_size: 0}}\n", "point 'b': train.batch_size"),
    ("seed: [0]\npoints:\n  - {name: full}\n", "unknown grid key\\(s\\) 'seed'"),
    ("seeds: 3\npoints:\n  - {name: full}\n", "seeds: a non-empty list of whole numbers, got 3"),
    ("val_size: 0\npoints:\n  - {name: full}\n", "val_size: a whole number >= 1, got 0"),
])
def test_sweep_grid_errors_name_the_problem(tmp_path, text, message):
    from fedtune.errors import ConfigError
    from simulations.bench_sweep import main as sweep

    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    with pytest.raises(ConfigError, match=message):
        sweep(["--grid", str(grid), "--out", str(tmp_path / "out")])


def test_sweep_grid_accepts_the_bench_configs_own_variants():
    from fedtune.errors import ConfigError
    from simulations.bench_sweep import check_grid

    grid = {"points": [{"name": "mine"}, {"name": "alast_tight"}]}
    check_grid(grid, "g.yaml", ["full", "alast", "alast_tight", "mine"])  # "mine": a variant of the bench config
    check_grid({"points": [{"name": "lora", "method": "alast+lora"}]}, "g.yaml", ["full", "alast"])  # as the bench takes it
    with pytest.raises(ConfigError, match="unknown method 'mine'"):
        check_grid(grid, "g.yaml", ["full", "alast", "alast_tight"])


def test_the_bench_plans_without_a_device_limit_unless_given_one():
    """A bench row is the method's own plan: no profile shrinks it (BSR dropped blocks to fit the
    workstation's 16 GiB at large batches); a named profile binds, and an unknown one is named."""
    from fedtune.bench import BenchConfig, bench_profile
    from fedtune.errors import ConfigError, PlanError
    from fedtune.methods import MethodConfig, make_method
    from fedtune.model import ModelConfig, build_model
    from fedtune.typedconfig import from_dict

    from .conftest import TINY

    model = build_model(ModelConfig(**TINY), {"task": 3})
    bsr = from_dict(MethodConfig, {"name": "bsr", "bsr": {"train_blocks": [1, 2, 3], "drop_blocks": [], "keep_ratio": 1.0}})
    huge = 1 << 22  # images a step: far over 16 GiB of activations
    assert sorted(make_method(bsr, model, bench_profile(BenchConfig()), huge, "task").plan().trained) == [1, 2, 3]
    with pytest.raises(PlanError, match="no bsr plan fits device profile 'workstation'"):
        make_method(bsr, model, bench_profile(from_dict(BenchConfig, {"profile": "workstation"})), huge, "task")
    with pytest.raises(ConfigError, match="unknown device profile 'h200'"):
        from_dict(BenchConfig, {"profile": "h200"})


def test_a_bench_profile_binds_every_method_but_full_and_is_checked_before_any_training(tmp_path, capsys, monkeypatch):
    """Under `profile:` full, the reference, keeps its whole plan (no edge device holds it) and
    the others plan within the profile; a method that cannot fit is named before anything trains."""
    import fedtune.bench as bench
    from fedtune.profiles import UNLIMITED, DeviceProfile

    small = DeviceProfile("small", memory_bytes=1, flops_per_sample=1e30)
    assert bench.method_profile("full", small) is UNLIMITED and bench.method_profile("bsr", small) is small

    def trained(*args, **kwargs):
        raise AssertionError("a method trained before every plan was checked")

    monkeypatch.setattr(bench, "_run_one", trained)
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(TINY_BENCH + "methods: [full, bsr]\n")
    out = tmp_path / "out"
    assert main(["bench", "--config", str(cfg), "--out", str(out), "--no-progress", "--set", "profile=mcu", "--set", "train.batch_size=4096"]) == 2
    err = capsys.readouterr().err
    assert "bench.profile: 'mcu': method bsr: no bsr plan fits device profile 'mcu'" in err, err
    assert "a smaller batch" in err  # memory binds here, so a smaller batch is advice
    assert not (out / "bench.json").exists()


def test_budget_rows_show_the_equal_epoch_run_that_stood_in_for_a_point():
    from fedtune.bench import budget_rows, markdown_table

    def result(acc, flops, budgets=()):
        ev = {"all_tokens": {k: {"mean": acc, "std": 0.0} for k in ("no_head_fit", "lda_head_fit")}}
        return {"test_accuracy": acc, "test_accuracy_std": 0.01, "train_flops_total": flops, "evaluations": ev, "budgets": list(budgets),
                "ratios_vs_full": {"speedup": 1.0, "train_flops": flops / 100.0, "activation_bytes": 1.0, "accuracy_delta_points": 0.0},
                "step_time_s": 1.0, "train_flops_per_step": 1.0, "activation_bytes": 1, "trainable_params": 1, "plan_time_s": 0.0, "blocks_trained_mean": 1.0}

    point = {"fraction_of_full": 0.3, "steps": 7, "seeds": [0], "test_accuracy": 0.5, "test_accuracy_std": 0.0, "train_flops_total": 30.0,
             "evaluations": {"all_tokens": {"no_head_fit": {"mean": 0.4, "std": 0.0}}}}
    report = {"config": {"budgets": [0.3]}, "methods": {"full": result(0.9, 100.0, [point]), "alast": result(0.8, 25.0)},
              "model": "m", "pretrained": None, "data": "d", "task": "t", "train_size": 1, "test_size": 1, "batch_size": 1, "epochs": 2,
              "seeds": [0, 1], "torch_threads": 1, "wall_time_s": 1.0}
    rows = budget_rows(report)
    assert [(n, f) for n, f, _ in rows] == [("full", 0.3), ("alast", 0.3)]
    assert rows[0][2] is point and rows[1][2] is report["methods"]["alast"]
    text = markdown_table(report)
    assert "| alast | 0.3 → 0.250 | 2 epochs | [0, 1] |" in text and "| full | 0.3 | 7 | [0] |" in text


def test_a_bad_out_fails_before_any_work(tmp_path, capsys, monkeypatch):
    import fedtune.cli as cli

    cfg = tmp_path / "bench.yaml"
    cfg.write_text(TINY_BENCH + "methods: [full, head]\n")
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    started = []
    monkeypatch.setattr("fedtune.bench.run_bench", lambda *a, **k: started.append(1))
    assert main(["bench", "--config", str(cfg), "--out", str(blocker)]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err and blocker.read_text() == "mine"
    assert main(["probe", "--out", str(blocker)]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert started == [], "nothing ran"

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_profiles", interrupted)
    assert main(["profiles"]) == 130 and capsys.readouterr().err == "fedtune: interrupted\n"
    monkeypatch.setattr(cli, "cmd_simulate", interrupted)
    run = tmp_path / "run"
    assert main(["simulate", "--out", str(run)]) == 130 and capsys.readouterr().err == "fedtune: interrupted\n"  # nothing to resume
    run.mkdir()
    (run / "checkpoint.safetensors").write_bytes(b"")
    assert main(["simulate", "--out", str(run)]) == 130 and f"--resume (--out {run})" in capsys.readouterr().err
    # a folder with earlier results is not refused: the bench runs into it and replaces them
    # (the contract harnesses rerun into one folder by)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "bench.md").write_text("old")
    ran = []
    monkeypatch.setattr("fedtune.bench.run_bench", lambda cfg, out, **k: ran.append(out) or {"wall_time_s": 0})
    assert main(["bench", "--config", str(cfg), "--out", str(earlier)]) == 0 and ran == [earlier]
