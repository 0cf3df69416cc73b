"""The personalized-FL protocol: pooled partitions, personalization schemes, the sparse downlink."""

from unittest.mock import Mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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
from torch import nn

from fedtune import protocol
from fedtune.client import ClientRuntime, personal_lda_head
from fedtune.client_state import PERSONAL_MODEL, ClientState, personal_model, personal_params
from fedtune.errors import ConfigError
from fedtune.federated import client_data, federated_data, global_model, state_to_numpy
from fedtune.heads import ABSENT_CLASS_BIAS, class_moments, class_stats, discriminant, lda_head
from fedtune.typedconfig import to_dict
from server.downlink import FULL, Downlink
from server.strategy import SparseFedAvg
from tests.test_federated import TINY_RUN, tiny_run


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def record_of(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


# --------------------------------------------------------------------------- the protocol's data


def test_pooled_partition_tests_every_client_on_images_no_client_trains_on():
    cfg = tiny_run(partition={"scheme": "dirichlet", "alpha": 0.3, "min_partition_size": 5, "local_test_fraction": 0.25, "pool": True})
    split, parts = federated_data(cfg)
    assert len(split.train) == 200, "train (160) and test (40) pooled"
    assert sum(len(p) for p in parts) == 200
    trains = [client_data(cfg, pid)[0] for pid in range(4)]
    tests = [client_data(cfg, pid)[1] for pid in range(4)]
    for pid in range(4):
        assert len(tests[pid]) == round(0.25 * len(parts[pid]))
    # the central test set is exactly the union of the local test splits
    central = {tuple(x.flatten()[:40].tolist()) for x in split.test.images}
    local = {tuple(x.flatten()[:40].tolist()) for t in tests for x in t.images}
    train = {tuple(x.flatten()[:40].tolist()) for t in trains for x in t.images}
    assert central == local and not central & train
    # what the run trained on (export's MoE survey reads it): the local train splits, no test image
    from fedtune.federated import training_images

    trained = {tuple(x.flatten()[:40].tolist()) for x in training_images(cfg).images}
    assert trained == train and len(training_images(cfg)) == sum(map(len, trains))
    # new clients (pFL-Bench's unseen clients) are not in the training clients' central test set
    cfg = tiny_run(partition={"scheme": "dirichlet", "alpha": 0.3, "min_partition_size": 5, "local_test_fraction": 0.25, "pool": True},
                   federation={"num_clients": 3, "new_clients": 1, "personalization": "lda"})
    split, _ = federated_data(cfg)
    training = sum(len(client_data(cfg, pid)[1]) for pid in range(3))
    assert len(split.test) == training and len(client_data(cfg, 3)[1]) > 0


# --------------------------------------------------------------------------- personal heads


def test_personal_lda_head_own_means_and_priors_the_federations_covariance():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 4)) * 3
    def sample(counts):
        y = np.repeat(np.arange(3), counts)
        return torch.from_numpy(means[y] + rng.normal(size=(len(y), 4))), torch.from_numpy(y)
    fed = class_stats(*sample([300, 300, 300]), 3)
    own = class_stats(*sample([50, 2, 0]), 3)
    # without the federation: LDA of the client's own statistics (the absent class left out), its
    # covariance shrunk by d / (n + d) towards its mean variance (52 examples, 4 features)
    w0, b0 = personal_lda_head(own, None, 1.0)
    count, own_means, own_cov = class_moments(own)
    w_ref, b_ref = discriminant(own_means, own_cov, count / count.sum(), count > 0, 4 / (52 + 4))
    torch.testing.assert_close(w0, w_ref)
    torch.testing.assert_close(b0, b_ref)
    assert not torch.allclose(w0, lda_head(own)[0]), "not the token shrinkage of the federation's fit"
    # with it: the federation's covariance, the client's means pulled by one pseudo-example, its priors
    w1, b1 = personal_lda_head(own, fed, 1.0)
    count, own_means, _ = class_moments(own)
    _, fed_means, fed_cov = class_moments(fed)
    mixed = (count[:, None] * own_means + fed_means) / (count[:, None] + 1.0)
    w_ref, b_ref = discriminant(mixed, fed_cov, count / count.sum(), count > 0)
    torch.testing.assert_close(w1, w_ref)
    torch.testing.assert_close(b1, b_ref)
    assert b1[2] == ABSENT_CLASS_BIAS, "a class the client never saw is left out"
    x = torch.from_numpy(means).float()
    assert (x @ w1.T + b1).argmax(1)[:2].tolist() == [0, 1]
    # a client with one class predicts that class
    w2, b2 = personal_lda_head(class_stats(*sample([5, 0, 0]), 3), None, 1.0)
    assert (x @ w2.T + b2).argmax(1).tolist() == [0, 0, 0]
    assert torch.all(w1[2] == 0), "an absent class's logit is its bias alone"
    # a class the federation's statistics lack (sampled evaluation) keeps the client's own mean
    partial = class_stats(*sample([300, 0, 300]), 3)
    w3, b3 = personal_lda_head(own, partial, 1.0)
    _, part_means, part_cov = class_moments(partial)
    pull = np.array([1.0, 0.0, 1.0])[:, None]
    w_ref, b_ref = discriminant((count[:, None] * own_means + pull * part_means) / np.maximum(count[:, None] + pull, 1e-12), part_cov, count / count.sum(), count > 0)
    torch.testing.assert_close(w3, w_ref)
    torch.testing.assert_close(b3, b_ref)


def test_a_protocol_without_local_tests_is_refused():
    with pytest.raises(ConfigError, match="local_test_fraction: must be in"):
        tiny_run(partition={"scheme": "dirichlet", "alpha": 0.3, "local_test_fraction": 0.0, "pool": True})
    with pytest.raises(ConfigError, match="partition.self_balancing: applies to the dirichlet scheme only, not 'pathological'"):
        tiny_run(partition={"scheme": "pathological", "self_balancing": True})


@pytest.mark.parametrize("mode", ["lda", "fedrod", "local_head", "fedper", "fedrep", "fedbabu", "ditto", "local", "finetune", "none"])
def test_each_personalization_reports_what_it_promises(mode):
    """Each mode's personalized number is the model it promises, recomputed here from the
    client's state where it can be (lda and local_head: the personal head on the global
    features; local, FedPer, FedRep: the global model with the client's own parameters;
    Ditto: the client's own model); fine-tuning modes measure in the final evaluation only."""
    cfg = tiny_run(federation={"num_clients": 4, "rounds": 2, "personalization": mode})
    rt = ClientRuntime(cfg, partition_id=1)
    glob = state_to_numpy(global_model(cfg))
    update, _, metrics, state = rt.fit(glob, ClientState())
    if mode in ("fedrep", "none"):  # FedRep's head phase counts in the steps it reports: the head's epochs on top of the body's
        body = -(-len(rt.train_set) // cfg.train.batch_size) * cfg.train.epochs
        assert metrics.steps == body + (-(-len(rt.train_set) // cfg.train.batch_size) * cfg.federation.rep_head_epochs if mode == "fedrep" else 0)
    if mode == "local":
        assert update == {} and "vit.cls_token" in state.personal
    if mode == "ditto":
        own = personal_model(state.personal)
        assert set(own) == set(glob), "the client keeps a whole model of its own"
        assert not any(k.startswith(PERSONAL_MODEL) for k in update) and personal_params(state.personal) == {}
        trained = state_to_numpy(rt.model)
        assert any(not np.array_equal(own[k], glob[k]) for k in glob) and any(not np.array_equal(own[k], trained[k]) for k in update)
    if mode in ("fedper", "fedrep"):
        assert not any(k.startswith("heads.") for k in update) and "heads.digit.weight" in state.personal
    if mode == "fedrep":
        # the head trained in its own phase (it moved from the global one), then stayed fixed while the body trained
        assert not np.array_equal(state.personal["heads.digit.weight"], glob["heads.digit.weight"])
        assert any(k.startswith("vit.blocks.") for k in update)
        from fedtune.client import HeadFixed
        from fedtune.methods import make_method

        assert make_method(cfg.method, rt.model, rt.profile, 16, "digit").plan().train_head
        assert not HeadFixed(make_method(cfg.method, rt.model, rt.profile, 16, "digit")).plan().train_head
    if mode == "fedbabu":
        # the body learned, the head stayed as the server sent it
        assert any(k.startswith("vit.blocks.") and not np.array_equal(v, glob[k]) for k, v in update.items())
        assert all(np.array_equal(v, glob[k]) for k, v in state_to_numpy(rt.model).items() if k.startswith("heads."))
        assert not any(k.startswith("heads.") for k in update), "an unchanged head is not sent (send: updated)"
    ev, stats, kept = rt.evaluate(glob, state, want_stats=True, final=True)
    assert set(stats) == {"digit.count", "digit.sum", "digit.outer"}
    assert ev.accuracy_global is not None
    if mode == "none":
        assert ev.accuracy_personal is None
    else:
        assert 0.0 <= ev.accuracy_personal <= 1.0
    assert (kept is not None) == (mode == "lda"), "the final lda head is kept for export"
    if mode in ("local_head", "lda"):
        # the personalized number is that personal head on the global model's features of the local test split
        from fedtune.client_state import personal_head
        from fedtune.heads import extract_features

        head = personal_head((kept or state).personal, "digit")
        assert head, "the personal head is in the client's state"
        feats, labels = extract_features(rt.model, rt.test_set, "digit")
        logits = feats @ torch.as_tensor(head["weight"]).T + torch.as_tensor(head["bias"])
        assert ev.accuracy_personal == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
        if mode == "local_head":
            assert not any(k.startswith("personal_head.") for k in update), "the personal head never leaves the client"
    if mode in ("local", "fedper", "fedrep", "ditto"):
        # the personalized number is the global model with the client's own parameters (Ditto: its own whole model)
        from fedtune.federated import load_numpy_state
        from fedtune.heads import evaluate

        mine = global_model(cfg)
        load_numpy_state(mine, glob)
        load_numpy_state(mine, personal_model(state.personal) if mode == "ditto" else personal_params(state.personal))
        assert personal_params(state.personal) or mode == "ditto", "the state holds the client's own parameters"
        assert ev.accuracy_personal == pytest.approx(evaluate(mine, rt.test_set, "digit")["accuracy"])
    if mode in ("finetune", "fedbabu"):
        assert rt.evaluate(glob, state)[0].accuracy_personal is None, "fine-tuning runs in the final evaluation only"
        # the shared model is left holding the global parameters
        assert all(np.array_equal(v, glob[k]) for k, v in state_to_numpy(rt.model).items())


def test_fedrod_adds_the_personal_logits_to_the_generic_ones_and_trains_on_the_sum():
    """FedRoD: the personal head starts at zero (the personalized model is the global one),
    trains on the generic head's detached logits plus its own, and predicts with the sum;
    local_head starts from the global head and predicts alone."""
    from fedtune.client import PersonalHeadTrainer
    from fedtune.engine import full_plan
    from fedtune.heads import extract_features

    cfg = tiny_run(federation={"num_clients": 4, "personalization": "fedrod"})
    rt = ClientRuntime(cfg, partition_id=1)
    glob = state_to_numpy(global_model(cfg))
    rt._load(glob, ClientState())
    head = rt.personal_heads["digit"]
    assert torch.all(head.weight == 0) and torch.all(head.bias == 0)
    start = rt.evaluate(glob, ClientState())[0]
    assert start.accuracy_personal == start.accuracy_global, "a zero personal head adds nothing"
    # the loss it trains on: cross-entropy of the generic head's detached logits plus its own
    nn.init.normal_(head.weight, std=0.1)
    feats = torch.randn(6, rt.model.vit.embed_dim, requires_grad=True)
    labels = torch.arange(6) % 10
    probe = PersonalHeadTrainer.__new__(PersonalHeadTrainer)  # its loss alone, without an optimizer
    probe.personal_head, probe.additive, probe.model, probe.task = head, True, rt.model, "digit"
    loss = probe.extra_loss(feats, labels)
    expected = F.cross_entropy(rt.model.forward_head(feats, "digit").detach() + head(feats.detach()), labels)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert feats.grad is None and rt.model.heads["digit"].weight.grad is None, "neither the features nor the generic head learn from it"
    assert head.weight.grad is not None
    _, _, _, state = rt.fit(glob, ClientState())
    ev = rt.evaluate(glob, state)[0]
    rt._load(glob, state)
    x, y = extract_features(rt.model, rt.test_set.for_task("digit"), "digit", 256, full_plan(rt.model.depth))
    summed = ((rt.model.forward_head(x, "digit") + rt.personal_heads["digit"](x)).argmax(-1) == y).float().mean()
    assert ev.accuracy_personal == pytest.approx(float(summed))
    # local_head: from the global head, predicting alone
    lh = ClientRuntime(tiny_run(federation={"num_clients": 4, "personalization": "local_head"}), partition_id=1)
    lh._load(glob, ClientState())
    torch.testing.assert_close(lh.personal_heads["digit"].weight, lh.model.heads["digit"].weight)


def test_ditto_trains_the_clients_own_model_with_the_pull_to_the_global_one(monkeypatch):
    from fedtune import client as client_module
    from fedtune.client import ProximalTrainer
    from fedtune.engine import full_plan
    from fedtune.federated import load_numpy_state
    from fedtune.heads import extract_features
    from fedtune.methods import MethodConfig, make_method

    cfg = tiny_run(federation={"num_clients": 4, "personalization": "ditto", "ditto_lambda": 3.0})
    rt = ClientRuntime(cfg, partition_id=1)
    glob = state_to_numpy(global_model(cfg))
    # the loss term is lambda / 2 * ||v - w||^2 over the parameters that train
    anchor = {n: p.detach().clone() for n, p in rt.model.named_parameters()}
    with torch.no_grad():
        rt.model.heads["digit"].weight.add_(0.5)
    trainer = ProximalTrainer(rt.model, make_method(MethodConfig(name="full"), rt.model, rt.profile, 16, "digit"), cfg.train, "digit", anchor=anchor, strength=3.0)
    expected = 1.5 * sum(float(((p.detach() - anchor[n]) ** 2).sum()) for n, p in rt.model.named_parameters())
    assert float(trainer.extra_loss(None, None).detach()) == pytest.approx(expected, rel=1e-5) and expected > 0
    # round 1 starts the client's own model from the global one
    anchors = []
    monkeypatch.setattr(client_module, "ProximalTrainer", lambda *a, anchor, **k: anchors.append(anchor) or ProximalTrainer(*a, anchor=anchor, **k))
    _, _, metrics, state = rt.fit(glob, ClientState(), server_round=1)
    first = personal_model(state.personal)
    plain = ClientRuntime(tiny_run(federation={"num_clients": 4, "personalization": "none"}), partition_id=1).fit(glob, ClientState(), server_round=1)[2]
    assert metrics.steps == 2 * plain.steps, "the round's steps count the own model's epoch too"
    # round 2, with a new global model: the kept model trains on, pulled towards the new global one
    glob2 = {k: v + np.float32(0.01) if np.issubdtype(v.dtype, np.floating) else v for k, v in glob.items()}
    _, _, _, state2 = rt.fit(glob2, state, server_round=2)
    second = personal_model(state2.personal)
    assert all(np.allclose(anchors[1][n].numpy(), glob2[n]) for n in anchors[1]) and len(anchors[1]) == len(list(rt.model.named_parameters()))
    fresh = personal_model(ClientRuntime(cfg, partition_id=1).fit(glob2, ClientState(), server_round=2)[3].personal)
    assert any(not np.allclose(second[k], fresh[k]) for k in second), "round 2 trains the kept model, not a fresh copy of the global one"
    def dist(a, g):
        return sum(float(np.sum((a[k] - g[k]) ** 2)) for k in g if np.issubdtype(g[k].dtype, np.floating))
    assert dist(first, glob) > 0
    # without the pull it strays further from the global model
    free = tiny_run(federation={"num_clients": 4, "personalization": "ditto", "ditto_lambda": 0.0})
    assert dist(personal_model(ClientRuntime(free, partition_id=1).fit(glob, ClientState(), server_round=1)[3].personal), glob) > dist(first, glob)
    # the personalized accuracy is the client's own model's, on its local test split
    ev, _, _ = rt.evaluate(glob2, state2)
    load_numpy_state(rt.model, second)
    test = rt.test_set.for_task("digit")
    feats, labels = extract_features(rt.model, test, "digit", 256, full_plan(rt.model.depth))
    assert ev.accuracy_personal == pytest.approx(float((rt.model.forward_head(feats, "digit").argmax(-1) == labels).float().mean()))


def test_bad_personalization_configs_are_clear_errors():
    for fed, match in (({"personalization": "pfedme"}, "personalization"), ({"ditto_lambda": -0.1}, "ditto_lambda"), ({"ditto_epochs": 0}, "ditto_epochs"),
                       ({"new_clients": 2, "personalization": "ditto"}, "no ditto personal model"), ({"lda_shrink": -1}, "lda_shrink"),
                       ({"finetune_epochs": 0}, "finetune_epochs"), ({"downlink": "delta"}, "downlink"),
                       ({"new_clients": 2, "personalization": "fedrod"}, "a new client never trains, so it has no fedrod personal model"),
                       ({"personalization": "fedbabu", "final_evaluation": False}, "fedbabu fine-tunes the final global model in the final evaluation"),
                       ({"personalization": "finetune", "final_evaluation": False}, "set final_evaluation: true"),
                       ({"personalization": "fedbabu", "send": "all", "dp_noise_multiplier": 1.0, "clip_update_norm": 1.0}, "noise would move the task head")):
        with pytest.raises(ConfigError, match=match):
            tiny_run(federation={"num_clients": 4, **fed})
    with pytest.raises(ConfigError, match="fedbabu holds the task head at its initialization.*train.head_fit 'before'"):
        tiny_run(federation={"num_clients": 4, "personalization": "fedbabu"}, train={"epochs": 1, "batch_size": 16, "head_fit": "before"})
    with pytest.raises(ConfigError, match="personal: personalization lda builds each client's model from the global one"):
        tiny_run(federation={"num_clients": 4, "personalization": "lda", "personal": ["vit.norm."]})
    with pytest.raises(ConfigError, match="fedrep trains the personal head first.*train.head_fit 'after'"):
        tiny_run(federation={"num_clients": 4, "personalization": "fedrep"}, train={"epochs": 1, "batch_size": 16, "head_fit": "after"})
    lda_fit = {"epochs": 1, "batch_size": 16, "head_fit": "before", "head_fit_kind": "lda"}
    with pytest.raises(ConfigError, match="head_fit_kind: lda on a client .*averaging the shared head"):
        tiny_run(federation={"num_clients": 4}, train=lda_fit)
    assert tiny_run(federation={"num_clients": 4, "personalization": "fedper"}, train=lda_fit).train.head_fit_kind == "lda", "a personal head is never averaged"
    assert tiny_run(federation={"num_clients": 4, "new_clients": 2, "personalization": "fedbabu"}).federation.new_clients == 2, "a new client fine-tunes as the others do"
    with pytest.raises(ConfigError, match="shared_blocks.*federation.feed_importance: true"):
        tiny_run(federation={"num_clients": 4, "feed_importance": False}, method={"name": "alast", "alast": {"shared_blocks": True}})


def test_a_client_without_local_test_examples_reports_no_accuracy():
    """Nothing to measure on is not measured on the training data instead: the client reports
    num-examples 0 and no accuracy (its head is still built and its statistics still sent),
    and the protocol's numbers are taken over the clients that were measured."""
    from fedtune.report import protocol_numbers

    cfg = tiny_run(federation={"num_clients": 4, "personalization": "lda"})
    rt = ClientRuntime(cfg, partition_id=1)
    glob = state_to_numpy(global_model(cfg))
    measured = rt.evaluate(glob, ClientState(), want_stats=True, final=True)[0]
    rt.test_set = rt.test_set.subset(np.zeros(0, dtype=np.int64))
    ev, stats, kept = rt.evaluate(glob, ClientState(), want_stats=True, final=True)
    assert (ev.num_examples, ev.accuracy_global, ev.accuracy_personal) == (0, None, None)
    # nor training examples of a task (a multidomain client): zero statistics, not a crash
    from fedtune.heads import extract_features

    feats, labels = extract_features(rt.model, rt.train_set.subset(np.zeros(0, dtype=np.int64)), "digit")
    assert feats.shape == (0, rt.model.heads["digit"].in_features) and labels.shape == (0,)
    assert set(stats) == {"digit.count", "digit.sum", "digit.outer"} and kept is not None
    wire = ev.to_dict()
    assert "accuracy-global" not in wire and protocol.EvalMetrics.from_dict(wire) == ev
    with pytest.raises(KeyError, match="accuracy-global"):
        protocol.EvalMetrics.from_dict({k: v for k, v in measured.to_dict().items() if k != "accuracy-global"})
    with pytest.raises(ValueError, match="num-examples"):
        protocol.EvalMetrics.from_dict({**wire, "num-examples": 2.5})
    numbers = protocol_numbers([{"partition_id": 1, "num_examples": measured.num_examples,
                                 "accuracy_global": measured.accuracy_global, "accuracy_personal": measured.accuracy_personal},
                                {"partition_id": 2, "num_examples": 0, "accuracy_global": None, "accuracy_personal": None}])
    assert numbers["accuracy_personalized"] == measured.accuracy_personal and numbers["accuracy_global_local"] == measured.accuracy_global
    assert numbers["accuracy_personalized_worst10"] == measured.accuracy_personal and numbers["personalized_at_least_global_fraction"] in (0.0, 1.0)
    assert [c["partition_id"] for c in numbers["clients"]] == [1, 2]


def test_a_partition_too_small_for_a_local_test_is_named_in_a_warning():
    from fedtune.federated import client_data

    cfg = tiny_run(data={**TINY_RUN["data"], "max_train": 24}, federation={"num_clients": 12},
                   partition={"scheme": "iid", "local_test_fraction": 0.2})
    with pytest.warns(UserWarning, match="client 0: its partition of 2 image\\(s\\) leaves no local test image"):
        train, test = client_data(cfg, 0)
    assert len(test) == 0 and len(train) == 2


def test_probe_reports_the_protocols_numbers_on_the_starting_model():
    """`fedtune probe` of a pooled lda run: each client's closed-form personal head from its
    own statistics and the federation's, and the fitted global model, on its local test split
    of the starting model; no such numbers where the run has no local tests."""
    from fedtune.heads import extract_features
    from fedtune.probe import head_fit_reference

    cfg = tiny_run(partition={"scheme": "dirichlet", "alpha": 0.3, "min_partition_size": 5, "local_test_fraction": 0.25, "pool": True},
                   federation={"num_clients": 4, "personalization": "lda"})
    lines: list[str] = []
    got = head_fit_reference(cfg, progress=lines.append)
    assert [c["partition_id"] for c in got["clients"]] == [0, 1, 2, 3]
    assert [line.rsplit(" (", 1)[0] for line in lines] == [f"probe: client {n}/4 class statistics" for n in range(1, 5)] + [
        f"probe: task {task}: central test {got['accuracy_per_task'][task]:.4f}" for task in got["accuracy_per_task"]] + [
        f"probe: client {pid} evaluated ({pid + 1}/4)" for pid in range(4)], "progress: each client's statistics, each task, each client's evaluation"
    model = global_model(cfg)
    task = model.tasks[0]
    per_client = [client_data(cfg, pid) for pid in range(4)]
    own = [class_stats(*extract_features(model, train, task), 10) for train, _ in per_client]
    fed = {k: sum(o[k] for o in own) for k in own[0]}
    gw, gb = lda_head(fed)
    weights, pers, glob = [], [], []
    for (_, test), stats in zip(per_client, own, strict=True):
        feats, labels = extract_features(model, test, task)
        w, b = personal_lda_head(stats, fed, cfg.federation.lda_shrink)
        pers.append(float(((feats @ w.T + b).argmax(-1) == labels).float().mean()))
        glob.append(float(((feats @ gw.T + gb).argmax(-1) == labels).float().mean()))
        weights.append(len(labels))
    for c, p, g in zip(got["clients"], pers, glob, strict=True):
        assert c["accuracy_personalized"] == pytest.approx(p, abs=1.0 / c["num_examples"] + 1e-9)  # a near tie may flip
        assert c["accuracy_global_local"] == pytest.approx(g, abs=1.0 / c["num_examples"] + 1e-9)
    assert got["accuracy_personalized"] == pytest.approx(np.average([c["accuracy_personalized"] for c in got["clients"]], weights=weights))
    assert got["accuracy_personalized_worst10"] == min(c["accuracy_personalized"] for c in got["clients"])
    assert "accuracy_personalized" not in head_fit_reference(tiny_run()), "no local test splits: no protocol numbers"
    with_new = head_fit_reference(tiny_run(partition=to_dict(cfg.partition), federation={"num_clients": 3, "new_clients": 1, "personalization": "lda"}))
    assert [c["partition_id"] for c in with_new["clients"]] == [0, 1, 2]
    assert [c["partition_id"] for c in with_new["new_clients"]["clients"]] == [3]


# --------------------------------------------------------------------------- the sparse downlink


def test_downlink_sends_what_changed_since_the_version_a_node_holds():
    d = Downlink(sparse=True)
    g0 = record_of({"a": np.zeros(2, np.float32), "b": np.ones(3, np.float32)})
    d.observe(g0)
    assert d.payload(7, g0) == (g0, FULL), "an unknown node gets everything"
    d.delivered(7)
    g1 = record_of({"a": np.zeros(2, np.float32), "b": np.full(3, 2, np.float32)})
    assert d.observe(g1) == 1
    sent, base = d.payload(7, g1)
    assert base == 0 and list(sent.keys()) == ["b"]
    assert d.payload(8, g1)[1] == FULL
    d.forget(7, "test")
    assert d.payload(7, g1)[1] == FULL
    assert Downlink(sparse=False).payload(7, g1)[1] == FULL


def test_a_resumed_server_numbers_its_versions_apart_from_the_process_before_it():
    """After --resume the run token is the same: a copy (or a queued instruction) of the old
    process's version k must not pass for the new process's version k."""
    fresh = SparseFedAvg(sparse_downlink=True)
    resumed = SparseFedAvg(sparse_downlink=True, round_offset=3)
    g0 = record_of({"a": np.zeros(2, np.float32)})
    assert fresh.downlink.observe(g0) == 0
    start = resumed.downlink.observe(g0)
    assert start > 0 and resumed.downlink.observe(record_of({"a": np.ones(2, np.float32)})) == start + 1
    assert resumed.downlink.payload(7, g0)[1] == FULL, "an unknown node gets everything"
    resumed.downlink.delivered(7)
    sent, base = resumed.downlink.payload(7, record_of({"a": np.ones(2, np.float32)}))
    assert base == start + 1 and not list(sent.keys())
    assert SparseFedAvg(sparse_downlink=True, round_offset=3).downlink.version != start, "a random start per process"


def train_reply(node, need_full=False):
    """A node's reply to a train instruction: its update of "b", or that it needs the whole model."""
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = {protocol.NEED_FULL_MODEL: 1} if need_full else {protocol.NUM_EXAMPLES: 5}
    content = RecordDict({protocol.METRICS: MetricRecord(metrics)})
    if not need_full:
        content[protocol.ARRAYS] = record_of({"b": np.full(3, float(node), np.float32)})
    return Message(content, reply_to=instruction)


def test_strategy_resends_the_whole_model_to_a_node_that_lost_its_copy(monkeypatch):
    import server.strategy

    logged = Mock(wraps=server.strategy.log)
    monkeypatch.setattr(server.strategy, "log", logged)
    strategy = SparseFedAvg(sparse_downlink=True)
    grid = Mock()
    grid.get_node_ids.return_value = [1, 2]
    g0 = record_of({"a": np.zeros(2, np.float32), "b": np.ones(3, np.float32)})
    first = list(strategy.configure_train(1, g0, ConfigRecord(), grid))
    assert all(m.content[protocol.CONFIG][protocol.BASE_VERSION] == FULL for m in first)
    full_bytes = strategy.bytes_down_round
    g1, _ = strategy.aggregate_train(1, [train_reply(1), train_reply(2)])
    second = list(strategy.configure_train(2, g1, ConfigRecord(), grid))
    assert all(list(m.content[protocol.ARRAYS].keys()) == ["b"] and m.content[protocol.CONFIG][protocol.BASE_VERSION] == 0 for m in second)
    assert strategy.bytes_down_round < full_bytes
    # node 2 lost its copy: it is resent everything within the round and its update counts
    grid.send_and_receive.side_effect = lambda msgs, timeout: [train_reply(m.metadata.dst_node_id) for m in msgs]
    _, metrics = strategy.aggregate_train(2, [train_reply(1), train_reply(2, need_full=True)])
    resent = grid.send_and_receive.call_args[0][0]
    assert [m.metadata.dst_node_id for m in resent] == [2]
    assert resent[0].content[protocol.CONFIG][protocol.BASE_VERSION] == FULL and set(resent[0].content[protocol.ARRAYS].keys()) == {"a", "b"}
    assert metrics[protocol.REPLIES_ACCEPTED] == 2
    assert any("lost their model copy" in str(c.args[1]) for c in logged.call_args_list), "the recovery is logged"
    # a node that still has no usable copy after the resend is left out with that reason
    list(strategy.configure_train(3, g1, ConfigRecord(), grid))
    grid.send_and_receive.side_effect = lambda msgs, timeout: [train_reply(m.metadata.dst_node_id, need_full=True) for m in msgs]
    strategy.aggregate_train(3, [train_reply(1), train_reply(2, need_full=True)])
    assert [(n, r) for n, r in strategy.last_rejections] == [(2, "it still holds no usable model copy after the whole model was resent")]


def test_a_round_without_replies_receives_no_bytes():
    """Its bytes up are 0, not the previous round's again."""
    strategy = SparseFedAvg(sparse_downlink=True)
    grid = Mock()
    grid.get_node_ids.return_value = [1, 2]
    g0 = record_of({"a": np.zeros(2, np.float32), "b": np.ones(3, np.float32)})
    list(strategy.configure_train(1, g0, ConfigRecord(), grid))
    g1, _ = strategy.aggregate_train(1, [train_reply(1), train_reply(2)])
    assert strategy.bytes_up_round > 0
    list(strategy.configure_train(2, g1, ConfigRecord(), grid))
    assert strategy.aggregate_train(2, []) == (None, None) and strategy.bytes_up_round == 0


def test_every_instruction_names_the_run_and_a_resumed_strategy_keeps_its_token():
    from fedtune.errors import CheckpointError

    strategy = SparseFedAvg(sparse_downlink=True)
    grid = Mock()
    grid.get_node_ids.return_value = [1, 2]
    g0 = record_of({"a": np.zeros(2, np.float32)})
    sent = list(strategy.configure_train(1, g0, ConfigRecord(), grid))
    assert {m.content[protocol.CONFIG][protocol.RUN_TOKEN] for m in sent} == {strategy.run_token}
    resumed = SparseFedAvg(sparse_downlink=True)
    assert resumed.run_token != strategy.run_token, "each run its own"
    resumed.load_state_dict(strategy.state_dict())
    assert resumed.run_token == strategy.run_token
    older = {k: v for k, v in strategy.state_dict().items() if k != "run_token"}
    fresh = SparseFedAvg(sparse_downlink=True)
    fresh.load_state_dict(older)  # a checkpoint written before run tokens: its clients' files name no run
    assert fresh.run_token is None
    assert all(protocol.RUN_TOKEN not in m.content[protocol.CONFIG] for m in fresh.configure_train(2, g0, ConfigRecord(), grid)), "no token: clients keep their files"
    for bad in (5, "", "../../x"):
        with pytest.raises(CheckpointError, match="run_token"):
            fresh.load_state_dict({**older, "run_token": bad})
    from clients.app import _run_token

    with pytest.raises(ConfigError, match="not a run token"):
        _run_token(ConfigRecord({protocol.RUN_TOKEN: "../../x"}))
    assert _run_token(ConfigRecord({})) is None


def test_full_fedavgs_downlink_from_the_same_start_leaves_out_only_the_starting_model_clients_built():
    strategy = SparseFedAvg(sparse_downlink=True, initial_on_clients=True)
    grid = Mock()
    grid.get_node_ids.return_value = [1, 2]
    g0 = record_of({"a": np.zeros(2, np.float32), "b": np.ones(3, np.float32)})
    list(strategy.configure_train(1, g0, ConfigRecord(), grid))
    assert (strategy.bytes_down_round, strategy.messages_round, strategy.start_messages_round) == (0, 2, 2)
    g1, _ = strategy.aggregate_train(1, [train_reply(1), train_reply(2)])
    list(strategy.configure_train(2, g1, ConfigRecord(), grid))
    assert (strategy.messages_round, strategy.start_messages_round) == (2, 0), "after round 1 FedAvg sends the whole model"
    # a node first met after the model changed (a new client) would get the whole model from FedAvg too
    grid.get_node_ids.return_value = [1, 2, 3]
    strategy.instructions(RecordDict({protocol.ARRAYS: g1, protocol.CONFIG: ConfigRecord()}), [3], MessageType.EVALUATE)
    assert (strategy.messages_round, strategy.start_messages_round) == (3, 0)


def test_client_completes_a_sparse_instruction_and_asks_for_all_when_it_cannot(tmp_path):
    from clients.app import receive_global

    glob = {"a": np.zeros(2, np.float32), "b": np.ones(3, np.float32)}

    def instruction(arrays, base, version):
        return Message(RecordDict({protocol.ARRAYS: record_of(arrays), protocol.CONFIG: ConfigRecord({protocol.BASE_VERSION: base, protocol.MODEL_VERSION: version})}),
                       dst_node_id=5, message_type=MessageType.TRAIN)

    for node_config in ({"partition-id": 0}, {"partition-id": 0, "state-dir": str(tmp_path)}):
        context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
        assert receive_global(instruction({"b": glob["b"]}, 0, 1), context) is None, "no copy yet: ask for the whole model"
        got = receive_global(instruction(glob, FULL, 0), context)
        assert set(got) == {"a", "b"}
        got = receive_global(instruction({"b": np.full(3, 2, np.float32)}, 0, 1), context)
        np.testing.assert_array_equal(got["a"], glob["a"])
        np.testing.assert_array_equal(got["b"], np.full(3, 2, np.float32))
        assert receive_global(instruction({"b": glob["b"]}, 0, 2), context) is None, "it holds version 1, not 0"
    # the version it holds again (an evaluation after training): completed from the copy, which is not written again
    copy = tmp_path / "client-0" / "global-model.npz"
    written = copy.stat().st_ino  # a write replaces the file (a new inode)
    got = receive_global(instruction({}, 1, 1), context)
    np.testing.assert_array_equal(got["b"], np.full(3, 2, np.float32))
    assert copy.stat().st_ino == written, "an unchanged version is not rewritten"
    receive_global(instruction({"b": np.full(3, 3, np.float32)}, 1, 2), context)
    assert copy.stat().st_ino != written, "a new version is"
    (tmp_path / "client-0" / "global-model.npz").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="damaged global model copy"):
        assert receive_global(instruction({"b": glob["b"]}, 1, 2), context) is None


def test_a_new_node_builds_the_starting_model_instead_of_downloading_it():
    from clients.app import receive_global
    from fedtune.client_state import arrays_sha256

    d = Downlink(sparse=True, initial_on_clients=True)
    start = {"a": np.zeros(2, np.float32), "b": np.ones(3, np.float32)}
    d.observe(record_of(start))
    sent, base = d.payload(7, record_of(start))
    assert base == 0 and len(sent) == 0, "version 0 is what every client can build"
    assert d.initial_sha256 == arrays_sha256(start)
    d.forget(7, "its build did not match")
    assert d.payload(7, record_of(start))[1] == FULL, "a node whose build failed gets everything"

    def instruction(sha):
        return Message(RecordDict({protocol.ARRAYS: record_of({}), protocol.CONFIG: ConfigRecord(
            {protocol.BASE_VERSION: 0, protocol.MODEL_VERSION: 0, protocol.INITIAL_SHA256: sha})}), dst_node_id=5, message_type=MessageType.TRAIN)

    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    got = receive_global(instruction(arrays_sha256(start)), context, lambda: dict(start))
    assert set(got) == {"a", "b"} and np.array_equal(got["b"], start["b"])
    other = Context(run_id=1, node_id=6, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    assert receive_global(instruction("0" * 64), other, lambda: dict(start)) is None, "a build that differs asks for the whole model"


def test_a_saved_version_0_from_another_run_is_set_aside(tmp_path):
    """A state-dir keeps version 0 of an earlier run (stopped in its round 1): a new run's
    version 0 has another checksum, so the node builds this run's starting model instead."""
    from clients.app import receive_global
    from fedtune.client_state import arrays_sha256, read_global_copy, write_global_copy

    start, stale = {"a": np.zeros(2, np.float32)}, {"a": np.full(2, 7, np.float32)}
    folder = tmp_path / "client-0"
    write_global_copy(folder, stale, 0)
    context = Context(run_id=2, node_id=5, node_config={"partition-id": 0, "state-dir": str(tmp_path)}, state=RecordDict(), run_config={})
    msg = Message(RecordDict({protocol.ARRAYS: record_of({}), protocol.CONFIG: ConfigRecord(
        {protocol.BASE_VERSION: 0, protocol.MODEL_VERSION: 0, protocol.INITIAL_SHA256: arrays_sha256(start)})}), dst_node_id=5, message_type=MessageType.TRAIN)
    got = receive_global(msg, context, lambda: dict(start))
    np.testing.assert_array_equal(got["a"], start["a"])
    np.testing.assert_array_equal(read_global_copy(folder)[0]["a"], start["a"])
    write_global_copy(folder, stale, 0)
    assert receive_global(msg, context, None) is None, "with nothing to build from, it asks for the whole model"
    # a copy of version 3 kept in another run is not completed by this run's changes to its version 3
    write_global_copy(folder, stale, 3, run="old")
    changes = Message(RecordDict({protocol.ARRAYS: record_of({}), protocol.CONFIG: ConfigRecord(
        {protocol.BASE_VERSION: 3, protocol.MODEL_VERSION: 4, protocol.RUN_TOKEN: "new"})}), dst_node_id=5, message_type=MessageType.TRAIN)
    with pytest.warns(UserWarning, match="from another run"):
        assert receive_global(changes, context, None) is None
    write_global_copy(folder, stale, 3, run="new")
    np.testing.assert_array_equal(receive_global(changes, context, None)["a"], stale["a"])


def test_balanced_softmax_is_cross_entropy_on_prior_adjusted_logits_over_present_classes():
    from fedtune.trainer import _loss, balanced_softmax_adjustment

    labels = torch.tensor([0, 0, 0, 2])
    prior = balanced_softmax_adjustment(labels, 4)
    assert torch.allclose(prior[[0, 2]], torch.tensor([0.75, 0.25]).log()) and torch.isinf(prior[[1, 3]]).all()
    logits = torch.randn(4, 4, requires_grad=True)
    loss = _loss(logits, labels, 0.1, prior)
    # the reference rule written out: softmax over classes 0 and 2 of logit + log prior
    z = logits[:, [0, 2]] + torch.tensor([0.75, 0.25]).log()
    target = torch.tensor([0, 0, 0, 1])
    logp = z.log_softmax(1)
    ref = -(0.9 * logp.gather(1, target[:, None]).squeeze(1) + 0.1 * logp.mean(1)).mean()
    assert torch.allclose(loss, ref)
    loss.backward()
    assert logits.grad[:, [1, 3]].abs().sum() == 0, "a class the client lacks gets no gradient"
    with pytest.raises(ValueError, match="prior is 0"):
        _loss(logits, torch.tensor([1, 0, 0, 0]), 0.0, prior)


def test_balanced_loss_leaves_the_rows_of_classes_a_client_lacks_alone():
    """FedRoD's balanced risk: a client's update of the shared head does not push down the
    classes it has no examples of (plain cross-entropy does)."""
    moved = {}
    for balanced in (False, True):
        cfg = tiny_run(train={"weight_decay": 0.0}, partition={"scheme": "pathological", "classes_per_partition": 7, "min_partition_size": 5},
                       federation={"num_clients": 4, "rounds": 2, "balanced_loss": balanced, "personalization": "none"})
        rt = ClientRuntime(cfg, partition_id=1)
        absent = [c for c in range(10) if c not in set(rt.train_set.labels["digit"].tolist())]
        assert absent, "the partition should lack some classes"
        glob = state_to_numpy(global_model(cfg))
        update, _, _, _ = rt.fit(glob, ClientState())
        delta = update["heads.digit.weight"] - glob["heads.digit.weight"]
        moved[balanced] = float(np.abs(delta[absent]).max())
        assert np.abs(delta).max() > 0
    assert moved[False] > 0 and moved[True] == 0
    for fed in ({"personalization": "fedper"}, {"personalization": "fedrep"}, {"personalization": "local"}, {"personal": ["heads.digit"]}):
        with pytest.raises(ConfigError, match="balanced_loss: the task head is personal"):
            tiny_run(federation={"num_clients": 4, "balanced_loss": True, **fed})
    with pytest.raises(ConfigError, match="would refit the shared head"):
        tiny_run(train={"head_fit": "after"}, federation={"num_clients": 4, "balanced_loss": True})
    tiny_run(federation={"num_clients": 4, "balanced_loss": True, "personal": ["vit.norm."]})  # a personal norm is fine
