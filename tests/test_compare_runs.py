"""simulations.compare_runs: summaries averaged per label, blocks per client and round."""

import json

import pytest

from simulations.compare_runs import compare, main


def fake_run(folder, acc, blocks):
    folder.mkdir(parents=True)
    summary = {"accuracy_global": acc, "accuracy_global_before_head_fit": acc - 0.1, "accuracy_personalized": None,
               "bytes_up_ratio_vs_full_fedavg": 0.2, "wall_time_s": 10.0, "rounds": 2}
    (folder / "summary.json").write_text(json.dumps(summary))
    rounds = [{"round": 0}] + [{"round": r, "clients": [{"accepted": True, "partition_id": 0, "profile": "rpi", "block_updates": blocks[r - 1]},
                                                      {"accepted": False, "partition_id": 1, "profile": "phone", "block_updates": [1, 1]}]} for r in (1, 2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    return folder


def test_compare_runs(tmp_path, capsys):
    a = fake_run(tmp_path / "a", 0.9, [[0, 3], [0, 3]])
    b = fake_run(tmp_path / "b", 0.8, [[0, 0], [2, 0]])
    text = compare([("x", a), ("x", b)])
    assert "| x | 2 | 85.0 ± 7.1 (90.0, 80.0) | 75.0 ± 7.1 (80.0, 70.0) | - | - | - | 0.200 ± 0.000 (0.200, 0.200) | - | 10 ± 0 (10, 10) |" in text
    assert "| 0 | rpi | 1 | 1 |" in text  # blocks with updates, first run of the label
    assert "phone" not in text  # rejected replies trained nothing that counted
    out = tmp_path / "c.md"
    assert main([f"one={a}", "--out", str(out)]) == 0
    assert out.read_text() == capsys.readouterr().out


def test_compare_runs_protocol_table(tmp_path, capsys):
    a = fake_run(tmp_path / "a", 0.9, [[0, 3], [0, 3]])
    summary = json.loads((a / "summary.json").read_text())
    summary.update(accuracy_global_local=0.7, accuracy_personalized=0.91, accuracy_personalized_worst10=0.6, bytes_up_total=2**21, bytes_down_total=2**22,
                   traffic_ratio_vs_full_fedavg=0.25, personalized_at_least_global_fraction=1.0)
    (a / "summary.json").write_text(json.dumps(summary))
    assert main([f"alast={a}", "--table", "pfl"]) == 0
    text = capsys.readouterr().out
    assert "| alast | 1 | 70.0 | - | - | 91.0 | - | 60.0 | 1.00 | 2 | 4 | 0.250 | 10 |" in text and "Blocks" not in text


def test_compare_runs_robust_table_reads_nested_epsilon(tmp_path, capsys):
    a = fake_run(tmp_path / "a", 0.9, [[0, 3], [0, 3]])
    b = fake_run(tmp_path / "b", 0.5, [[0, 3], [0, 3]])
    summary = json.loads((b / "summary.json").read_text())
    summary["dp"] = {"epsilon": 4.0, "delta": 1e-5}
    (b / "summary.json").write_text(json.dumps(summary))
    png = tmp_path / "eps.png"
    assert main([f"plain={a}", f"dp={b}", "--table", "robust", "--plot-privacy", str(png)]) == 0
    assert png.stat().st_size > 1000
    text = capsys.readouterr().out
    assert "| plain | 1 | 80.0 | 90.0 | - | - | 10 |" in text
    assert "| dp | 1 | 40.0 | 50.0 | - | 4.00 | 10 |" in text and "Blocks" not in text


def test_compare_runs_task_table_with_a_probe_reference(tmp_path, capsys):
    a = fake_run(tmp_path / "moe", 0.8, [[0, 3], [0, 3]])
    summary = json.loads((a / "summary.json").read_text())
    summary.update(accuracy_per_task={"digit": 0.9, "garment": 0.7}, accuracy_per_task_before_head_fit={"digit": 0.8, "garment": 0.6},
                   accuracy_global_before_head_fit=0.7, bytes_up_client_max_vs_model=0.25)
    (a / "summary.json").write_text(json.dumps(summary))
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "probe.json").write_text(json.dumps({"accuracy_per_task": {"digit": 0.85, "garment": 0.5}, "accuracy_global": 0.675}))
    assert main([f"moe={a}", f"probe={probe}", "--table", "tasks"]) == 0
    text = capsys.readouterr().out
    assert "| run | runs | digit (%) | garment (%) | mean (%) | digit before head fit (%) | garment before head fit (%) |" in text
    assert "| moe | 1 | 90.0 | 70.0 | 80.0 | 80.0 | 60.0 | 70.0 | 0.250 | 10 |" in text
    assert "| probe | 1 | 85.0 | 50.0 | 67.5 | - | - | - | - | - |" in text and "Blocks" not in text
    # a summary with the tasks' accuracies before the head fit but not their mean (older
    # independent per-task runs): the mean is taken from them
    b = fake_run(tmp_path / "indep", 0.8, [[0, 3], [0, 3]])
    summary = json.loads((b / "summary.json").read_text())
    del summary["accuracy_global_before_head_fit"]
    summary.update(accuracy_per_task={"digit": 0.9, "garment": 0.7}, accuracy_per_task_before_head_fit={"digit": 0.7, "garment": 0.5})
    (b / "summary.json").write_text(json.dumps(summary))
    assert main([f"indep={b}", "--table", "tasks"]) == 0
    assert "| indep | 1 | 90.0 | 70.0 | 80.0 | 70.0 | 50.0 | 60.0 | - | 10 |" in capsys.readouterr().out


def test_compare_runs_export_table(tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "export.json").write_text(json.dumps({"test_accuracy": 0.9, "run_model_test_accuracy": 0.95, "agreement_with_run_model": 0.93, "bytes": 2**21,
                                                    "dense_bytes": 2**20, "inference_flops_per_image": 2e6, "dense_inference_flops_per_image": 1e6, "onnx_max_abs_diff": 1e-4}))
    assert main([f"digit={folder}", "--table", "export"]) == 0
    assert "| digit | 1 | 90.0 | 95.0 | 0.930 | 2.00 | 1.00 | 2 | 1 | 0.00010 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([f"digit={folder}"])  # an export folder is not a run
    assert exc.value.code == 2 and "expected LABEL=FOLDER with summary.json in FOLDER" in capsys.readouterr().err


def test_pfl_tables_from_summary_files(tmp_path, capsys):
    """The README's PFL tables are rebuilt from summaries kept as METHOD_SPLIT_sSEED.json:
    seeds of one method averaged in order, methods in the README's order, other files ignored."""
    from simulations.pfl_tables import main as tables

    summaries = tmp_path / "summaries"
    summaries.mkdir()
    for name, acc in (("alast_a0.1_s1", 0.8), ("alast_a0.1_s0", 0.9), ("fedrep_a0.1_s0", 0.7),
                      ("alast_r20_a0.1_s0", 0.1), ("alast_own_a0.1_s0", 0.95), ("alast_fedrod_path_s0", 0.6)):
        (summaries / f"{name}.json").write_text(json.dumps({"accuracy_personalized": acc, "wall_time_s": 5.0}))
    (summaries / "probe_path_s0.json").write_text(json.dumps({"accuracy_personalized": 0.5}))
    with pytest.raises(SystemExit, match="split a0.1: the rows are over different seeds.*--mixed-seeds"):
        tables([str(summaries)])
    assert tables([str(summaries), "--mixed-seeds"]) == 0
    assert "warning: split a0.1: the rows are over different seeds" in capsys.readouterr().err
    a01 = (tmp_path / "table_alpha0.1.md").read_text().splitlines()
    assert a01[2].startswith("| FedRep | 1 | - | - | - | 70.0 |")
    assert a01[3].startswith("| ALaST, own blocks + closed-form LDA head | 1 | - | - | - | 95.0 |")
    assert a01[4].startswith("| ALaST, shared blocks + closed-form LDA head (default) | 2 | - | - | - | 85.0 ± 7.1 (90.0, 80.0) |")
    assert len(a01) == 5  # alast_r20 is another run shape, not a seed of the default
    path = (tmp_path / "table_pathological.md").read_text().splitlines()
    assert path[2].startswith("| starting model + closed-form head, no training (fedtune probe) | 1 | - | - | - | 50.0 |")
    assert path[3].startswith("| ALaST, own blocks + FedRoD heads | 1 |")
    assert not (tmp_path / "table_alpha0.5.md").exists()
    # a summary file given directly to compare_runs reads the same
    assert main([f"x={summaries / 'fedrep_a0.1_s0.json'}", "--table", "pfl"]) == 0
    assert "| x | 1 | - | - | - | 70.0 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # the runs table needs the run folder (its blocks)
        main([f"x={summaries / 'fedrep_a0.1_s0.json'}"])
    assert exc.value.code == 2 and "expected LABEL=FOLDER with summary.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        tables([str(tmp_path / "missing")])
    assert exc.value.code == 2 and "missing: no such folder of summaries" in capsys.readouterr().err
    (summaries / "fedrep_a0.1_s1.json").write_text(json.dumps({"accuracy_personalized": 0.7, "error": "every round empty"}))
    with pytest.raises(SystemExit, match="a failed run"):
        tables([str(summaries), "--mixed-seeds"])
    # a file under another seed's or split's name: caught by what the summary records, or
    # (older summaries) by its clients' local test sizes against the other files of that seed
    (summaries / "fedrep_a0.1_s1.json").write_text(json.dumps({"accuracy_personalized": 0.7, "seed": 0}))
    with pytest.raises(SystemExit, match="named seed 1, but its run had seed 0"):
        tables([str(summaries), "--mixed-seeds"])
    (summaries / "fedrep_a0.1_s1.json").write_text(json.dumps({"accuracy_personalized": 0.7, "partition": {"scheme": "dirichlet", "alpha": 0.5}}))
    with pytest.raises(SystemExit, match="named split a0.1, but its run's partition is a0.5"):
        tables([str(summaries), "--mixed-seeds"])
    (summaries / "fedrep_a0.1_s1.json").write_text(json.dumps({"accuracy_personalized": 0.7, "partition": {"scheme": "dirichlet", "alpha": 0.1, "self_balancing": True}}))
    with pytest.raises(SystemExit, match="named split a0.1, but its run's partition is a0.1sb"):
        tables([str(summaries), "--mixed-seeds"])
    (summaries / "fedrep_a0.1sb_s1.json").write_text(json.dumps({"accuracy_personalized": 0.75, "partition": {"scheme": "dirichlet", "alpha": 0.1, "self_balancing": True}}))
    (summaries / "fedrep_a0.1_s1.json").unlink()
    assert tables([str(summaries), "--mixed-seeds"]) == 0  # PFLlib's self-balancing draw has a table of its own
    assert (tmp_path / "table_alpha0.1_self_balancing.md").read_text().splitlines()[2].startswith("| FedRep | 1 | - | - | - | 75.0 |")
    (summaries / "fedrep_a0.1sb_s1.json").unlink()
    # rows of one table share the run shape: other clients or data are refused; a summary cut short is named
    (summaries / "fedrep_a0.5_s0.json").write_text(json.dumps({"accuracy_personalized": 0.7, "num_clients": 20}))
    (summaries / "alast_a0.5_s0.json").write_text(json.dumps({"accuracy_personalized": 0.7, "num_clients": 10}))
    with pytest.raises(SystemExit, match="alast_a0.5_s0.json: its num_clients \\(10\\) differs from fedrep_a0.5_s0.json's \\(20\\)"):
        tables([str(summaries), "--mixed-seeds"])
    (summaries / "alast_a0.5_s0.json").write_text('{"accuracy_personalized": 0.')
    with pytest.raises(SystemExit, match="alast_a0.5_s0.json: cannot read it as a result file"):
        tables([str(summaries), "--mixed-seeds"])
    (summaries / "alast_a0.5_s0.json").unlink()
    (summaries / "fedrep_a0.5_s0.json").unlink()
    (summaries / "fedrep_a0.1_s0.json").write_text(json.dumps({"accuracy_personalized": 0.7, "clients": [{"partition_id": 0, "num_examples": 9}]}))
    (summaries / "alast_a0.1_s0.json").write_text(json.dumps({"accuracy_personalized": 0.9, "clients": [{"partition_id": 0, "num_examples": 10},
                                                                                                    {"partition_id": 1, "num_examples": 4}]}))
    with pytest.raises(SystemExit, match="local test sizes differ from"):
        tables([str(summaries), "--mixed-seeds"])
    # a client one run did not evaluate (its final evaluation timed out) is no mismatch
    (summaries / "fedrep_a0.1_s0.json").write_text(json.dumps({"accuracy_personalized": 0.7, "clients": [{"partition_id": 0, "num_examples": 10}]}))
    assert tables([str(summaries), "--mixed-seeds"]) == 0


def test_pfl_runs_gives_one_command_per_table_row_and_runs_only_what_is_missing(tmp_path, capsys):
    """simulations.pfl_runs: every row's runs with their configs and split settings; --run
    runs the missing ones one at a time, keeps their summaries and rebuilds the tables; a
    failed run is reported and exits non-zero."""
    import shutil
    from pathlib import Path

    from fedtune.runconfig import load_run_config
    from fedtune.typedconfig import to_dict
    from simulations.pfl_runs import config_of
    from simulations.pfl_runs import main as pfl_runs
    from simulations.pfl_tables import METHODS

    assert all(config_of(k).is_file() for k, _ in METHODS), "every table row has its config"
    summaries, runs = tmp_path / "summaries", tmp_path / "runs"
    summaries.mkdir()
    (summaries / "fedrep_a0.5_s0.json").write_text(json.dumps({"accuracy_personalized": 0.7}))
    calls = []

    def simulate(cmd):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        if out.name.endswith("_s2") and "--resume" not in cmd:
            return 1  # this run fails (and is then resumed)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"accuracy_personalized": 0.8, "wall_time_s": 1.0}))
        sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
        (out / "run-config.json").write_text(json.dumps(to_dict(load_run_config(cmd[2], sets))))  # as fedtune simulate writes it
        return 0

    common = ["--method", "fedrep", "--split", "a0.5", "--summaries", str(summaries), "--runs", str(runs)]
    assert pfl_runs(common, simulate=simulate) == 0 and calls == []
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].startswith("done ") and listed[1].startswith("to do")
    assert "simulations/pfl/fedrep.yaml --set seed=1 --set partition.alpha=0.5 --out " + str(runs / "fedrep_a0.5_s1") in listed[1]
    assert pfl_runs([*common, "--run"], simulate=simulate) == 1, "seed 2 failed"
    assert [Path(c[-1]).name for c in calls] == ["fedrep_a0.5_s1", "fedrep_a0.5_s2"], "seed 0 was done"
    assert sorted(p.name for p in summaries.iterdir()) == ["fedrep_a0.5_s0.json", "fedrep_a0.5_s1.json"]
    assert "| FedRep | 2 |" in (tmp_path / "table_alpha0.5.md").read_text()
    assert "fedrep_a0.5_s2 (exit 1" in capsys.readouterr().err
    # a finished run folder only has its summary copied; an interrupted one is resumed from its
    # checkpoint; one stopped before its first checkpoint is set aside and run again; --force
    # moves the old folder aside; a summary that records a failure never becomes a table row
    (runs / "fedrep_a0.5_s2").mkdir()
    (runs / "fedrep_a0.5_s2" / "metrics.jsonl").write_text("{}\n")
    (runs / "fedrep_a0.5_s2" / "checkpoint.safetensors").write_text("")
    calls.clear()
    (summaries / "fedrep_a0.5_s1.json").unlink()
    # a finished folder whose run had another config (here another seed) is not copied
    good = (runs / "fedrep_a0.5_s1" / "run-config.json").read_text()
    (runs / "fedrep_a0.5_s1" / "run-config.json").write_text(json.dumps({**json.loads(good), "seed": 7}))
    assert pfl_runs([*common, "--run", "--seeds", "2"], simulate=simulate) == 1
    assert "holds a run whose config differs in seed" in capsys.readouterr().err and not (summaries / "fedrep_a0.5_s1.json").exists()
    (runs / "fedrep_a0.5_s1" / "run-config.json").write_text(good)
    assert pfl_runs([*common, "--run"], simulate=simulate) == 0
    assert [(Path(c[c.index("--out") + 1]).name, c[-1]) for c in calls] == [("fedrep_a0.5_s2", "--resume")], "s1's folder held its summary: copied, not run again"
    assert (summaries / "fedrep_a0.5_s1.json").is_file()
    (summaries / "fedrep_a0.5_s2.json").unlink()
    (runs / "fedrep_a0.5_s2" / "summary.json").unlink()
    (runs / "fedrep_a0.5_s2" / "checkpoint.safetensors").unlink()
    calls.clear()
    assert pfl_runs([*common, "--run"], simulate=simulate) == 1, "without --resume the stub fails s2"
    assert calls and "--resume" not in calls[0] and any(p.name.startswith("fedrep_a0.5_s2.old-") for p in runs.iterdir())
    (runs / "fedrep_a0.5_s2").mkdir(exist_ok=True)
    (runs / "fedrep_a0.5_s2" / "summary.json").write_text(json.dumps({"error": "round(s) [1] had no accepted client reply"}))
    (runs / "fedrep_a0.5_s2" / "run-config.json").write_text(json.dumps(to_dict(load_run_config(config_of("fedrep"), ["seed=2", "partition.alpha=0.5"]))))
    assert pfl_runs([*common, "--run"], simulate=simulate) == 1
    assert "had no accepted client reply" in capsys.readouterr().err and not (summaries / "fedrep_a0.5_s2.json").exists()
    for p in runs.iterdir():
        if p.name.startswith("fedrep_a0.5_s2.old-"):
            shutil.rmtree(p)
    calls.clear()
    (runs / "fedrep_a0.5_s0").mkdir()
    (runs / "fedrep_a0.5_s0" / "summary.json").write_text("{}")  # no config beside it: --force runs it again
    assert pfl_runs([*common, "--run", "--force", "--seeds", "1"], simulate=simulate) == 0
    assert len(calls) == 1 and "--resume" not in calls[0]
    assert [p.name.split(".old-")[0] for p in runs.iterdir() if ".old-" in p.name] == ["fedrep_a0.5_s0"]
    pfl_runs(["--method", "alast", "--split", "path", "--seeds", "1", "--summaries", str(summaries), "--runs", str(runs)], simulate=simulate)
    assert "pfl_fmnist.yaml --set seed=0 --set partition.scheme=pathological" in capsys.readouterr().out
    # the self-balancing split lists only the rows measured there, unless a row is asked for
    pfl_runs(["--split", "a0.1sb", "--seeds", "1", "--summaries", str(summaries), "--runs", str(runs)], simulate=simulate)
    listed = [line.split("--out ")[1] for line in capsys.readouterr().out.splitlines()]
    assert [Path(x).name for x in listed] == ["local_a0.1sb_s0", "fedrep_a0.1sb_s0", "ditto_a0.1sb_s0", "alast_a0.1sb_s0"]
    pfl_runs(["--method", "fedper", "--split", "a0.1sb", "--seeds", "1", "--summaries", str(summaries), "--runs", str(runs)], simulate=simulate)
    assert "fedper.yaml --set seed=0 --set partition.self_balancing=true --out" in capsys.readouterr().out
    # two rows run one after the other: the tables rebuilt in between (one row's seeds done, the
    # other's not yet) do not stop the command
    fresh = tmp_path / "fresh"
    assert pfl_runs(["--method", "fedrep", "--method", "fedper", "--split", "a0.1", "--seeds", "2", "--run",
                     "--summaries", str(fresh), "--runs", str(tmp_path / "runs2")], simulate=simulate) == 0
    assert sorted(p.name for p in fresh.iterdir()) == ["fedper_a0.1_s0.json", "fedper_a0.1_s1.json", "fedrep_a0.1_s0.json", "fedrep_a0.1_s1.json"]
    for bad, message in ((["--seeds", "0"], "--seeds: must be at least 1"), (["--method", "pfedme"], "invalid choice: 'pfedme'")):
        with pytest.raises(SystemExit) as exc:
            pfl_runs(bad, simulate=simulate)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_pfl_ceiling_trains_outside_the_pool_and_scores_every_client(tmp_path, capsys):
    """simulations.pfl_ceiling: the backbone never sees an image of the protocol's pool (any
    client's train or test image), its frozen starting model scores exactly what `fedtune
    probe` reports, and each seed's result is written as JSON and a table."""
    import torch

    from fedtune.federated import federated_data, global_model
    from fedtune.probe import head_fit_reference
    from simulations import pfl_ceiling
    from tests.test_data import _write_fashion

    _write_fashion(tmp_path / "fm", gz=False, n_train=200, n_test=40)
    sets = [f"data.root={tmp_path / 'fm'}", "data.max_train=80", "data.max_test=20", "data.seed=3", "federation.num_clients=4",
            "partition.alpha=1.0", "partition.min_partition_size=5"]
    cfg = pfl_ceiling.load_run_config("simulations/pfl_fmnist.yaml", [*sets, "seed=1"])
    train_x, _, test_x, _ = pfl_ceiling.outside_pool(cfg)
    assert (len(train_x), len(test_x)) == (120, 20)
    pool = federated_data(cfg)[0].train.images  # the protocol's own pool: every client's train and test images
    assert len(pool) == 100
    seen = {x.numpy().tobytes() for x in pool}
    assert not seen & {x.numpy().tobytes() for x in torch.cat([train_x, test_x])}, "a pool image in the backbone's data"

    model = global_model(cfg).eval()
    got, probe = pfl_ceiling.score(cfg, lambda x: model.forward_features(x)[0]), head_fit_reference(cfg)
    for key in ("accuracy_personalized", "accuracy_personalized_worst10", "accuracy_global_local", "personalized_at_least_global_fraction"):
        assert got[key] == pytest.approx(probe[key], abs=1e-6), key  # float32 means against exact ratios

    out = tmp_path / "ceiling"
    pfl_ceiling.main(["--backbone", "cnn", "--epochs", "1", "--seeds", "2", "--out", str(out), *[a for s in sets for a in ("--set", s)]])
    written = sorted(p.name for p in out.iterdir())  # fewer seeds and other settings: not the stored results' name
    assert len(written) == 2 and written[0].startswith("ceiling_cnn_e1_seeds2_") and written[0].endswith(".json")
    name = written[0].removesuffix(".json")
    result = json.loads((out / f"{name}.json").read_text())
    assert (result["backbone_train_images"], result["backbone_test_images"]) == (120, 20) and set(result["seeds"]) == {"0", "1"}
    for seed in result["seeds"].values():
        assert set(seed) == {"pixels", "start", "trained"} and set(seed["pixels"]) == {"knn5"}
        assert 0.0 <= seed["trained"]["accuracy_personalized"] <= 1.0 and seed["trained"]["accuracy_global_local"] is not None
    rows = (out / f"{name}.md").read_text().splitlines()
    assert rows[-1].startswith("| cnn trained on the 120 images outside the pool |") and len(rows) == 9
    with pytest.raises(SystemExit, match="outside the pool"):  # caps that take every image leave nothing to train on
        pfl_ceiling.outside_pool(pfl_ceiling.load_run_config("simulations/pfl_fmnist.yaml", [*sets, "data.max_train=500"]))
    with pytest.raises(SystemExit, match="must pool Fashion-MNIST"):  # the protocol's pool is what it leaves out
        pfl_ceiling.outside_pool(pfl_ceiling.load_run_config("simulations/pfl_fmnist.yaml", [*sets, "partition.pool=false"]))
    with pytest.raises(SystemExit):
        pfl_ceiling.main(["--epochs", "0", "--out", str(out)])
    assert "--epochs and --seeds must be at least 1" in capsys.readouterr().err


def test_pfl_ceiling_knn_votes_and_breaks_ties_by_the_nearer_class():
    import torch

    from simulations.pfl_ceiling import knn_accuracy

    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([3, 3, 7, 7, 7])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_accuracy(test, torch.tensor([3, 7]), train, labels, k=3) == 1.0
    assert knn_accuracy(test, torch.tensor([3, 7]), train, labels, k=5) == 0.5  # all 5 vote: 7 wins both
    # 2-2 ties go to the class whose neighbours are nearer, whichever its index
    assert knn_accuracy(torch.tensor([[0.05, 0.95]]), torch.tensor([7]), train[:4], labels[:4], k=4) == 1.0
    assert knn_accuracy(torch.tensor([[0.95, 0.05]]), torch.tensor([3]), train[:4], labels[:4], k=4) == 1.0


def test_a_cell_shows_the_runs_that_lack_its_value():
    from simulations.compare_runs import _cell

    assert _cell([0.5, None, 0.7], 100.0, 1) == "60.0 ± 14.1 (50.0, -, 70.0)"
    assert _cell([None, 0.7], 100.0, 1) == "70.0 (-, 70.0)"
    assert _cell([None, None], 100.0, 1) == "-"


def test_compare_runs_refuses_failed_runs_and_files_of_another_kind(tmp_path):
    a = fake_run(tmp_path / "a", 0.9, [[0, 3], [0, 3]])
    summary = json.loads((a / "summary.json").read_text())
    (a / "summary.json").write_text(json.dumps({**summary, "error": "round(s) [1] had no accepted client reply"}))
    with pytest.raises(SystemExit, match="a failed run"):
        main([f"x={a}"])
    other = tmp_path / "final_evaluation.json"
    other.write_text(json.dumps({"client_evaluations": []}))
    with pytest.raises(SystemExit, match="none of this table's columns"):
        main([f"x={other}", "--table", "pfl"])
    (a / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "rounds"}))
    with pytest.raises(SystemExit, match="no 'rounds'.*--table tasks"):
        main([f"x={a}"])


def test_plot_privacy_averages_a_labels_seeds_and_names_a_run_without_accuracy(tmp_path, capsys):
    from simulations.compare_runs import plot_privacy

    runs = []
    for name, acc, eps in (("s0", 0.4, 4.0), ("s1", 0.6, 4.0), ("none", 0.9, None)):
        run = fake_run(tmp_path / name, acc, [[0, 3], [0, 3]])
        summary = json.loads((run / "summary.json").read_text())
        if eps is not None:
            summary["dp"] = {"epsilon": eps, "delta": 1e-5}
        (run / "summary.json").write_text(json.dumps(summary))
        runs.append(run)
    drawn = {}
    import matplotlib.axes

    original = matplotlib.axes.Axes.plot

    def spy(self, x, y, *args, **kwargs):
        drawn["points"] = (list(x), list(y))
        return original(self, x, y, *args, **kwargs)

    matplotlib.axes.Axes.plot = spy
    try:
        plot_privacy([("eps 4", runs[0]), ("eps 4", runs[1]), ("plain", runs[2])], tmp_path / "p.png")
    finally:
        matplotlib.axes.Axes.plot = original
    assert drawn["points"][0] == [4.0] and drawn["points"][1] == pytest.approx([40.0])  # one point: (before the fit 0.3 + 0.5) / 2
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "summary.json").write_text(json.dumps({"rounds": 1, "dp": {"epsilon": 1.0}}))
    with pytest.raises(SystemExit, match="has no global accuracy"):
        plot_privacy([("x", bare)], tmp_path / "q.png")
