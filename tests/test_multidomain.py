"""Tasks from different data sets in one run (task_data)."""

import numpy as np
import pytest

from fedtune import protocol
from fedtune.client import ClientRuntime
from fedtune.client_state import ClientState
from fedtune.errors import ConfigError
from fedtune.federated import client_data, federated_data, global_model, state_to_numpy
from fedtune.runconfig import load_run_config
from fedtune.typedconfig import from_dict

from .test_federated import TINY_RUN

TASK_DATA = {
    "digit": {"name": "digits", "max_train": 120, "max_test": 40},
    "shape": {"name": "shapes", "num_samples": 200, "tasks": ["shape"]},
    "colour": {"name": "shapes", "num_samples": 200, "tasks": ["colour"]},
}


def multidomain(**over):
    from fedtune.runconfig import RunConfig

    data = {**TINY_RUN, "task_data": TASK_DATA, "federation": {"num_clients": 4, "rounds": 1, "client_tasks": [["digit"], ["shape", "colour"], ["digit", "colour"]]}, **over}
    return from_dict(RunConfig, data)


def test_each_task_reads_its_own_source_and_clients_get_their_share_of_each():
    cfg = multidomain()
    split, parts = federated_data(cfg)
    assert cfg.run_tasks() == ["digit", "shape", "colour"]
    assert split.train.num_classes == {"digit": 10, "shape": 4, "colour": 6}
    # digits' 120 images are labelled only for digit; shapes' images for shape and colour (shared)
    assert split.train.count("digit") == 120 and split.train.count("shape") == split.train.count("colour") == 160
    assert split.test.count("digit") == 40 and split.test.count("shape") == 40
    assert len(split.train) == 280 and split.train.images.shape[1:] == (3, 16, 16)
    # client 1 holds shape+colour: only shapes images; client 2 holds digit+colour: a share of both sources
    train1, _ = client_data(cfg, 1)
    assert train1.count("digit") == 0 and train1.count("shape") == len(train1)
    train2, _ = client_data(cfg, 2)
    assert train2.count("digit") > 0 and train2.count("colour") > 0
    # the two digit holders (0 and 3) and the one partition of digits go to different clients
    digit_sets = [set(parts[pid][split.train.labels["digit"][parts[pid]].numpy() >= 0].tolist()) for pid in (0, 2, 3)]
    assert not (digit_sets[0] & digit_sets[1]) and not (digit_sets[0] & digit_sets[2])
    assert sum(len(s) for s in digit_sets) == 120


def test_a_client_trains_and_evaluates_each_of_its_tasks_on_its_own_images():
    cfg = multidomain()
    rt = ClientRuntime(cfg, 2)
    glob = state_to_numpy(global_model(cfg))
    update, _, metrics, state = rt.fit(glob, ClientState())
    assert metrics.num_examples == rt.train_set.count("digit") + rt.train_set.count("colour")
    # each task's count travels too: the server weighs a task's head and routers by it
    assert metrics.task_examples == {"digit": rt.train_set.count("digit"), "colour": rt.train_set.count("colour")}
    assert protocol.TrainMetrics.from_dict(metrics.to_dict()).task_examples == metrics.task_examples
    assert "heads.digit.weight" in update and "heads.colour.weight" in update and "heads.shape.weight" not in update
    ev, stats, _ = rt.evaluate(glob, state, want_stats=True)
    assert set(ev.per_task_global) == {"digit", "colour"}
    assert stats["digit.count"].sum() == rt.train_set.count("digit") and stats["colour.count"].sum() == rt.train_set.count("colour")


def test_multidomain_bad_input_names_the_task(tmp_path):
    with pytest.raises(ConfigError, match="task\\(s\\) 'garment'.*nosuchset"):
        federated_data(multidomain(task_data={**TASK_DATA, "garment": {"name": "torchvision:nosuchset", "root": str(tmp_path)}},
                                   federation={"num_clients": 3, "client_tasks": [["digit"], ["shape", "colour"], ["garment"]]}))
    with pytest.raises(ConfigError, match="task_data.colour.*no label type 'hue'"):
        federated_data(multidomain(task_data={**TASK_DATA, "colour": {"name": "shapes", "num_samples": 200, "tasks": ["hue"]}}))
    # one source split two ways: one task's test images could be in the other's training data
    with pytest.raises(ConfigError, match="tasks 'shape' and 'colour' read 'shapes' with different test_fraction; tasks of one source must split it alike"):
        federated_data(multidomain(task_data={**TASK_DATA, "colour": {"name": "shapes", "num_samples": 200, "tasks": ["colour"], "test_fraction": 0.3}}))
    federated_data(multidomain(task_data={**TASK_DATA, "colour": {"name": "shapes", "num_samples": 200, "tasks": ["colour"], "max_train": 50}}))  # caps may differ
    # the same generated images under another seed and offset, split with another seed
    with pytest.raises(ConfigError, match="read 'shapes' with different seed"):
        federated_data(multidomain(task_data={**TASK_DATA, "shape": {"name": "shapes", "num_samples": 200, "tasks": ["shape"], "shapes_seed_offset": 1},
                                              "colour": {"name": "shapes", "num_samples": 200, "tasks": ["colour"], "seed": 1}}))
    with pytest.raises(ConfigError, match="client_tasks: task 'garment' is not one of the run's tasks"):
        multidomain(federation={"num_clients": 4, "client_tasks": [["digit"], ["garment"]]})
    (tmp_path / "twice.yaml").write_text("task_data:\n  digit: {name: digits}\n  digit: {name: shapes}\n")
    with pytest.raises(ConfigError, match="key 'digit' appears twice"):
        load_run_config(tmp_path / "twice.yaml")


@pytest.mark.parametrize("method", [
    {"name": "alast", "alast": {"k": 2, "memory_fraction": None}},
    {"name": "alast", "lora": {"enabled": True}, "alast": {"k": 2, "memory_fraction": None}},
    {"name": "sherl"},
    {"name": "sherl", "lora": {"enabled": True}},
    {"name": "bsr", "lora": {"enabled": True}},
])
def test_every_method_trains_an_moe_vit_across_domains(method):
    """ALaST may choose MoE blocks (the planner prices their experts), SHERL runs its side path
    over MoE blocks, LoRA reaches the experts; each client reports expert usage per task."""
    cfg = multidomain(method=method, moe={"num_experts": 4, "top_k": 2, "blocks": [1, 3], "router": "per_task"})
    rt = ClientRuntime(cfg, 2)
    glob = state_to_numpy(global_model(cfg))
    update, _, metrics, _ = rt.fit(glob, ClientState())
    assert set(metrics.experts) == {"digit", "colour"} and all(sum(c) > 0 for c in metrics.experts.values())
    assert update and all(np.isfinite(v).all() for v in update.values())
    expert_keys = [k for k in update if ".mlp.experts." in k]
    if method["name"] == "alast":
        assert metrics.block_updates[1] > 0, "ALaST chose the MoE block 1"
        assert expert_keys and all(("lora_" in k) == bool(method.get("lora")) for k in expert_keys if k.endswith(("A.default.weight", "fc1.weight")))
    if method["name"] == "bsr":
        assert any("lora_B" in k for k in expert_keys)
    if method["name"] == "sherl":
        # the side path trains (its consolidator), the blocks before the consolidation point do not
        at = rt.model.consolidate_at
        assert any(k.startswith("consolidator.") for k in update)
        assert not any(k.startswith(tuple(f"vit.blocks.{i}." for i in range(at))) for k in update)
        assert any("lora_" in k for k in update) == bool(method.get("lora")), "LoRA adapters train in the late blocks only with lora"


def test_independent_task_federations_keep_each_clients_data_and_profile():
    from simulations.run import task_federations

    cfg = multidomain(federation={"num_clients": 4, "rounds": 1, "profiles": ["phone", "jetson", "workstation", "rpi"],
                                  "client_tasks": [["digit"], ["shape", "colour"], ["digit", "colour"]], "independent_tasks": True})
    subs = task_federations(cfg)
    assert {t: h for t, (_, h) in subs.items()} == {"digit": [0, 2, 3], "shape": [1], "colour": [1, 2]}
    sub, holders = subs["digit"]
    assert sub.run_tasks() == ["digit"] and sub.federation.num_clients == 3 and not sub.federation.independent_tasks
    assert sub.federation.profiles == ["phone", "workstation", "rpi"]
    # the digit images each holder trains on are the same in the joint run and in the task's own federation
    for i, pid in enumerate(holders):
        joint, _ = client_data(cfg, pid)
        alone, _ = client_data(sub, i)
        assert np.array_equal(joint.for_task("digit").images.numpy(), alone.images.numpy())


def test_independent_runs_refuse_a_used_out_and_resume_each_task_federation(tmp_path, monkeypatch):
    """Each task's federation is checked as a run of its own: a new run refuses an --out that
    holds one, --resume needs one to continue and refuses a changed config, and a federation
    that finished its rounds is read back instead of run again."""
    import json

    import torch

    import simulations.run as sim
    from fedtune.errors import CheckpointError
    from fedtune.model import model_meta, save_checkpoint
    from fedtune.typedconfig import to_dict

    cfg = multidomain(federation={"num_clients": 4, "rounds": 1, "client_tasks": [["digit"], ["shape", "colour"], ["digit", "colour"]], "independent_tasks": True})
    feds = sim.task_federations(cfg)
    ran = []
    summary = {"rounds": 1, "accuracy_global": 0.5, "bytes_up_total": 1, "bytes_down_total": 2, "model_bytes": 4, "wall_time_s": 1.0}
    def fake_simulate(sub, out, resume=False, **kw):  # what a finished run leaves
        ran.append((out.name, resume))
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
        return dict(summary)

    monkeypatch.setattr(sim, "simulate", fake_simulate)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="holds no task federation to continue"):
        sim.simulate_independent(cfg, out, resume=True)
    (out / "shape").mkdir(parents=True)
    (out / "shape" / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="holds a run"):
        sim.simulate_independent(cfg, out)
    assert ran == [] and not (out / "config.json").exists(), "nothing written"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "metrics.jsonl").write_text("")
    for resume in (False, True):
        with pytest.raises(ConfigError, match="holds a run of one federation"):
            sim.simulate_independent(cfg, plain, resume=resume)
    for task, (sub, _) in feds.items():
        run_cfg = sub if task != "colour" else multidomain(seed=9)
        meta = model_meta(sub.model, {task: 2}, run=to_dict(run_cfg), round=1, strategy={}, method=sub.method.name)
        save_checkpoint(out / task / "checkpoint.safetensors", {"w": torch.zeros(1)}, meta)
    with pytest.raises(CheckpointError, match="config differs"):
        sim.simulate_independent(cfg, out, resume=True)
    (out / "colour" / "checkpoint.safetensors").unlink()
    (out / "digit" / "summary.json").write_text(json.dumps({**summary, "accuracy_global": 0.9}))
    for task in ("digit", "shape", "colour"):
        (out / task / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="colour holds a run that stopped before its first checkpoint"):
        sim.simulate_independent(cfg, out, resume=True)
    assert ran == []
    (out / "colour" / "metrics.jsonl").unlink()
    got = sim.simulate_independent(cfg, out, resume=True)
    assert got["accuracy_per_task"] == {"digit": 0.9, "shape": 0.5, "colour": 0.5}
    assert ran == [("shape", True), ("colour", False)], "digit finished and was read back; shape continues; colour never started"
    assert "error" not in got
    # a task federation that failed fails the run (fedtune simulate exits 3 on it); on --resume it runs again
    ran.clear()
    import shutil

    shutil.rmtree(out / "colour")
    (out / "digit" / "summary.json").write_text(json.dumps({**summary, "error": "round(s) [1] had no accepted client reply", "empty_rounds": [1]}))
    summary.update(error="round(s) [1] had no accepted client reply", empty_rounds=[1])
    got = sim.simulate_independent(cfg, out, resume=True)
    assert ("digit", True) in ran, "a failed federation is not read back as finished"
    assert got["error"].startswith("task digit: round(s) [1] had no accepted client reply") and got["empty_rounds"]["shape"] == [1]
