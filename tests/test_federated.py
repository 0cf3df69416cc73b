"""A client's round without Flower, the ClientApp's Messages, configs and bad input."""

import json

import numpy as np
import pytest
import torch
import yaml
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from fedtune import protocol
from fedtune.client import ClientRuntime
from fedtune.client_state import ClientState
from fedtune.errors import ConfigError
from fedtune.federated import global_model, state_to_numpy
from fedtune.runconfig import load_run_config
from fedtune.typedconfig import from_dict, to_dict

TINY_RUN = {
    "name": "tiny",
    "model": {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "depth": 4, "embed_dim": 32, "num_heads": 2, "pretrained": None},
    "data": {"name": "digits", "img_size": 16, "max_train": 160, "max_test": 40},
    "partition": {"scheme": "iid", "min_partition_size": 5},
    "method": {"name": "bsr", "bsr": {"train_blocks": [2, 3], "drop_blocks": [1], "keep_ratio": 0.5}},
    "train": {"epochs": 1, "batch_size": 16},
    "federation": {"num_clients": 4, "rounds": 2},
}


def tiny_run(**over):
    from fedtune.runconfig import RunConfig

    data = {**TINY_RUN, **over}
    return from_dict(RunConfig, data)


def test_client_round_sends_only_what_it_trained():
    cfg = tiny_run()
    rt = ClientRuntime(cfg, partition_id=1)
    glob = state_to_numpy(global_model(cfg))
    update, counts, metrics, state = rt.fit(glob, ClientState(), server_round=1)
    assert update and set(update) == set(counts)
    assert all(n.startswith(("vit.blocks.2.", "vit.blocks.3.", "vit.norm.", "heads.")) for n in update)
    assert not any(n.startswith(("vit.blocks.0.", "vit.blocks.1.", "vit.patch_embed")) for n in update)
    assert metrics.num_examples > 0 and metrics.bytes_sent == sum(v.nbytes for v in update.values())
    assert metrics.block_updates[:2] == [0, 0] and metrics.block_updates[2] == metrics.steps
    # the personal head stays in the client's state, never in the update
    assert any(k.startswith("personal_head.") for k in state.personal)
    assert not any(k.startswith("personal_head.") for k in update)
    ev, _, _ = rt.evaluate(glob, state)
    # the personal head on the global backbone's features, on the client's local test split
    from fedtune.client_state import personal_head
    from fedtune.federated import client_data
    from fedtune.heads import extract_features

    test = client_data(cfg, 1)[1]
    model = global_model(cfg)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in glob.items()})
    feats, labels = extract_features(model, test, "digit")
    head = torch.nn.Linear(feats.shape[1], 10)
    head.load_state_dict(personal_head(state.personal, "digit"))
    with torch.no_grad():
        assert ev.accuracy_personal == float((head(feats).argmax(-1) == labels).float().mean())
        assert ev.accuracy_global == float((model.forward_head(feats, "digit").argmax(-1) == labels).float().mean())
    assert ev.num_examples == len(test) > 0


def test_head_statistics_under_dp_are_bounded_per_client():
    """With client-level DP and the server's head fit, a client's statistics come from at most
    dp_stats_max_examples examples with features of norm at most dp_stats_feature_clip: the
    ones the evaluation sends (what the ClientApp replies with) as well."""
    plain = ClientRuntime(tiny_run(), partition_id=0)
    private = ClientRuntime(tiny_run(federation={**TINY_RUN["federation"], "head_fit": "lda", "clip_update_norm": 1.0, "dp_noise_multiplier": 1.0,
                                                 "dp_stats_feature_clip": 0.5, "dp_stats_max_examples": 7}), partition_id=0)
    glob = state_to_numpy(global_model(tiny_run()))
    a, b = plain.head_stats(glob, ClientState()), private.head_stats(glob, ClientState())
    assert a["digit.count"].sum() > 7 and b["digit.count"].sum() == 7
    assert np.linalg.norm(b["digit.sum"]) <= 7 * 0.5 + 1e-5 and np.trace(b["digit.outer"]) <= 7 * 0.25 + 1e-5
    assert np.trace(a["digit.outer"]) > 7 * 0.25
    _, sent, _ = private.evaluate(glob, ClientState(), want_stats=True)
    assert set(sent) == set(b)
    for k in b:
        np.testing.assert_allclose(sent[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    _, sent_plain, _ = plain.evaluate(glob, ClientState(), want_stats=True)
    assert sent_plain["digit.count"].sum() == a["digit.count"].sum()


def test_full_fedavg_client_sends_everything():
    cfg = tiny_run(method={"name": "full"}, federation={"num_clients": 4, "send": "all"})
    rt = ClientRuntime(cfg, partition_id=0)
    glob = state_to_numpy(global_model(cfg))
    update, _, _, _ = rt.fit(glob, ClientState(), server_round=1)
    assert set(update) == set(glob)


def test_personal_prefixes_never_leave():
    cfg = tiny_run(federation={"num_clients": 4, "personal": ["vit.norm."]})
    rt = ClientRuntime(cfg, partition_id=2)
    glob = state_to_numpy(global_model(cfg))
    update, _, _, state = rt.fit(glob, ClientState(), server_round=1)
    assert not any(k.startswith("vit.norm.") for k in update)
    assert "vit.norm.weight" in state.personal


def test_client_rejects_mismatched_global_arrays():
    cfg = tiny_run()
    rt = ClientRuntime(cfg, partition_id=0)
    glob = state_to_numpy(global_model(cfg))
    glob["vit.cls_token"] = np.zeros((1, 1, 8), dtype=np.float32)
    with pytest.raises(ConfigError, match="vit.cls_token has shape"):
        rt.fit(glob, ClientState())


@pytest.fixture
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def test_client_app_message_round_trip_keeps_state(task_identity):
    from clients.app import make_client_app

    cfg = tiny_run()
    app = make_client_app(cfg)
    glob = state_to_numpy(global_model(cfg))
    record = RecordDict({protocol.ARRAYS: ArrayRecord(array_dict={k: Array(v) for k, v in glob.items()}), protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: 1})})
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 3, "num-partitions": 4}, state=RecordDict(), run_config={})
    msg = Message(record, dst_node_id=5, message_type=MessageType.TRAIN)
    reply = app(msg, context)
    assert not reply.has_error(), reply.error if reply.has_error() else None
    sent = reply.content.array_records[protocol.ARRAYS]
    assert set(sent.keys()) < set(glob)
    assert reply.content.metric_records[protocol.METRICS][protocol.NUM_EXAMPLES] > 0
    # what it received, in the server's unit: tensor bytes (no serialization headers, no names)
    assert reply.content.metric_records[protocol.METRICS]["bytes-received"] == sum(v.nbytes for v in glob.values())
    assert "fedtune.personal" in context.state.array_records
    ev = app(Message(record, dst_node_id=5, message_type=MessageType.EVALUATE), context)
    from clients.app import load_state

    # the evaluation used the personal head the train message left in the client's state
    want = ClientRuntime(cfg, 3).evaluate(glob, load_state(context))[0]
    assert ev.content.metric_records[protocol.METRICS]["accuracy-personal"] == pytest.approx(want.accuracy_personal)
    assert ev.content.metric_records[protocol.METRICS]["accuracy-global"] == pytest.approx(want.accuracy_global)


def test_simulation_configs_load():
    from simulations.run import HERE

    for name in ("quickstart", "quickstart_full", "quickstart_bsr", "scale"):
        cfg = load_run_config(HERE / f"{name}.yaml")
        assert cfg.name == name
    assert load_run_config(HERE / "scale.yaml").federation.num_clients == 1000
    # the personalized-FL protocol and its baselines: the same data, split, rounds and epochs
    base = to_dict(load_run_config(HERE / "pfl_fmnist.yaml"))
    assert base["partition"]["pool"] and base["federation"]["num_clients"] == 20
    for overlay in sorted((HERE / "pfl").glob("*.yaml")):
        cfg = to_dict(load_run_config(overlay))
        for key in ("data", "partition", "train", "seed", "model"):
            assert cfg[key] == base[key], (overlay.name, key)
        assert cfg["federation"]["rounds"] == base["federation"]["rounds"]
    # multitask_dense is multitask with a dense ViT: the same data, method, budgets and rounds
    moe, dense = (to_dict(load_run_config(HERE / f"{n}.yaml")) for n in ("multitask", "multitask_dense"))
    assert moe["moe"] and dense["moe"] is None
    assert {k: v for k, v in moe.items() if k not in ("name", "moe")} == {k: v for k, v in dense.items() if k not in ("name", "moe")}
    # the multidomain overlays change only the model (and, for independent, the sharing)
    md = to_dict(load_run_config(HERE / "multidomain.yaml"))
    for name in ("multidomain_dense", "multidomain_independent", "multidomain_learned"):
        cfg = to_dict(load_run_config(HERE / f"{name}.yaml"))
        assert cfg["name"] == name
        for key in ("data", "task_data", "partition", "method", "train", "seed", "model"):
            assert cfg[key] == md[key], (name, key)
        assert {k: v for k, v in cfg["federation"].items() if k != "independent_tasks"} == {k: v for k, v in md["federation"].items() if k != "independent_tasks"}, name
    # the default MoE routes each task to its own expert; the learned overlay spreads tokens over 8
    tasklevel = load_run_config(HERE / "multidomain.yaml").moe
    assert (tasklevel.num_experts, tasklevel.top_k, tasklevel.aux_loss_weight, tasklevel.train_experts) == (4, 1, 0.0, None) and tasklevel.task_prior > 0
    learned = load_run_config(HERE / "multidomain_learned.yaml").moe
    assert (learned.num_experts, learned.top_k, learned.task_prior, learned.train_experts) == (8, 2, 0.0, 3) and learned.aux_loss_weight > 0


def test_bad_run_configs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: vit_tiny\n  oops: [")
    with pytest.raises(ConfigError, match="malformed YAML in .*bad.yaml at line"):
        load_run_config(bad)
    bad.write_text("federation:\n  num_clients: 4\n  roundz: 3\n")
    with pytest.raises(ConfigError, match="unknown key federation.roundz"):
        load_run_config(bad)
    bad.write_text("federation:\n  1: 4\n  roundz: 3\n")  # keys of mixed types: still a ConfigError
    with pytest.raises(ConfigError, match="unknown key federation.1 \\(and federation.roundz\\)"):
        load_run_config(bad)
    bad.write_text("train:\n  ? [1, 2]\n  : 3\n")  # a complex key: a ConfigError, not a TypeError
    with pytest.raises(ConfigError, match="a mapping key must be a name"):
        load_run_config(bad)
    bad.write_text("federation: &f {num_clients: 4}\ntrain: {epochs: 1}\nmodel: {name: vit_tiny_patch16_224}\n"
                   "partition: {<<: {alpha: 0.3}}\n")  # YAML merge keys read as YAML says
    assert load_run_config(bad).partition.alpha == 0.3
    # YAML 1.1 would read these as 8 and 90: refused, in a file and in an override
    for text, number in (("train:\n  batch_size: 010\n", "010"), ("federation:\n  round_timeout_s: 1:30\n", "1:30")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=f"'{number}' is ambiguous"):
            load_run_config(bad)
    with pytest.raises(ConfigError, match="'010' is ambiguous"):
        load_run_config(None, ["train.batch_size=010"])
    assert load_run_config(None, ["train.batch_size=10", "train.lr=1e-4", "seed=0"]).train.batch_size == 10
    bad.write_text("federation:\n  profiles: [rpi, toaster]\n")
    with pytest.raises(ConfigError, match="unknown device profile 'toaster'"):
        load_run_config(bad)
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_run_config(None, ["train.epochs=lots"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "missing.yaml")
    for override, match in [
        ("federation.checkpoint_every=0", "checkpoint_every: must be >= 1"),
        ("federation.eval_clients_per_round=0", "eval_clients_per_round: must be in 1..num_clients"),
        ("federation.eval_clients_per_round=99", "eval_clients_per_round: must be in 1..num_clients"),
        ("federation.round_timeout_s=0", "round_timeout_s: must be positive"),
        ("train.head_lr=-0.1", "head_lr: must be positive"),
        ("train.warmup_steps=-1", "warmup_steps: must be >= 0"),
        ("train.max_steps=0", "max_steps: must be >= 1"),
        ("train.eval_batch_size=0", "eval_batch_size: must be >= 1"),
        ("train.weight_decay=-1", "weight_decay: must be >= 0"),
        ("train.label_smoothing=5", "label_smoothing: must be in"),
        ("seed=-1", "seed: must be >= 0"),
        ("federation.lda_shrink=.inf", "lda_shrink: expected a finite number"),
        ("train.lr=.nan", "train.lr: expected a finite number"),
        ("partition.alpha=inf", "partition.alpha: expected a finite number"),
        ("backend.cpus_per_client=0", "cpus_per_client: must be > 0"),
        ("backend.torch_threads=0", "torch_threads: must be >= 1"),
        ("federation.attack.clients=[99]", "partition id 99 is not a training client"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_run_config(None, [override])


def test_a_mapping_override_merges_into_the_section_it_names():
    """`--set 'method={alast: {k: 4}}'` changes k and keeps the rest of method, as extends: does."""
    from simulations.run import HERE

    cfg = load_run_config(HERE / "pfl_fmnist.yaml", ["method={alast: {k: 4}}"])
    base = load_run_config(HERE / "pfl_fmnist.yaml")
    assert cfg.method.alast.k == 4 and cfg.method.name == base.method.name
    assert cfg.method.alast.shared_blocks == base.method.alast.shared_blocks and cfg.method.alast.memory_fraction == base.method.alast.memory_fraction
    assert load_run_config(None, ["federation.profiles=[rpi]"]).federation.profiles == ["rpi"], "a list still replaces"


def test_a_failed_start_writes_nothing_into_an_existing_run(tmp_path):
    """`fedtune simulate` on a folder holding a run, or --resume with a damaged checkpoint,
    is refused before config.json (or anything else) is written."""
    from fedtune.errors import CheckpointError
    from simulations.run import simulate

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("the original")
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "checkpoint.safetensors").write_bytes(b"truncated")
    with pytest.raises(ConfigError, match="already holds a run"):
        simulate(tiny_run(), run)
    with pytest.raises(CheckpointError, match="checkpoint.safetensors"):
        simulate(tiny_run(), run, resume=True)
    assert (run / "config.json").read_text() == "the original"
    early = tmp_path / "early"  # stopped in round 1: its round-0 record, no checkpoint
    early.mkdir()
    (early / "metrics.jsonl").write_text("{}\n")
    for resume in (False, True):
        with pytest.raises(ConfigError, match="stopped before its first checkpoint .*delete the folder"):
            simulate(tiny_run(), early, resume=resume)
    # a readable checkpoint written by another config: the keys that differ are named
    from fedtune.federated import global_model
    from fedtune.model import model_meta, save_checkpoint
    from fedtune.typedconfig import to_dict

    cfg = tiny_run()
    model = global_model(cfg)
    save_checkpoint(run / "checkpoint.safetensors", model.state_dict(), model_meta(cfg.model, {"digit": 10}, run=to_dict(cfg), round=1, strategy={}, method="bsr"))
    other = tiny_run(seed=3, train={"epochs": 1, "batch_size": 16, "lr": 0.01}, federation={"num_clients": 4, "rounds": 9})
    with pytest.raises(CheckpointError, match="differs in seed, train.lr; resume with the config"):
        simulate(other, run, resume=True)
    assert (run / "config.json").read_text() == "the original"
    # a run started before a config key existed: the key's default is what it ran with
    from fedtune.model import read_state
    from server.runner import resume_conflicts

    older = to_dict(cfg)
    del older["federation"]["robust_absent"]
    save_checkpoint(run / "checkpoint.safetensors", model.state_dict(), model_meta(cfg.model, {"digit": 10}, run=older, round=1, strategy={}, method="bsr"))
    resume_conflicts(run / "checkpoint.safetensors", read_state(run / "checkpoint.safetensors")[1], cfg)
    with pytest.raises(CheckpointError, match="differs in federation.robust_absent"):
        resume_conflicts(run / "checkpoint.safetensors", read_state(run / "checkpoint.safetensors")[1], tiny_run(federation={**TINY_RUN["federation"], "robust_absent": "unchanged"}))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        simulate(tiny_run(), tmp_path / "file")


def test_cli_reports_bad_config(tmp_path, capsys):
    from fedtune.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("nme: x\n")
    assert main(["simulate", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "unknown key nme" in capsys.readouterr().err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_node_profile_auto_and_unknown(monkeypatch):
    from fedtune import profiles

    monkeypatch.setattr(profiles, "available_memory_bytes", lambda: 8 << 30)
    auto = profiles.get_profile("auto")
    assert auto.memory_bytes == 2 << 30 and auto.name == "auto"
    rt = ClientRuntime(tiny_run(), partition_id=0, profile="auto")  # plans against the measured budget
    assert rt.profile.memory_bytes == 2 << 30
    # simulated clients given "auto" by federation.profiles share the machine: a quarter of its
    # memory over the clients Ray runs at once (cores / cpus_per_client)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    shared = ClientRuntime(tiny_run(federation={"profiles": ["auto"]}, backend={"cpus_per_client": 2.0}), partition_id=0)
    assert shared.profile.memory_bytes == (2 << 30) // 4 and shared.profile.name == "auto"
    few = ClientRuntime(tiny_run(federation={"num_clients": 2, "profiles": ["auto"]}), partition_id=0)  # 8 CPUs, 2 clients
    assert few.profile.memory_bytes == (2 << 30) // 2
    with pytest.raises(ConfigError, match="unknown device profile 'pi5'; known profiles: mcu, rpi"):
        ClientRuntime(tiny_run(), partition_id=0, profile="pi5")


def test_node_profile_given_simulated_or_measured():
    from clients.app import node_profile

    def ctx(**node):
        return Context(run_id=1, node_id=1, node_config={"partition-id": 0, **node}, state=RecordDict(), run_config={})

    assert node_profile(ctx(profile="rpi"), simulated=False) == "rpi"
    assert node_profile(ctx(), simulated=True) is None  # the run config's federation.profiles
    assert node_profile(ctx(), simulated=False) == "auto"  # a real device without a profile measures itself


def test_server_fails_clearly_when_too_few_nodes_connect():
    """Flower's strategies wait for their minimum of nodes forever; the runner gives up
    after federation.connect_timeout_s with an error naming what is missing."""
    from unittest.mock import Mock

    from server.runner import wait_for_nodes

    grid = Mock()
    grid.get_node_ids.side_effect = [[1], [1, 2], [1, 2, 3]]
    assert wait_for_nodes(grid, 3, timeout_s=10, poll_s=0) == 3
    grid.get_node_ids.side_effect = None
    grid.get_node_ids.return_value = [1, 2]
    with pytest.raises(ConfigError, match=r"needs 8 nodes \(federation.num_clients plus federation.new_clients\) but only 2 connected.*num-supernodes=8"):
        wait_for_nodes(grid, 8, timeout_s=0)
    with pytest.raises(ConfigError, match="connect_timeout_s"):
        tiny_run(federation={"num_clients": 4, "connect_timeout_s": -1}).validate()


def test_head_fit_reference_is_the_pooled_lda_of_each_tasks_clients(tmp_path):
    """`fedtune probe`: no training; each task's head is the LDA of the pooled data of the
    clients holding that task (and of no other client)."""
    from fedtune.cli import main
    from fedtune.data import ImageSet
    from fedtune.federated import client_data, client_tasks, federated_data
    from fedtune.heads import class_stats, extract_features, lda_head
    from fedtune.probe import head_fit_reference

    cfg = tiny_run(tasks=["digit", "parity"], federation={"num_clients": 4, "rounds": 1, "client_tasks": [["digit"], ["parity"]]})
    got = head_fit_reference(cfg)
    model = global_model(cfg)
    split, _ = federated_data(cfg)
    for task in ("digit", "parity"):
        sets = [client_data(cfg, pid)[0] for pid in range(4) if task in client_tasks(cfg, pid)]
        assert len(sets) == 2
        pooled = ImageSet(torch.cat([s.images for s in sets]), {task: torch.cat([s.labels[task] for s in sets])}, {task: sets[0].num_classes[task]})
        w, b = lda_head(class_stats(*extract_features(model, pooled, task), model.heads[task].out_features))
        feats, labels = extract_features(model, split.test, task)
        want = float(((feats @ w.T + b).argmax(-1) == labels).float().mean())
        # within one test image: a near-tie argmax can flip with the CPU's float reduction order
        assert got["accuracy_per_task"][task] == pytest.approx(want, abs=1.0 / len(labels) + 1e-9)
        assert got["head_fit_examples"][task] == len(pooled)
    # the CLI writes the same numbers to probe.json
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["probe", str(config), "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "probe.json").read_text())["accuracy_per_task"] == pytest.approx(got["accuracy_per_task"])


def test_client_task_groups_and_image_shapes_that_cannot_work_are_config_errors():
    with pytest.raises(ConfigError, match=r"federation.client_tasks\[1\]: empty"):
        tiny_run(tasks=["digit", "parity"], federation={"num_clients": 4, "rounds": 1, "client_tasks": [["digit", "parity"], []]})
    with pytest.raises(ConfigError, match=r"federation.client_tasks\[0\]: task 'digit' is named twice"):
        tiny_run(tasks=["digit", "parity"], federation={"num_clients": 4, "rounds": 1, "client_tasks": [["digit", "digit"], ["parity"]]})
    with pytest.raises(ConfigError, match=r"model.in_chans \(1\) and data.channels \(3\) differ"):
        tiny_run(model={**TINY_RUN["model"], "in_chans": 1})


def test_a_task_no_client_holds_is_a_config_error():
    with pytest.raises(ConfigError, match="federation.client_tasks: no client holds task 'parity'"):
        tiny_run(tasks=["digit", "parity"], federation={"num_clients": 4, "rounds": 1, "client_tasks": [["digit"]]})
    with pytest.raises(ConfigError, match="no client holds task 'parity' \\(with 1 clients"):
        tiny_run(tasks=["digit", "parity"], federation={"num_clients": 1, "rounds": 1, "client_tasks": [["digit"], ["parity"]]})


def test_alast_client_blocks_follow_its_state_and_the_federations_importance():
    """reselect: round: the blocks a client trains in a round follow the budgets it kept and the
    importance the server feeds (before, the pre-training check of make_method fixed them to
    the first blocks in every round)."""
    alast = {"name": "alast", "alast": {"k": 1, "reselect": "round", "memory_fraction": None, "federation_weight": 0.5}}
    cfg = tiny_run(method=alast)
    rt = ClientRuntime(cfg, partition_id=0, profile="workstation")
    glob = state_to_numpy(global_model(cfg))

    def trained(state, importance=None):
        _, _, metrics, new = rt.fit(glob, state, importance, server_round=2)
        return [b for b, n in enumerate(metrics.block_updates) if n], new

    blocks, state = trained(ClientState(method={"budgets": [0.3, 0.3, 0.3, 1.0], "importance": [1.0, 1.0, 1.0, 4.0]}))
    assert blocks == [3]
    assert len(state.method["budgets"]) == 4 and len(state.method["importance"]) == 4
    blocks, _ = trained(ClientState(method={"budgets": [0.3, 1.0, 0.3, 0.3], "importance": [1.0, 4.0, 1.0, 1.0]}))
    assert blocks == [1]
    # the federation's importance moves the choice where the client's own is flat
    blocks, _ = trained(ClientState(method={"budgets": [0.6] * 4, "importance": [1.0] * 4}), importance=[0.1, 0.1, 5.0, 0.1])
    assert blocks == [2]


def test_shared_blocks_keep_a_rounds_clients_within_k_blocks():
    """shared_blocks: clients whose own importance points at different blocks all train
    within the federation's top-K once it is fed, so the round changes at most K blocks."""
    alast = {"name": "alast", "alast": {"k": 2, "reselect": "round", "memory_fraction": None, "federation_weight": 0.5}}
    own = [[4.0, 1.0, 4.0, 1.0], [1.0, 1.0, 4.0, 4.0], [4.0, 4.0, 1.0, 1.0], [1.0, 4.0, 1.0, 4.0]]
    fed_importance = [1.0, 1.6, 1.0, 1.4]

    def union(shared: bool) -> set[int]:
        cfg = tiny_run(method={**alast, "alast": {**alast["alast"], "shared_blocks": shared}})
        glob = state_to_numpy(global_model(cfg))
        blocks: set[int] = set()
        for pid, imp in enumerate(own):
            state = ClientState(method={"budgets": [0.6] * 4, "importance": imp})
            _, _, metrics, _ = ClientRuntime(cfg, partition_id=pid, profile="workstation").fit(glob, state, fed_importance, server_round=2)
            blocks |= {b for b, n in enumerate(metrics.block_updates) if n}
        return blocks

    assert union(True) == {1, 3}
    assert len(union(False)) > 2, "each client's own importance spreads the blocks"


def test_yaml_overlays_extend_a_base(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("name: base\ntrain: {epochs: 3, lr: 0.01}\nfederation: {profiles: [rpi, phone]}\n")
    (tmp_path / "variant.yaml").write_text("extends: base.yaml\nname: variant\ntrain: {epochs: 1}\nfederation: {profiles: [jetson]}\n")
    cfg = load_run_config(tmp_path / "variant.yaml")
    assert cfg.name == "variant" and cfg.train.epochs == 1 and cfg.train.lr == 0.01  # mappings merge
    assert cfg.federation.profiles == ["jetson"]  # lists are replaced
    (tmp_path / "loop.yaml").write_text("extends: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_run_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="config file not found: .*nowhere.yaml"):
        load_run_config(tmp_path / "orphan.yaml")
    (tmp_path / "two.yaml").write_text("extends: [base.yaml, other.yaml]\n")
    with pytest.raises(ConfigError, match="extends must name one YAML file"):
        load_run_config(tmp_path / "two.yaml")


@pytest.mark.parametrize("allow", [False, True])
def test_a_run_whose_round_accepted_no_reply_fails_loudly(tmp_path, allow):
    """Every client of round 2 was rejected: the summary carries an error with the reasons and
    `fedtune simulate` exits non-zero, unless federation.allow_empty_rounds."""
    from server.runner import ServerRunner

    cfg = tiny_run(federation={"num_clients": 4, "rounds": 2, "allow_empty_rounds": allow})
    runner = ServerRunner(cfg, tmp_path / "run")
    runner.out.mkdir()
    base = {"accuracy_global": 0.5, "loss_global": 1.0, "accuracy_per_task": {"digit": 0.5}, "bytes_up": 0, "bytes_down": 0, "bytes_up_full_fedavg": 0}
    runner.rounds = [{"round": 0, **base}, {"round": 1, **base, "accepted": 4, "rejected": []},
                     {"round": 2, **base, "accepted": 0, "rejected": [{"node_id": 1, "reason": "error reply (code 0): device crash"}]}]
    summary = runner.finish()
    assert summary["empty_rounds"] == [2]
    if allow:
        assert "error" not in summary
    else:
        assert "round(s) [2] had no accepted client reply" in summary["error"] and "device crash" in summary["error"]


def test_full_fedavgs_model_leaves_lora_adapters_out(tmp_path):
    """Full-model FedAvg trains the weights themselves: its reference model is the plain one,
    whatever adapters the run's own model carries."""
    from server.runner import ServerRunner

    plain = ServerRunner(tiny_run(), tmp_path / "plain")
    lora = ServerRunner(tiny_run(method={"name": "bsr", "bsr": {"train_blocks": [2, 3]}, "lora": {"enabled": True}}), tmp_path / "lora")
    adapters = sum(v.numel() * v.element_size() for k, v in lora.model.state_dict().items() if "lora_" in k)
    assert adapters > 0
    assert lora.full_bytes == plain.full_bytes == sum(v.numel() * v.element_size() for v in plain.model.state_dict().values())


def test_a_private_run_reports_the_accountants_epsilon_in_its_summary(tmp_path):
    """summary.json's dp block: the accountant's epsilon after the last round (with the head
    fit's release of statistics counted when it happened) and the per-round values recorded."""
    from server.runner import ServerRunner, dp_epsilon

    cfg = tiny_run(federation={"num_clients": 4, "rounds": 2, "clip_update_norm": 1.0, "dp_noise_multiplier": 1.1,
                               "head_fit": "lda", "dp_stats_feature_clip": 1.0})
    runner = ServerRunner(cfg, tmp_path / "run")
    runner.out.mkdir()
    base = {"accuracy_global": 0.5, "loss_global": 1.0, "accuracy_per_task": {"digit": 0.5}, "bytes_up": 0, "bytes_down": 0, "bytes_up_full_fedavg": 0, "accepted": 4, "rejected": []}
    runner.rounds = [{"round": 0, **base}, {"round": 1, **base, "dp_epsilon": dp_epsilon(cfg, 1)},
                     {"round": 2, **base, "dp_epsilon": dp_epsilon(cfg, 2, head_stats=True), "head_fit": "lda"}]
    dp = runner.finish()["dp"]
    assert dp["epsilon"] == pytest.approx(dp_epsilon(cfg, 2, head_stats=True)) and dp["head_stats_privatized"]
    assert dp_epsilon(cfg, 1) < dp_epsilon(cfg, 2) < dp["epsilon"] < 100  # more rounds and the statistics' release spend more
    assert dp["delta"] == 1e-5 and dp["epsilon_per_round"] == [dp_epsilon(cfg, 1), dp["epsilon"]]  # rounds 1 and 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["dp"]["epsilon"] == dp["epsilon"]
    # a --resume that repeated a round (its first noisy model went out) pays for it
    runner.strategy = runner.make_strategy(0)
    state = runner.strategy.state_dict()
    runner.strategy.load_state_dict({**state, "dp_rounds_repeated": 1})
    assert runner.finish()["dp"]["epsilon"] == pytest.approx(dp_epsilon(cfg, 3, head_stats=True))
    # a Poisson sample that drew nobody is not a failed round
    sampled = tiny_run(federation={"num_clients": 4, "clients_per_round": 2, "rounds": 2, "clip_update_norm": 1.0, "dp_noise_multiplier": 1.1})
    poisson = ServerRunner(sampled, tmp_path / "poisson")
    poisson.out.mkdir()
    poisson.rounds = [{"round": 0, **base}, {"round": 1, **base, "accepted": 0, "sampled": 0}, {"round": 2, **base}]
    summary = poisson.finish()
    assert summary["empty_rounds"] == [] and "error" not in summary
    poisson.rounds[1]["sampled"] = 2  # sampled, and nobody's reply accepted: that is a failed round
    assert poisson.finish()["empty_rounds"] == [1]
    old = {k: v for k, v in state.items() if k != "dp_rounds_repeated"}  # a checkpoint from before the count
    runner.strategy.load_state_dict(old)
    assert runner.strategy.dp_rounds_repeated == 0


def test_simulated_attackers_send_what_their_attack_says():
    from fedtune.client import attacked_update, flipped_labels
    from fedtune.runconfig import AttackConfig

    glob = {"w": np.ones(3, np.float32)}
    trained = {"w": np.array([2.0, 1.0, 0.0], np.float32)}
    np.testing.assert_allclose(attacked_update(trained, glob, AttackConfig(kind="sign_flip", clients=[0], scale=10), 0)["w"], [-9.0, 1.0, 11.0])
    noisy = attacked_update(trained, glob, AttackConfig(kind="noise", clients=[0], noise_std=2.0), 0)["w"]
    np.testing.assert_allclose(noisy, glob["w"] + np.random.default_rng(0).normal(0.0, 2.0, 3).astype(np.float32), rtol=1e-6)  # the global value plus noise, not the trained one
    cfg = tiny_run(federation={"num_clients": 4, "rounds": 1, "attack": {"kind": "sign_flip", "clients": [1], "scale": 10}})
    glob = state_to_numpy(global_model(cfg))
    honest, *_ = ClientRuntime(tiny_run(), 1).fit(glob, ClientState())
    bad, *_ = ClientRuntime(cfg, 1).fit(glob, ClientState())
    name = next(n for n in honest if n.startswith("vit.blocks.") and n.endswith("weight"))
    np.testing.assert_allclose(bad[name], glob[name] - 10 * (honest[name] - glob[name]), rtol=1e-4, atol=1e-5)
    other, *_ = ClientRuntime(cfg, 2).fit(glob, ClientState())
    honest2, *_ = ClientRuntime(tiny_run(), 2).fit(glob, ClientState())
    np.testing.assert_array_equal(other[name], honest2[name], err_msg="clients not listed are honest")
    data = ClientRuntime(tiny_run(), 0).train_set
    assert (flipped_labels(data, "digit").labels["digit"] == 9 - data.labels["digit"]).all()
    dp = {"num_clients": 4, "clip_update_norm": 1.0, "dp_noise_multiplier": 1.0}
    with pytest.raises(ConfigError, match="dp_stats_max_examples: must be at least 1, got 0"):
        tiny_run(federation={**dp, "dp_stats_max_examples": 0})
    with pytest.raises(ConfigError, match="robust_absent"):
        tiny_run(federation={"num_clients": 4, "robust_absent": "zero"})
    for attack, match in (({"kind": "noise"}, "name the attacking clients"), ({"kind": "sign_flip", "clients": [9]}, "partition id 9 is not a training client"),
                          ({"kind": "flip"}, "attack.kind")):
        with pytest.raises(ConfigError, match=match):
            tiny_run(federation={"num_clients": 4, "attack": attack})


def test_a_simulation_no_client_can_start_in_fails_at_once(tmp_path, monkeypatch):
    import os

    from simulations.run import simulate

    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # on any runner: fewer CPUs than a client asks for
    with pytest.raises(ConfigError, match="cpus_per_client is 100 but this machine has"):
        simulate(tiny_run(backend={"cpus_per_client": 100}), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="cpus_per_client is 0.5: Flower's simulation runtime behind `flwr run` takes whole CPUs"):
        simulate(tiny_run(backend={"cpus_per_client": 0.5, "launcher": "flwr-run"}), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="min_clients"):
        tiny_run(federation={"num_clients": 4, "min_clients": 5})


def test_more_bad_input_is_a_clear_error(tmp_path):
    from fedtune.bench import BenchConfig, run_bench

    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not UTF-8 text \\(byte 9\\)"):
        load_run_config(latin1)
    with pytest.raises(ConfigError, match="override 'x=\\[1': the value is not valid YAML"):
        load_run_config(None, ["x=[1"])
    with pytest.raises(ConfigError, match="model.img_size \\(48\\) and data.img_size \\(16\\) differ"):
        tiny_run(model={**TINY_RUN["model"], "img_size": 48})
    with pytest.raises(ConfigError, match="rounds: must be in 1..100000"):
        tiny_run(federation={"num_clients": 4, "rounds": 10**12})
    with pytest.raises(ConfigError, match="bench.task: 'color' is not a task of the data set digits"):
        run_bench(from_dict(BenchConfig, {"task": "color", "methods": ["full"], "seeds": [0], "data": {"max_train": 20, "max_test": 10}}), tmp_path / "bench")


def test_the_federations_statistics_follow_the_checkpoint_through_a_crash(tmp_path):
    """The statistics of round r are staged until round r's checkpoint is written: a crash
    before it keeps the previous round's (those of the checkpoint a resume starts from), a crash
    just after it leaves round r's staged, and the resume takes them."""
    from flwr.app import Array, ArrayRecord

    from server.runner import FED_STATS, FED_STATS_STAGED, ServerRunner
    from server.strategy import SparseFedAvg

    runner = ServerRunner(tiny_run(), tmp_path / "run")
    runner.out.mkdir()
    arrays = ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in runner.model.state_dict().items()})
    strategy = SparseFedAvg()

    def stats(value: float) -> dict:
        return {"digit": {"count": np.full(3, value), "sum": np.full((3, 4), value), "outer": np.full((4, 4), value)}}

    strategy.fed_stats = stats(1.0)
    runner.save_checkpoint(arrays, strategy, 1)
    assert not (runner.out / FED_STATS_STAGED).exists()
    runner.done_rounds = 1
    assert runner.load_fed_stats()["digit"]["count"].tolist() == [1.0] * 3
    # round 2's statistics staged, the crash before its checkpoint: round 1's stay whole
    strategy.fed_stats = stats(2.0)
    staged = runner.out / FED_STATS_STAGED
    from fedtune.heads import join_stats
    from fedtune.model import save_checkpoint

    save_checkpoint(staged, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in join_stats(stats(2.0)).items()}, {"round": 2})
    assert runner.load_fed_stats()["digit"]["count"].tolist() == [1.0] * 3
    assert not staged.exists(), "another round's staged statistics are removed"
    # the crash just after round 2's checkpoint: the staged statistics are the checkpoint's
    save_checkpoint(staged, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in join_stats(stats(2.0)).items()}, {"round": 2})
    runner.done_rounds = 2
    assert runner.load_fed_stats()["digit"]["count"].tolist() == [2.0] * 3
    assert not staged.exists() and (runner.out / FED_STATS).is_file()


def test_a_node_whose_config_is_not_the_servers_refuses_the_instruction(task_identity):
    from clients.app import make_client_app

    cfg = tiny_run()
    app = make_client_app(cfg)
    glob = state_to_numpy(global_model(cfg))

    def instruction(key: str, kind: str) -> Message:
        record = RecordDict({protocol.ARRAYS: ArrayRecord(array_dict={k: Array(v) for k, v in glob.items()}),
                             protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: 1, protocol.CONFIG_KEY: key})})
        return Message(record, dst_node_id=5, message_type=kind)

    other = tiny_run(train={**TINY_RUN["train"], "epochs": 2}).key()
    assert other != cfg.key()
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        context = Context(run_id=1, node_id=5, node_config={"partition-id": 3, "num-partitions": 4}, state=RecordDict(), run_config={})
        with pytest.raises(ConfigError, match=f"is not the server's \\(key {other}\\)"):  # Flower's runtime makes it an error reply
            app(instruction(other, kind), context)
        assert not context.state.array_records, "nothing kept"
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 3, "num-partitions": 4}, state=RecordDict(), run_config={})
    assert not app(instruction(cfg.key(), MessageType.TRAIN), context).has_error()


def test_launcher_failures_are_fedtune_errors(tmp_path, monkeypatch):
    """`fedtune simulate` and `deploy local` print a fedtune error, not a traceback, when Flower's
    commands are missing or the installed package is not a source checkout."""
    import simulations.deploy as deploy
    from fedtune.errors import FedtuneError

    assert issubclass(deploy.DeployError, FedtuneError)
    assert deploy.app_dir() == deploy.PROJECT
    monkeypatch.setattr(deploy, "PROJECT", tmp_path)
    with pytest.raises(deploy.DeployError, match="from a source checkout"):
        deploy.app_dir()
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(deploy.DeployError, match="flwr-nonexistent: not found"):
        deploy._bin("flwr-nonexistent")


def test_a_nodes_threads_come_from_its_node_config(task_identity):
    from clients.app import make_client_app

    cfg = tiny_run()
    app = make_client_app(cfg)
    glob = state_to_numpy(global_model(cfg))
    record = RecordDict({protocol.ARRAYS: ArrayRecord(array_dict={k: Array(v) for k, v in glob.items()}), protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: 1})})
    before = torch.get_num_threads()
    try:
        context = Context(run_id=1, node_id=5, node_config={"partition-id": 3, "threads": 2}, state=RecordDict(), run_config={})
        app(Message(record, dst_node_id=5, message_type=MessageType.EVALUATE), context)
        assert torch.get_num_threads() == 2
        context = Context(run_id=1, node_id=5, node_config={"partition-id": 3, "threads": "many"}, state=RecordDict(), run_config={})
        with pytest.raises(ConfigError, match="node config threads='many'"):
            app(Message(record, dst_node_id=5, message_type=MessageType.EVALUATE), context)
    finally:
        torch.set_num_threads(before)


def test_a_personal_prefix_naming_nothing_is_refused_and_a_profile_the_method_cannot_fit_is_named_before_any_round(tmp_path, monkeypatch):
    import server.runner as runner_module
    from server.runner import ServerRunner

    with pytest.raises(ConfigError, match=r"federation.personal\[0\]: 'head.' is the start of no parameter name"):
        ServerRunner(tiny_run(federation={"personal": ["head."]}), tmp_path / "a")
    logged = []
    monkeypatch.setattr(runner_module, "log", lambda level, msg, *args: logged.append(msg % args))
    ServerRunner(tiny_run(method={"name": "full"}, federation={"profiles": ["workstation", "mcu"]}), tmp_path / "b")
    assert len(logged) == 1 and "federation.profiles[1]: method 'full' cannot plan for device profile 'mcu'" in logged[0]
    logged.clear()
    ServerRunner(tiny_run(federation={"personal": ["heads."]}), tmp_path / "c")
    assert logged == []
    with pytest.raises(ConfigError, match=r"block index 11 out of range for a model of depth 4"):  # no client could train
        ServerRunner(tiny_run(method={"name": "bsr", "bsr": {"train_blocks": [1, 11]}}), tmp_path / "d")


def test_a_round_samples_clients_per_round_whatever_the_float_rounding(tmp_path, task_identity):
    """15 of 22: Flower samples int(22 * fraction), and 15 / 22 * 22 is 14.99..."""
    from unittest.mock import Mock

    from server.runner import ServerRunner

    runner = ServerRunner(tiny_run(federation={"num_clients": 22, "clients_per_round": 15, "min_clients": 10}), tmp_path / "run")
    strategy = runner.make_strategy(0)
    strategy.run_token = None
    grid = Mock()
    grid.get_node_ids.return_value = list(range(1, 23))
    arrays = ArrayRecord({"a": Array(np.zeros(2, dtype=np.float32))})
    assert len(list(strategy.configure_train(1, arrays, ConfigRecord(), grid))) == 15
    assert len(list(strategy.configure_evaluate(1, arrays, ConfigRecord(), grid))) == 15


def test_a_seeded_sample_picks_the_same_partitions_whatever_ids_the_nodes_got(tmp_path, task_identity):
    """Flower draws node ids afresh at each launch: the seeded sample is over the partitions the
    nodes hold (asked once), so two launches, or a resumed run, train the same clients."""
    from unittest.mock import Mock

    from server.runner import ServerRunner

    def sampled(ids: list[int]) -> tuple[list[int], list[int]]:
        runner = ServerRunner(tiny_run(federation={"num_clients": 12, "clients_per_round": 4, "min_clients": 4}), tmp_path / "run")
        strategy = runner.make_strategy(0)
        strategy.run_token = None
        node_of = dict(enumerate(ids))  # partition -> node id
        grid = Mock()
        grid.get_node_ids.return_value = list(reversed(ids))
        grid.send_and_receive.side_effect = lambda msgs, timeout=None: [
            Message(RecordDict({protocol.METRICS: MetricRecord({"partition-id": next(p for p, n in node_of.items() if n == m.metadata.dst_node_id)})}),
                    reply_to=m) for m in msgs]
        strategy.node_partition = runner.node_partitions(grid)
        part_of = {n: p for p, n in node_of.items()}
        arrays = ArrayRecord({"a": Array(np.zeros(2, dtype=np.float32))})
        train = sorted(part_of[m.metadata.dst_node_id] for m in strategy.configure_train(3, arrays, ConfigRecord(), grid))
        evaluate = sorted(part_of[m.metadata.dst_node_id] for m in strategy.configure_evaluate(3, arrays, ConfigRecord(), grid))
        return train, evaluate

    first = sampled([101, 57, 9, 4000, 12, 77, 5, 63, 890, 2, 44, 31])
    again = sampled([7, 8001, 3, 19, 642, 55, 1000, 23, 71, 6, 480, 88])
    assert first == again and len(first[0]) == 4


def test_a_client_reports_its_measured_memory_against_its_profile(monkeypatch):
    """The planner plans on estimates; the client reports what its steps measured and how many
    passed its profile's budget."""
    import fedtune.client as client_module
    from fedtune.profiles import PROFILES, DeviceProfile

    cfg = tiny_run()
    glob = state_to_numpy(global_model(cfg))
    roomy = ClientRuntime(cfg, partition_id=0, profile="workstation")
    _, _, m, _ = roomy.fit(glob, ClientState())
    assert m.memory_bytes > m.activation_bytes > 0 and m.steps_over_memory_budget == 0
    # a budget just under what the plan measured, the plan made as before (as when the
    # planner's estimate runs low): every step is over it
    planner = client_module.make_method
    monkeypatch.setattr(client_module, "make_method", lambda method, model, profile, *a, **k: planner(method, model, "workstation", *a, **k))
    tight = ClientRuntime(cfg, partition_id=0, profile="workstation")
    tight.profile = DeviceProfile("tight", memory_bytes=m.memory_bytes - 1, flops_per_sample=PROFILES["workstation"].flops_per_sample)
    _, _, m2, _ = tight.fit(glob, ClientState())
    assert m2.memory_bytes == m.memory_bytes and m2.steps_over_memory_budget == m2.steps > 0
    assert protocol.TrainMetrics.from_dict(m2.to_dict()).steps_over_memory_budget == m2.steps


def test_a_dp_resume_counts_the_models_that_went_out_before_their_records(tmp_path, task_identity):
    """Round r's model goes out (evaluate r, train r+1) before round r's record is written: the
    ledger keeps the newest round released, so a crash between the two still counts it."""
    from unittest.mock import Mock

    from server.runner import DP_LEDGER, ServerRunner

    cfg = tiny_run(federation={"num_clients": 4, "rounds": 6, "clip_update_norm": 1.0, "dp_noise_multiplier": 1.1})
    runner = ServerRunner(cfg, tmp_path / "run")
    runner.out.mkdir()
    strategy = runner.make_strategy(0)
    runner.strategy, strategy.on_release = strategy, runner.released
    grid = Mock()
    grid.get_node_ids.return_value = [1, 2, 3, 4]
    arrays = ArrayRecord({"a": Array(np.zeros(2, dtype=np.float32))})
    list(strategy.configure_train(3, arrays, ConfigRecord(), grid))  # trains from round 2's model
    assert json.loads((runner.out / DP_LEDGER).read_text())["released_through"] == 2
    list(strategy.configure_evaluate(3, arrays, ConfigRecord(), grid))  # round 3's model goes out
    assert json.loads((runner.out / DP_LEDGER).read_text()) == {"rounds_repeated": 0, "released_through": 3, "cut_at": None}
    # the crash: checkpoint of round 1, records of rounds 1 and 2 only; rounds 2 and 3 went out
    runner.done_rounds = 1
    records = [{"round": r} for r in (0, 1, 2)]
    resumed = runner.make_strategy(1)
    runner.count_repeated(resumed, records)
    assert resumed.dp_rounds_repeated == 2
    assert json.loads((runner.out / DP_LEDGER).read_text()) == {"rounds_repeated": 2, "released_through": 1, "cut_at": 1}
    # a crash between that ledger and the cut of metrics.jsonl: the next resume does not count the records again
    twice = runner.make_strategy(1)
    runner.count_repeated(twice, records)
    assert twice.dp_rounds_repeated == 2
    # a second crash after round 2 went out again, before its record: one more
    runner.strategy, runner.released_through, runner.cut_at = resumed, 1, 1
    runner.released(2)
    again = runner.make_strategy(1)
    runner.count_repeated(again, [{"round": 0}, {"round": 1}])
    assert again.dp_rounds_repeated == 3
    # a later checkpoint (round 2, which holds the count 3): records past it count again
    runner.done_rounds = 2
    later = runner.make_strategy(2)
    later.dp_rounds_repeated = 3
    runner.count_repeated(later, [{"round": r} for r in range(4)])
    assert later.dp_rounds_repeated == 4


def test_a_single_run_is_refused_an_out_that_holds_another_runs_results(tmp_path):
    """An independent-task run keeps its federations in <out>/<task>/, with only config.json and
    summary.json at the top: a single run there would overwrite them."""
    from simulations.run import check_out

    out = tmp_path / "md"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"federation": {"independent_tasks": True}}))
    with pytest.raises(ConfigError, match="holds the results of another run"):
        check_out(out, resume=False)
    (out / "config.json").write_text(json.dumps({"federation": {"independent_tasks": False}}))
    check_out(out, resume=False)  # a single run that stopped before writing anything else: run it again
    (out / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds the results of another run"):
        check_out(out, resume=False)


def test_metric_records_keep_numpy_numbers_and_bool_lists():
    from clients.records import metric_record

    rec = metric_record({"a": np.int64(3), "b": np.float32(1.5), "c": [True, 2], "d": np.array([1, 2]), "e": None, "f": "text",
                         "g": True, "h": [1, 2.5], "i": [[1], [2]], "j": np.array(0.5)})
    assert dict(rec) == {"a": 3, "b": 1.5, "c": [1, 2], "d": [1, 2], "g": 1, "h": [1.0, 2.5], "j": 0.5}


def test_the_progress_bar_counts_whole_round_records(tmp_path):
    from simulations.run import rounds_recorded

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n{"round": 3, "acc')  # the last line cut by a crash
    assert rounds_recorded(path, 5) == 2
    assert rounds_recorded(tmp_path / "none.jsonl", 5) == 0


def test_the_blocks_plot_stays_a_page_for_long_runs_of_many_clients(tmp_path):
    from PIL import Image

    from fedtune.report import plot_run

    client = {"accepted": True, "steps": 4, "block_updates": [1, 0, 3, 0]}
    rounds = [{"round": 0, "accuracy_global": 0.1}] + [
        {"round": r, "accuracy_global": 0.5, "bytes_up": 1, "bytes_up_full_fedavg": 2, "clients": [{**client, "partition_id": c} for c in range(20)]}
        for r in range(1, 301)
    ]
    plot_run(rounds, tmp_path, 4)
    assert Image.open(tmp_path / "blocks.png").size[1] <= 24 * 120  # 6,000 rows: 24 inches at 120 dpi, not 1,080


def test_without_dp_no_ledger_is_written(tmp_path, task_identity):
    from unittest.mock import Mock

    from server.runner import DP_LEDGER, ServerRunner

    runner = ServerRunner(tiny_run(federation={"num_clients": 4, "rounds": 3}), tmp_path / "run")
    runner.out.mkdir()
    strategy = runner.make_strategy(0)
    runner.strategy = strategy
    assert strategy.on_release is None
    grid = Mock()
    grid.get_node_ids.return_value = [1, 2, 3, 4]
    list(strategy.configure_train(2, ArrayRecord({"a": Array(np.zeros(2, dtype=np.float32))}), ConfigRecord(), grid))
    runner.done_rounds = 1
    runner.count_repeated(runner.make_strategy(1), [{"round": 0}, {"round": 1}, {"round": 2}])
    assert not (runner.out / DP_LEDGER).exists()
