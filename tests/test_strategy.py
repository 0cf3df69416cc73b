"""SparseFedAvg: aggregation checked against hand-computed numbers and Flower's FedAvg."""

import json
import logging
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedtune import protocol
from fedtune.errors import CheckpointError, ConfigError
from server.strategy import SparseFedAvg

F32 = np.float32


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's runtime sets the process identity that every new Message is stamped
    with; a bare test process has none, so set one for the duration of each test."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def arrays(**named: list) -> ArrayRecord:
    """An ArrayRecord of float32 arrays; keyword names use '__' for '.'."""
    return ArrayRecord(
        {k.replace("__", "."): Array(np.asarray(v, dtype=F32)) for k, v in named.items()}
    )


def global_arrays() -> ArrayRecord:
    return arrays(a=[1.0, 2.0], b=[[0.0, 0.0], [0.0, 0.0]], c=[0.1], head__w=[5.0])


def reply(
    node_id: int,
    params: ArrayRecord | None,
    num_examples: int | float | None = 10,
    counts: dict[str, int] | None = None,
    **metrics,
) -> Message:
    """A train reply from node_id, built the way a ClientApp builds it."""
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    content = RecordDict()
    if params is not None:
        content[protocol.ARRAYS] = params
    if num_examples is not None:
        metrics[protocol.NUM_EXAMPLES] = num_examples
    content[protocol.METRICS] = MetricRecord(metrics)
    if counts is not None:
        content[protocol.UPDATE_COUNTS] = MetricRecord(counts)
    return Message(content, reply_to=instruction)


def error_reply(node_id: int) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    return Message(Error(code=7, reason="ClientApp raised"), reply_to=instruction)


def configured(strategy: SparseFedAvg, global_record: ArrayRecord, server_round: int = 1):
    """Run configure_train on a mock grid; return the instruction messages."""
    grid = Mock()
    grid.get_node_ids.return_value = [1, 2, 3]
    return list(strategy.configure_train(server_round, global_record, ConfigRecord(), grid))


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def test_full_replies_equal_flower_fedavg() -> None:
    """Prepare: every client sends every parameter."""
    rng = np.random.default_rng(0)
    shapes = {"a": (3, 4), "b": (5,), "c": (2, 2, 2)}
    global_record = ArrayRecord(
        {k: Array(rng.uniform(0.5, 1.5, s).astype(F32)) for k, s in shapes.items()}
    )
    replies = [
        reply(
            node,
            ArrayRecord(
                {k: Array(rng.uniform(0.5, 1.5, s).astype(F32)) for k, s in shapes.items()}
            ),
            num_examples=n,
            loss=loss,
        )
        for node, n, loss in [(1, 5, 0.5), (2, 10, 1.0), (3, 25, 2.0)]
    ]
    strategy = SparseFedAvg()
    configured(strategy, global_record)

    # Execute
    ours, our_metrics = strategy.aggregate_train(1, replies)
    theirs, their_metrics = FedAvg().aggregate_train(1, replies)

    # Assert
    assert list(ours.keys()) == list(global_record.keys())
    for name in shapes:
        np.testing.assert_allclose(ours[name].numpy(), theirs[name].numpy(), rtol=1e-6)
        assert ours[name].numpy().dtype == F32
    assert our_metrics["loss"] == pytest.approx(their_metrics["loss"], rel=1e-12)
    assert our_metrics[protocol.REPLIES_ACCEPTED] == 3
    assert our_metrics[protocol.REPLIES_REJECTED] == 0
    assert our_metrics[protocol.NUM_EXAMPLES] == 40


def test_partial_replies_weighted_by_examples() -> None:
    # Prepare
    global_record = global_arrays()
    replies = [
        reply(1, arrays(a=[3, 5], b=[[1, 2], [3, 4]]), num_examples=10),
        reply(2, arrays(a=[7, 1]), num_examples=30),
        reply(3, arrays(b=[[4, 8], [0, 1]]), num_examples=20),
    ]
    strategy = SparseFedAvg()
    configured(strategy, global_record)

    # Execute
    result, metrics = strategy.aggregate_train(1, replies)

    # Assert
    out = as_numpy(result)
    # a: (10*[3,5] + 30*[7,1]) / 40 = [240, 80] / 40
    np.testing.assert_allclose(out["a"], [6.0, 2.0], rtol=1e-6)
    # b: (10*[[1,2],[3,4]] + 20*[[4,8],[0,1]]) / 30 = [[90,180],[30,60]] / 30
    np.testing.assert_allclose(out["b"], [[3.0, 6.0], [1.0, 2.0]], rtol=1e-6)
    # Nobody sent c or head.w: bit-identical to the global values.
    assert result["c"].data == global_record["c"].data
    assert result["head.w"].data == global_record["head.w"].data
    assert list(result.keys()) == ["a", "b", "c", "head.w"]
    assert all(v.dtype == F32 for v in out.values())
    # 2+4 + 2 + 4 float32 values received.
    assert metrics[protocol.BYTES_UP] == 12 * 4
    assert strategy.last_rejections == []
    assert [m["node_id"] for m in strategy.last_client_metrics] == [1, 2, 3]


def test_a_tasks_head_and_routers_are_weighted_by_that_tasks_examples() -> None:
    """A client training two tasks weighs its shared parameters by all its examples, but a
    task's head and routers by that task's examples alone (not by the other task's)."""
    strategy = SparseFedAvg()
    names = {"blocks.0.w": [0.0, 0.0], "heads.a.weight": [0.0, 0.0], "vit.blocks.1.mlp.routers.a.weight": [0.0, 0.0]}
    configured(strategy, ArrayRecord({n: Array(np.asarray(v, dtype=np.float32)) for n, v in names.items()}))
    two = reply(1, ArrayRecord({n: Array(np.asarray([4.0, 4.0], dtype=np.float32)) for n in names}), num_examples=40,
                **{"num-examples-a": 10, "num-examples-b": 30, "task-ids": [0, 1]})
    one = reply(2, ArrayRecord({n: Array(np.asarray([0.0, 0.0], dtype=np.float32)) for n in names}), num_examples=10)
    result, _ = strategy.aggregate_train(1, [two, one])
    got = {n: float(result[n].numpy()[0]) for n in names}
    assert got == pytest.approx({"blocks.0.w": 4.0 * 40 / 50, "heads.a.weight": 4.0 * 10 / 20, "vit.blocks.1.mlp.routers.a.weight": 4.0 * 10 / 20})
    # per-task counts that do not add up to the reply's examples would let one task's weight grow unchecked
    configured(strategy, ArrayRecord({n: Array(np.asarray(v, dtype=np.float32)) for n, v in names.items()}))
    inflated = reply(3, ArrayRecord({n: Array(np.asarray([4.0, 4.0], dtype=np.float32)) for n in names}), num_examples=40, **{"num-examples-a": 10**9, "num-examples-b": 30})
    strategy.aggregate_train(1, [inflated, one])
    assert [n for n, _ in strategy.last_rejections] == [3] and "add up to" in strategy.last_rejections[0][1]
    from server.strategy import _task_of

    assert [_task_of(n) for n in ("heads.a.bias", "vit.blocks.3.mlp.routers.b.bias", "vit.blocks.3.mlp.task_embed.c", "vit.blocks.3.mlp.router.weight", "vit.blocks.3.mlp.experts.0.fc1.weight")] == ["a", "b", "c", None, None]


def test_weighting_by_update_counts() -> None:
    # Prepare
    replies = [
        reply(1, arrays(a=[3, 5], b=[[1, 2], [3, 4]]), num_examples=10, counts={"a": 3, "b": 1}),
        reply(2, arrays(a=[7, 1]), num_examples=30, counts={"a": 1}),
        reply(3, arrays(b=[[4, 8], [0, 1]]), num_examples=20, counts={"b": 3}),
    ]
    strategy = SparseFedAvg(weighting="updates")
    configured(strategy, global_arrays())

    # Execute
    result, _ = strategy.aggregate_train(1, replies)

    # Assert
    out = as_numpy(result)
    # a: (3*[3,5] + 1*[7,1]) / 4 = [16, 16] / 4
    np.testing.assert_allclose(out["a"], [4.0, 4.0], rtol=1e-6)
    # b: (1*[[1,2],[3,4]] + 3*[[4,8],[0,1]]) / 4 = [[13,26],[3,7]] / 4
    np.testing.assert_allclose(out["b"], [[3.25, 6.5], [0.75, 1.75]], rtol=1e-6)


def test_weighting_by_updates_rejects_a_reply_without_counts() -> None:
    # node 2 sends no update counts: its example count is not a step count, so it is left out
    replies = [
        reply(1, arrays(a=[3, 5]), num_examples=100, counts={"a": 2}),
        reply(2, arrays(a=[7, 1]), num_examples=6),
        reply(3, arrays(a=[7, 1]), num_examples=6, counts={"a": 6}),
    ]
    strategy = SparseFedAvg(weighting="updates")
    configured(strategy, global_arrays())
    result, _ = strategy.aggregate_train(1, replies)
    # (2*[3,5] + 6*[7,1]) / 8 = [48, 16] / 8
    np.testing.assert_allclose(result["a"].numpy(), [6.0, 2.0], rtol=1e-6)
    assert [n for n, _ in strategy.last_rejections] == [2] and "needs 'update-counts'" in strategy.last_rejections[0][1]


@pytest.mark.parametrize(
    ("make_bad", "reason"),
    [
        (lambda: reply(9, arrays(a=[np.nan, 1.0])), "NaN"),
        (lambda: reply(9, arrays(a=[np.inf, 1.0])), "Inf"),
        (lambda: reply(9, arrays(z=[1.0, 1.0])), "unknown parameter 'z'"),
        (lambda: reply(9, arrays(a=[1.0, 1.0, 1.0])), "shape mismatch for 'a'"),
        (
            lambda: reply(9, ArrayRecord({"a": Array(np.asarray([1.0, 1.0], dtype=np.float64))})),
            "dtype mismatch for 'a'",
        ),
        (lambda: reply(9, arrays(a=[1.0, 1.0]), num_examples=None), "missing 'num-examples'"),
        (lambda: reply(9, arrays(a=[1.0, 1.0]), num_examples=0), "non-positive 'num-examples'"),
        (lambda: reply(9, None), "missing ArrayRecord 'arrays'"),
        (lambda: error_reply(9), "error reply"),
        (lambda: reply(9, ArrayRecord({"a": Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"")})), "cannot decode parameter 'a'"),
        (lambda: reply(9, arrays(a=[1.0, 1.0]), **{"task-ids": 0}), "'task-ids' is not a list"),
        (lambda: reply(9, arrays(a=[1.0, 1.0]), **{"partition-id": 2.5}), "'partition-id' is not a whole number"),
        (lambda: reply(9, arrays(a=[1.0, 1.0]), **{"bytes-sent": [1, 2]}), "'bytes-sent' is not a whole number"),
        (lambda: reply(9, arrays(a=[1.0, 1.0]), **{"memory-bytes": -4}), "'memory-bytes' is negative"),
        (lambda: reply(9, arrays(a=[1.0, 1.0]), **{"time-s": float("nan")}), "'time-s' is not finite"),
        (lambda: reply(9, arrays(a=[1.0, 1.0]), **{"importance": 0.5}), "'importance' is not a list"),
    ],
    ids=[
        "nan",
        "inf",
        "unknown-name",
        "shape",
        "dtype",
        "no-num-examples",
        "zero-examples",
        "no-arrays",
        "error-reply",
        "undecodable-bytes",
        "task-ids-not-a-list",
        "fractional-partition-id",
        "bytes-sent-a-list",
        "negative-memory",
        "nan-time",
        "importance-not-a-list",
    ],
)
def test_bad_reply_is_rejected_and_the_rest_aggregated(make_bad, reason: str) -> None:
    # Prepare
    good = reply(1, arrays(a=[3, 5]), num_examples=10)
    strategy = SparseFedAvg()
    configured(strategy, global_arrays())

    # Execute
    result, metrics = strategy.aggregate_train(1, [make_bad(), good])

    # Assert
    assert len(strategy.last_rejections) == 1
    node_id, why = strategy.last_rejections[0]
    assert node_id == 9
    assert reason in why
    np.testing.assert_array_equal(result["a"].numpy(), [3.0, 5.0])
    assert metrics[protocol.REPLIES_ACCEPTED] == 1
    assert metrics[protocol.REPLIES_REJECTED] == 1
    assert metrics[protocol.NUM_EXAMPLES] == 10
    bad = make_bad()
    carried = 0 if bad.has_error() else sum(len(a.data) for rec in bad.content.array_records.values() for a in rec.values())
    assert strategy.bytes_up_round == 8 and strategy.bytes_up_rejected_round == carried, "a rejected reply's arrays are counted apart"


def test_rejection_is_logged_as_warning(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    strategy = SparseFedAvg()
    configured(strategy, global_arrays())

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy.aggregate_train(1, [reply(42, arrays(a=[np.nan, 0.0]))])

    # Assert
    assert any(
        r.levelno == logging.WARNING and "node 42" in r.getMessage() and "NaN" in r.getMessage()
        for r in caplog.records
    )


def test_all_rejected_returns_no_arrays() -> None:
    # Prepare
    strategy = SparseFedAvg()
    configured(strategy, global_arrays())

    # Execute
    result, metrics = strategy.aggregate_train(
        1, [reply(1, arrays(a=[np.nan, 0.0])), error_reply(2)]
    )

    # Assert: None means Flower's start() keeps the global arrays.
    assert result is None
    assert metrics[protocol.REPLIES_ACCEPTED] == 0
    assert metrics[protocol.REPLIES_REJECTED] == 2
    assert [n for n, _ in strategy.last_rejections] == [2, 1]


def test_no_replies_returns_nothing() -> None:
    strategy = SparseFedAvg()
    configured(strategy, global_arrays())
    assert strategy.aggregate_train(1, []) == (None, None)


def test_personal_keys_are_not_aggregated() -> None:
    # Prepare
    global_record = global_arrays()
    replies = [
        reply(1, arrays(a=[3, 5], head__w=[99.0]), num_examples=10),
        reply(2, arrays(a=[7, 1], head__w=[-99.0]), num_examples=30),
    ]
    strategy = SparseFedAvg(personal_keys=["head."])
    configured(strategy, global_record)

    # Execute
    result, metrics = strategy.aggregate_train(1, replies)

    # Assert
    assert result["head.w"].data == global_record["head.w"].data
    np.testing.assert_allclose(result["a"].numpy(), [6.0, 2.0], rtol=1e-6)
    assert strategy.last_rejections == []
    assert metrics[protocol.REPLIES_ACCEPTED] == 2


def test_caller_records_are_not_mutated() -> None:
    # Prepare
    global_record = global_arrays()
    before = {k: (v.dtype, v.shape, v.data) for k, v in global_record.items()}
    config = ConfigRecord({"lr": 0.1})
    strategy = SparseFedAvg(feed_importance=True)
    strategy.global_importance = [0.5, 0.5]
    grid = Mock()
    grid.get_node_ids.return_value = [1, 2]

    # Execute
    messages = list(strategy.configure_train(1, global_record, config, grid))
    result, _ = strategy.aggregate_train(1, [reply(1, arrays(a=[3, 5], b=[[1, 1], [1, 1]]))])

    # Assert
    assert {k: (v.dtype, v.shape, v.data) for k, v in global_record.items()} == before
    assert result is not global_record
    assert dict(config) == {"lr": 0.1}
    sent = messages[0].content[protocol.CONFIG]
    assert sent[protocol.SERVER_ROUND] == 1
    assert sent[protocol.IMPORTANCE] == [0.5, 0.5]


def test_global_importance_and_state_round_trip() -> None:
    # Prepare
    strategy = SparseFedAvg(feed_importance=True)
    configured(strategy, global_arrays(), server_round=1)

    # Execute: round 1, examples-weighted mean of the two vectors.
    strategy.aggregate_train(
        1,
        [
            reply(1, arrays(a=[3, 5]), num_examples=10, importance=[1.0, 0.0]),
            reply(2, arrays(a=[7, 1]), num_examples=30, importance=[0.0, 1.0]),
        ],
    )
    after_round_1 = strategy.global_importance
    # Round 2: one client; EMA with rate 0.5. A wrong length is rejected.
    configured(strategy, global_arrays(), server_round=2)
    _, metrics = strategy.aggregate_train(
        2,
        [
            reply(1, arrays(a=[3, 5]), num_examples=10, importance=[1.0, 1.0]),
            reply(3, arrays(a=[3, 5]), num_examples=10, importance=[1.0, 1.0, 1.0]),
        ],
    )
    messages = configured(strategy, global_arrays(), server_round=3)

    # Assert
    # round 1: (10*[1,0] + 30*[0,1]) / 40
    assert after_round_1 == pytest.approx([0.25, 0.75])
    # round 2: 0.5*[0.25,0.75] + 0.5*[1,1]
    assert strategy.global_importance == pytest.approx([0.625, 0.875])
    assert metrics[protocol.IMPORTANCE] == pytest.approx([0.625, 0.875])
    assert strategy.last_rejections == [(3, "'importance' has 3 blocks, expected 2")]
    assert messages[0].content[protocol.CONFIG][protocol.IMPORTANCE] == pytest.approx(
        [0.625, 0.875]
    )

    # Execute: save and restore through JSON.
    state = json.loads(json.dumps(strategy.state_dict()))
    restored = SparseFedAvg()
    restored.load_state_dict(state)

    # Assert
    assert restored.global_importance == strategy.global_importance
    assert restored.state_dict() == strategy.state_dict()
    assert state["last_round"] == 2
    assert state["rounds_aggregated"] == 2
    assert state["total_accepted"] == 3
    assert state["total_rejected"] == 1


def test_bad_state_and_config_are_clear_errors() -> None:
    strategy = SparseFedAvg()
    state = strategy.state_dict()
    with pytest.raises(CheckpointError, match="unknown keys \\['extra'\\]"):
        strategy.load_state_dict({**state, "extra": 1})
    with pytest.raises(CheckpointError, match="last_round"):
        strategy.load_state_dict({**state, "last_round": "two"})
    with pytest.raises(ConfigError, match="weighting"):
        SparseFedAvg(weighting="steps")
    with pytest.raises(ConfigError, match="personal_keys"):
        SparseFedAvg(personal_keys="head.")
    with pytest.raises(ConfigError, match="arrayrecord_key"):
        SparseFedAvg(arrayrecord_key="params")


def test_evaluate_averages_each_metric_over_the_clients_that_report_it() -> None:
    """Clients of different tasks report different per-task keys (multitask runs);
    each key is the num-examples-weighted mean over its reporters, errors are skipped."""
    strategy = SparseFedAvg()
    replies = [
        reply(1, None, 10, **{"accuracy-global": 0.5, "accuracy-global-digit": 0.5, "partition-id": 0}),
        reply(2, None, 30, **{"accuracy-global": 0.9, "accuracy-global-parity": 0.9, "partition-id": 1}),
        reply(3, None, 30, **{"accuracy-global": 0.7, "accuracy-global-digit": 0.7, "partition-id": 2}),
        error_reply(4),
    ]
    agg = strategy.aggregate_evaluate(1, replies)
    assert agg["accuracy-global"] == pytest.approx((5 + 27 + 21) / 70)
    assert agg["accuracy-global-digit"] == pytest.approx((5 + 21) / 40)
    assert agg["accuracy-global-parity"] == pytest.approx(0.9)
    assert "partition-id" not in agg and protocol.NUM_EXAMPLES not in agg
    assert [e["node_id"] for e in strategy.last_eval_metrics] == [1, 2, 3]
    assert strategy.aggregate_evaluate(1, [error_reply(5)]) is None
    # a two-task client's task accuracies weigh by that task's test examples, not its total
    two = [reply(1, None, 100, **{"accuracy-global": 0.5, "accuracy-global-a": 0.0, "accuracy-global-b": 1.0, "num-examples-a": 2, "num-examples-b": 98}),
           reply(2, None, 10, **{"accuracy-global": 1.0, "accuracy-global-a": 1.0, "num-examples-a": 10})]
    agg = strategy.aggregate_evaluate(1, two)
    assert agg["accuracy-global-a"] == pytest.approx(10 / 12) and agg["accuracy-global-b"] == pytest.approx(1.0)
    assert agg["accuracy-global"] == pytest.approx((50 + 10) / 110) and not any(k.startswith("num-examples") for k in agg)


def test_head_statistics_are_requested_in_the_last_round_and_summed() -> None:
    from fedtune.heads import class_stats

    strategy = SparseFedAvg(head_stats_round=3, round_offset=1)
    grid = Mock()
    grid.get_node_ids.return_value = [1, 2]

    def want(rnd: int) -> list:
        return [m.content[protocol.CONFIG].get(protocol.WANT_HEAD_STATS) for m in strategy.configure_evaluate(rnd, global_arrays(), ConfigRecord(), grid)]

    assert want(1) == [None, None] and want(2) == [True, True], "asked for in the run's round 3 only (round 2 after a resume at 1)"
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(30, 4, generator=g), torch.arange(30) % 3

    def stats_reply(node_id: int, rows: slice, bad: bool = False) -> Message:
        msg = reply(node_id, None, 10, **{"accuracy-global": 0.5})
        parts = class_stats(feats[rows], labels[rows], 3)
        if bad:
            parts["outer"][0, 0] = np.nan
        msg.content[protocol.HEAD_STATS] = ArrayRecord({f"digit.{k}": Array(v) for k, v in parts.items()})
        return msg

    undecodable = stats_reply(4, slice(0, 30))
    undecodable.content[protocol.HEAD_STATS]["digit.count"] = Array(dtype="float64", shape=(3,), stype="numpy.ndarray", data=b"")
    strategy.aggregate_evaluate(3, [stats_reply(1, slice(0, 12)), stats_reply(2, slice(12, 30)), stats_reply(3, slice(0, 30), bad=True), undecodable])
    whole = class_stats(feats, labels, 3)
    assert set(strategy.head_stats) == {"digit"}
    for k, v in whole.items():
        np.testing.assert_allclose(strategy.head_stats["digit"][k], v, rtol=1e-12, err_msg=k)
    assert strategy.head_stats_bytes == 2 * sum(v.nbytes for v in whole.values()), "the corrupt and the undecodable replies are left out"


def test_under_dp_each_clients_statistics_are_held_to_the_bounds_the_noise_assumes(caplog) -> None:
    from fedtune.heads import bound_contribution, class_stats

    strategy = SparseFedAvg(head_stats_round=1, clip_update_norm=1.0, dp_noise_multiplier=1.0, dp_stats_bounds=(2.0, 10))
    g = torch.Generator().manual_seed(0)
    feats, labels = 5 * torch.randn(40, 4, generator=g), torch.arange(40) % 3
    honest = class_stats(*bound_contribution(feats, labels, 2.0, 10, seed=0), 3)
    greedy = class_stats(feats, labels, 3)  # 40 unclipped examples: over every bound

    def stats_reply(node_id: int, parts: dict) -> Message:
        msg = reply(node_id, None, 10, **{"accuracy-global": 0.5})
        msg.content[protocol.HEAD_STATS] = ArrayRecord({f"digit.{k}": Array(v) for k, v in parts.items()})
        return msg

    with caplog.at_level("WARNING"):
        strategy.aggregate_evaluate(1, [stats_reply(1, honest)])
    for k, v in honest.items():
        np.testing.assert_array_equal(strategy.head_stats["digit"][k], v, err_msg=f"an honest client's {k} is left as it is")
    assert "exceed the DP bounds" not in caplog.text
    with caplog.at_level("WARNING"):
        strategy.aggregate_evaluate(1, [stats_reply(2, greedy)])
    got = strategy.head_stats["digit"]
    assert "node 2" in caplog.text and "exceed the DP bounds" in caplog.text
    assert got["count"].sum() == pytest.approx(10) and np.linalg.norm(got["sum"]) == pytest.approx(10 * 2.0) and np.linalg.norm(got["outer"]) == pytest.approx(10 * 4.0)
    np.testing.assert_allclose(got["sum"] / np.linalg.norm(got["sum"]), greedy["sum"] / np.linalg.norm(greedy["sum"]), err_msg="scaled, not changed in direction")
    with pytest.raises(ConfigError, match="dp_stats_bounds"):
        SparseFedAvg(dp_stats_bounds=(2.0, 10))


def test_discriminant_head_keeps_its_decisions_in_float32() -> None:
    """Features with a common offset and a poorly conditioned covariance give rows and biases
    whose shared part dwarfs their differences: the float32 head decides as the float64
    discriminant does (it flipped 50-89% of the decisions before the shared part came out)."""
    from fedtune.heads import class_moments, class_stats, lda_head

    rng = np.random.default_rng(2)
    d, c = 64, 10
    for offset, decay in ((10.0, 1e-5), (30.0, 1e-6)):
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        a = q * np.sqrt(np.logspace(0, np.log10(decay), d))
        mu = rng.normal(0, 1, (c, d)) @ a.T * 0.45 + offset * rng.uniform(0.5, 1.5, d)

        def draw(n, mu=mu, a=a):
            y = rng.integers(0, c, n)
            return mu[y] + rng.normal(0, 1, (n, d)) @ a.T, y

        x, y = draw(2000)
        test, _ = draw(1000)
        stats = class_stats(torch.tensor(x), torch.tensor(y), c)
        w, b = lda_head(stats)
        count, means, cov = class_moments(stats)
        cov = (1 - 1e-4) * cov + 1e-4 * np.trace(cov) / d * np.eye(d)
        prec = np.linalg.solve(cov, means.T).T
        want = (test @ prec.T - 0.5 * (means * prec).sum(1) + np.log(count / count.sum())).argmax(1)
        got = (torch.tensor(test, dtype=torch.float32) @ w.T + b).argmax(1).numpy()
        assert (got == want).mean() >= 0.995, (offset, decay, float((got != want).mean()))  # a point on the boundary may round either way


def test_discriminant_head_of_one_example_per_class_stays_finite_and_above_absent_classes() -> None:
    """No within-class scatter at all (one example per class): the head is the nearest class
    mean's, with logits far from an absent class's bias."""
    from fedtune.heads import ABSENT_CLASS_BIAS, class_stats, lda_head

    x = torch.tensor(np.random.default_rng(0).normal(0, 3, (3, 16)), dtype=torch.float32)
    y = torch.tensor([0, 4, 7])
    w, b = lda_head(class_stats(x, y, 10))
    logits = x @ w.T + b
    assert logits.argmax(1).tolist() == [0, 4, 7]
    assert float(logits[:, [0, 4, 7]].abs().max()) < 1e-3 * abs(ABSENT_CLASS_BIAS)


def test_discriminant_head_equals_scikit_learn_lda() -> None:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from fedtune.heads import class_stats, lda_head

    g = torch.Generator().manual_seed(1)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([40, 25, 60, 0, 35])])  # class 3 absent
    means = torch.randn(5, 6, generator=g) * 2
    feats = means[labels] + torch.randn(len(labels), 6, generator=g) @ torch.randn(6, 6, generator=g) * 0.5
    w, b = lda_head(class_stats(feats, labels, 5), shrink=0.0)
    ours = (feats @ w.T + b).argmax(-1)
    assert 3 not in ours.tolist()
    ref = LinearDiscriminantAnalysis(solver="lsqr").fit(feats.numpy(), labels.numpy())
    assert (ours.numpy() == ref.predict(feats.numpy())).mean() >= 0.99
    with pytest.raises(ValueError, match="at least 2 classes"):
        lda_head(class_stats(feats[:40], labels[:40], 5))


def test_a_malformed_evaluate_reply_is_left_out() -> None:
    """An evaluate reply without accuracy-global, or with a value that is not a number, is
    left out (with a warning) and the round's other replies count; accuracy-personal is optional."""
    strategy = SparseFedAvg()
    replies = [
        reply(1, None, 10, **{"accuracy-global": 0.5, "accuracy-personal": 0.6}),
        reply(2, None, 30, **{"accuracy-personal": 0.9}),
        reply(3, None, 30, **{"accuracy-global": 0.7}),
    ]
    agg = strategy.aggregate_evaluate(1, replies)
    assert agg["accuracy-global"] == pytest.approx((5 + 21) / 40)
    assert [e["node_id"] for e in strategy.last_eval_metrics] == [1, 3]
    first, third = (e["metrics"] for e in strategy.last_eval_metrics)
    assert first.accuracy_personal == 0.6 and third.accuracy_personal is None
    assert [n for n, _ in strategy.last_eval_rejections] == [2]
    assert "accuracy-global" in strategy.last_eval_rejections[0][1]


def test_train_metrics_round_trip() -> None:
    m = protocol.TrainMetrics(num_examples=12, partition_id=3, task_ids=[1], train_loss=0.5, steps=4, block_updates=[0, 4], experts={"digit": [1, 2, 3]})
    wire = m.to_dict()
    assert wire["num-examples"] == 12 and wire["block-updates"] == [0, 4] and wire["experts-digit"] == [1, 2, 3]
    assert "importance" not in wire  # None values stay off the wire
    assert protocol.TrainMetrics.from_dict(wire) == m
    assert protocol.TrainMetrics.from_dict({}) == protocol.TrainMetrics()  # a rejected reply may carry nothing


def test_real_client_updates_average_per_expert_and_per_task_router() -> None:
    """End to end without Flower's transport: three MoE clients (two of task a, one of task b)
    train a round; with weighting 'updates' each parameter is the average of the clients that
    updated it, weighted by their real step counts; task b's router is client b's alone, the
    experts only client b used keep client b's values, untouched parameters stay global."""
    from clients.records import numpy_to_arrays
    from fedtune.client import ClientRuntime
    from fedtune.client_state import ClientState
    from fedtune.federated import global_model, state_to_numpy

    from .test_federated import tiny_run

    cfg = tiny_run(tasks=["digit", "parity"], moe={"num_experts": 4, "top_k": 1, "blocks": [3], "train_experts": 1},
                   partition={"scheme": "dirichlet", "alpha": 1.0, "min_partition_size": 5},
                   federation={"num_clients": 3, "client_tasks": [["digit"], ["parity"], ["digit"]], "weighting": "updates"})
    glob = state_to_numpy(global_model(cfg))
    outs = [ClientRuntime(cfg, pid).fit(glob, ClientState(), server_round=1) for pid in range(3)]
    replies = [reply(pid + 1, numpy_to_arrays(u), m.num_examples, counts) for pid, (u, counts, m, _) in enumerate(outs)]
    strategy = SparseFedAvg(weighting="updates")
    configured(strategy, numpy_to_arrays(glob))
    result, _ = strategy.aggregate_train(1, replies)
    out = as_numpy(result)
    senders: dict[str, list[tuple[np.ndarray, int]]] = {}
    for update, counts, _, _ in outs:
        for name, value in update.items():
            senders.setdefault(name, []).append((value, counts[name]))
    router_b = "vit.blocks.3.mlp.routers.parity.weight"
    assert [len(senders[router_b])] == [1] and "vit.blocks.3.mlp.routers.digit.weight" in senders
    for name, glob_value in glob.items():
        if name not in senders:
            np.testing.assert_array_equal(out[name], glob_value, err_msg=name)
            continue
        total = sum(c for _, c in senders[name])
        want = sum(v.astype(np.float64) * c for v, c in senders[name]) / total
        np.testing.assert_allclose(out[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    steps, examples = [m.steps for _, _, m, _ in outs], [m.num_examples for _, _, m, _ in outs]
    assert steps[0] * examples[2] != steps[2] * examples[0]  # so weighting by steps differs from weighting by examples
    experts_by = [{n.split(".experts.")[1].split(".")[0] for n in u if ".experts." in n} for u, *_ in outs]
    assert all(len(e) == 1 for e in experts_by)  # train_experts: 1 expert per client in the MoE block


def test_median_and_trimmed_mean_resist_one_outlier_per_parameter() -> None:
    g = global_arrays()
    honest = [reply(1, arrays(a=[1.0, 2.0])), reply(2, arrays(a=[3.0, 4.0], c=[0.5])), reply(4, arrays(a=[2.0, 3.0], c=[0.7]))]
    attacker = reply(3, arrays(a=[1000.0, -1000.0], c=[99.0]))
    for kind, kw, want_a in (("median", {}, [2.5, 2.5]), ("trimmed_mean", {"trim_fraction": 0.25}, [2.5, 2.5])):
        strategy = SparseFedAvg(aggregation=kind, **kw)
        configured(strategy, g)
        out, _ = strategy.aggregate_train(1, [*honest, attacker])
        got = as_numpy(out)
        np.testing.assert_allclose(got["a"], want_a)
        # c was sent by three clients (two honest): the median is the middle one; trimming 0.25 of 3 drops none
        np.testing.assert_allclose(got["c"], [0.7] if kind == "median" else [(0.5 + 0.7 + 99.0) / 3], rtol=1e-6)
        np.testing.assert_array_equal(got["b"], as_numpy(g)["b"], err_msg="nobody sent b")


def test_mean_around_median_drops_the_values_farthest_from_the_median() -> None:
    """Two one-sided attackers among six votes: the symmetric trimmed mean also drops the two
    largest honest values, the mean around the median drops the attackers only."""
    g = global_arrays()  # a = [1, 2]
    honest = [reply(i, arrays(a=[v, 2.0])) for i, v in enumerate((1.0, 2.0, 3.0, 4.0), start=1)]
    attackers = [reply(i, arrays(a=[-50.0, 2.0])) for i in (5, 6)]
    got = {}
    for kind in ("trimmed_mean", "mean_around_median"):
        strategy = SparseFedAvg(aggregation=kind, trim_fraction=1 / 3)
        configured(strategy, g)
        got[kind] = as_numpy(strategy.aggregate_train(1, [*honest, *attackers])[0])["a"]
    np.testing.assert_allclose(got["mean_around_median"], [2.5, 2.0], rtol=1e-6)  # the honest mean
    np.testing.assert_allclose(got["trimmed_mean"], [1.5, 2.0], rtol=1e-6)  # of (1, 2): skewed towards the attackers
    # a reference re-implementation on random votes: per coordinate, the n - k values nearest the median
    votes = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)

    def combined(trim_fraction: float) -> np.ndarray:
        strategy = SparseFedAvg(aggregation="mean_around_median", trim_fraction=trim_fraction)
        configured(strategy, ArrayRecord({"a": Array(np.zeros(5, np.float32))}))
        return as_numpy(strategy.aggregate_train(1, [reply(i + 1, ArrayRecord({"a": Array(v)})) for i, v in enumerate(votes)])[0])["a"]

    want = [np.mean(sorted(col, key=lambda x: abs(x - np.median(col)))[:5]) for col in votes.T.astype(np.float64)]
    np.testing.assert_allclose(combined(0.3), want, rtol=1e-5)
    np.testing.assert_allclose(combined(0.0), votes.astype(np.float64).mean(0), rtol=1e-5)  # nothing dropped: the plain mean


def test_absent_clients_vote_for_no_change_when_asked() -> None:
    """Sparse replies: the attackers are half of c's senders but a third of the round's
    clients. Over c's senders the median is theirs to move; with robust_absent 'unchanged' the
    client that did not send c counts as a vote for its global value (0.1)."""
    g = global_arrays()  # a = [1, 2], c = [0.1]
    replies = [reply(1, arrays(a=[1.0, 2.0], c=[0.2])), reply(2, arrays(a=[1.5, 2.5])), reply(3, arrays(a=[9.0, 9.0], c=[50.0])),
               reply(4, arrays(a=[1.2, 2.2])), reply(5, arrays(a=[9.0, 9.0], c=[50.0])), reply(6, arrays(a=[1.1, 2.1]))]
    skip, unchanged = SparseFedAvg(aggregation="median"), SparseFedAvg(aggregation="median", robust_absent="unchanged")
    for strategy in (skip, unchanged):
        configured(strategy, g)
    got_skip, got_unchanged = (as_numpy(st.aggregate_train(1, replies)[0]) for st in (skip, unchanged))
    np.testing.assert_allclose(got_skip["c"], [50.0])  # the median of (0.2, 50, 50)
    np.testing.assert_allclose(got_unchanged["c"], [0.15], rtol=1e-6)  # of (0.2, 50, 50, 0.1, 0.1, 0.1)
    np.testing.assert_allclose(got_unchanged["a"], got_skip["a"])  # everyone sent a
    with pytest.raises(ConfigError, match="robust_absent"):
        SparseFedAvg(aggregation="median", robust_absent="zero")


def test_nearest_neighbour_mixing_lets_median_and_trimmed_mean_find_the_honest_mean() -> None:
    """Six honest clients with skewed updates and two sign-flip attackers (x10), who are half
    of c's senders. Per coordinate the plain median picks one skewed honest value or is pulled
    by the attackers; after nearest-neighbour mixing every honest client's update is the
    honest mean, and so is the median and the trimmed mean of the mixed updates: for c, the
    mean over its honest senders (robust_absent 'skip') or over all six honest clients, the
    four that did not send it counting as no change ('unchanged')."""
    g = global_arrays()  # a = [1, 2], c = [0.1]
    honest_a = np.array([[1, 0], [0, 1], [1, 1], [2, 0], [0, 2], [1, 1]], dtype=np.float64) * 0.1
    honest_c = {1: 0.5, 2: 0.3}  # the senders of c among the honest
    replies = []
    for i, d in enumerate(honest_a):
        extra = {"c": [0.1 + honest_c[i]]} if i in honest_c else {}
        replies.append(reply(i + 1, arrays(a=list(np.array([1.0, 2.0]) + d), **extra)))
    attack = -10 * np.array([0.1, 0.1])
    replies += [reply(i, arrays(a=list(np.array([1.0, 2.0]) + attack), c=[0.1 - 10 * 0.4])) for i in (7, 8)]
    honest_mean_a = np.array([1.0, 2.0]) + honest_a.mean(0)
    want_c = {"skip": 0.1 + sum(honest_c.values()) / 2, "unchanged": 0.1 + sum(honest_c.values()) / 6}
    for kind in ("median", "trimmed_mean"):
        for absent in ("skip", "unchanged"):
            mixed = SparseFedAvg(aggregation=kind, trim_fraction=0.25, robust_absent=absent, nnm=True)
            plain = SparseFedAvg(aggregation=kind, trim_fraction=0.25, robust_absent=absent)
            for strategy in (mixed, plain):
                configured(strategy, g)
            got, got_plain = (as_numpy(st.aggregate_train(1, replies)[0]) for st in (mixed, plain))
            np.testing.assert_allclose(got["a"], honest_mean_a, rtol=1e-6)
            np.testing.assert_allclose(got["c"], [want_c[absent]], rtol=1e-5)
            assert abs(got_plain["a"][0] - honest_mean_a[0]) > 0.02 or abs(got_plain["c"][0] - want_c[absent]) > 0.02
            np.testing.assert_array_equal(got["b"], as_numpy(g)["b"])  # nobody sent b
            assert dict(mixed.last_nnm_neighbours)[1] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ConfigError, match="nnm"):
        SparseFedAvg(nnm=True)  # aggregation mean
    from .test_federated import tiny_run

    with pytest.raises(ConfigError, match="nnm"):
        tiny_run(federation={"num_clients": 4, "nnm": True})


def test_norm_bounding_scales_long_updates_down() -> None:
    g = global_arrays()  # a = [1, 2]
    strategy = SparseFedAvg(clip_update_norm=1.0)
    configured(strategy, g)
    out, _ = strategy.aggregate_train(1, [reply(1, arrays(a=[1.0 + 30.0, 2.0 + 40.0])), reply(2, arrays(a=[1.0, 2.5]))])
    # reply 1's update (30, 40) has norm 50: scaled to (0.6, 0.8); reply 2's (0, 0.5) is kept; equal weights
    np.testing.assert_allclose(as_numpy(out)["a"], [1.0 + 0.3, 2.0 + (0.8 + 0.5) / 2], rtol=1e-6)
    assert [round(n, 6) for _, n in strategy.last_update_norms] == [50.0, 0.5]
    with pytest.raises(ConfigError, match="aggregation"):
        SparseFedAvg(aggregation="krum")
    with pytest.raises(ConfigError, match="trim_fraction"):
        SparseFedAvg(aggregation="trimmed_mean", trim_fraction=0.5)


def test_client_level_dp_clips_averages_over_the_sampled_and_adds_calibrated_noise() -> None:
    g = global_arrays()  # a = [1, 2], c = [0.1]
    strategy = SparseFedAvg(clip_update_norm=1.0, dp_noise_multiplier=1e-9)
    assert len(configured(strategy, g)) == 3 and strategy.sampled_round == 3
    # node 1: update (30, 40) clipped to (0.6, 0.8); node 2 sends only c; node 3 did not reply
    out, _ = strategy.aggregate_train(1, [reply(1, arrays(a=[31.0, 42.0])), reply(2, arrays(c=[0.6]))])
    got = as_numpy(out)
    np.testing.assert_allclose(got["a"], [1.0 + 0.6 / 3, 2.0 + 0.8 / 3], rtol=1e-5)
    np.testing.assert_allclose(got["c"], [0.1 + 0.5 / 3], rtol=1e-5)
    np.testing.assert_array_equal(got["b"], as_numpy(g)["b"])
    # the noise: std multiplier * clip / sampled on what was sent
    noisy = SparseFedAvg(clip_update_norm=1.0, dp_noise_multiplier=3.0)
    noisy.dp_rng = np.random.default_rng(0)
    big = arrays(a=np.zeros(20000).tolist())
    grid = Mock()
    grid.get_node_ids.return_value = [1, 2]
    list(noisy.configure_train(1, big, ConfigRecord(), grid))
    out, _ = noisy.aggregate_train(1, [reply(1, arrays(a=np.zeros(20000).tolist()))])
    assert as_numpy(out)["a"].std() == pytest.approx(3.0 * 1.0 / 2, rel=0.03)
    with pytest.raises(ConfigError, match="clip_update_norm"):
        SparseFedAvg(dp_noise_multiplier=1.0)


def test_dp_with_a_fraction_of_clients_samples_poisson_with_a_fixed_denominator() -> None:
    """What the accountant's sampled Gaussian assumes: each client in with probability q (a
    sample of varying size, from the OS's entropy), the sum divided by q times the clients."""
    g = global_arrays()  # a = [1, 2]
    strategy = SparseFedAvg(clip_update_norm=10.0, dp_noise_multiplier=1e-9, dp_sample_rate=0.5, dp_eval_sample_rate=0.5, dp_population=8)
    import random

    assert isinstance(strategy.dp_sampler, random.SystemRandom)  # a run draws from the OS's entropy; this test from a seed
    strategy.dp_sampler = random.Random(0)
    grid = Mock()
    grid.get_node_ids.return_value = list(range(1, 9))
    sizes = [len(list(strategy.configure_train(r, g, ConfigRecord(), grid))) for r in range(1, 61)]
    assert len(set(sizes)) > 2 and 3.0 < sum(sizes) / len(sizes) < 5.0, sizes
    evals = [len(list(strategy.configure_evaluate(r, g, ConfigRecord(), grid))) for r in range(1, 31)]
    assert len(set(evals)) > 1
    strategy.sampled_round = 1  # whatever this round drew, the denominator is 0.5 * 8
    out, _ = strategy.aggregate_train(1, [reply(1, arrays(a=[5.0, 2.0]))])
    np.testing.assert_allclose(as_numpy(out)["a"], [1.0 + 4.0 / 4, 2.0], rtol=1e-6)
    with pytest.raises(ConfigError, match="dp_population"):
        SparseFedAvg(clip_update_norm=1.0, dp_noise_multiplier=1.0, dp_sample_rate=0.5)
    everyone = SparseFedAvg(clip_update_norm=1.0, dp_noise_multiplier=1.0, dp_sample_rate=1.0, dp_population=8)
    assert everyone.dp_sample_rate is None, "all clients every round: no sampling"


def test_privacy_spent_comes_from_the_accountant() -> None:
    from fedtune.runconfig import RunConfig
    from fedtune.typedconfig import from_dict
    from server.runner import dp_epsilon

    cfg = from_dict(RunConfig, {"federation": {"num_clients": 8, "clients_per_round": 4, "clip_update_norm": 1.0, "feed_importance": False, "dp_noise_multiplier": 1.0}})
    eps = [dp_epsilon(cfg, r) for r in (0, 1, 5, 20)]
    assert eps[0] == 0.0 and eps[1] < eps[2] < eps[3]
    more_noise = from_dict(RunConfig, {"federation": {"num_clients": 8, "clients_per_round": 4, "clip_update_norm": 1.0, "feed_importance": False, "dp_noise_multiplier": 4.0}})
    assert dp_epsilon(more_noise, 5) < eps[2]
    with pytest.raises(ConfigError, match="dp_stats_feature_clip"):
        from_dict(RunConfig, {"federation": {"clip_update_norm": 1.0, "feed_importance": False, "dp_noise_multiplier": 1.0, "head_fit": "lda"}})
    with pytest.raises(ConfigError, match=r"dp_delta: 0.5 is not below 1/num_clients \(0.25\)"):
        from_dict(RunConfig, {"federation": {"num_clients": 4, "clip_update_norm": 1.0, "dp_noise_multiplier": 1.0, "feed_importance": False, "dp_delta": 0.5}})
    with pytest.raises(ConfigError, match="federation.feed_importance: under differential privacy"):
        from_dict(RunConfig, {"method": {"name": "alast"}, "federation": {"clip_update_norm": 1.0, "dp_noise_multiplier": 1.0, "feed_importance": True}})
    from_dict(RunConfig, {"method": {"name": "alast"}, "federation": {"clip_update_norm": 1.0, "dp_noise_multiplier": 1.0, "feed_importance": False}})
    from_dict(RunConfig, {"method": {"name": "alast"}, "federation": {"feed_importance": True}})
    with pytest.raises(ConfigError, match="not privatized"):
        from_dict(RunConfig, {"federation": {"clip_update_norm": 1.0, "feed_importance": False, "dp_noise_multiplier": 1.0, "personalization": "lda"}})
    with_stats = from_dict(RunConfig, {"federation": {"num_clients": 8, "clients_per_round": 4, "clip_update_norm": 1.0, "feed_importance": False, "dp_noise_multiplier": 1.0,
                                                      "head_fit": "lda", "dp_stats_feature_clip": 5.0}})
    assert dp_epsilon(with_stats, 5, head_stats=True) > dp_epsilon(with_stats, 5) == eps[2]  # the statistics' release is paid for
    # the three releases share one sample: one sampled Gaussian of z / sqrt(3), which costs more
    # than three independently sampled ones would when the sample is a fraction
    import dp_accounting
    from dp_accounting import rdp

    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.0)), 5))
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.0)), 3))
    assert dp_epsilon(with_stats, 5, head_stats=True) > acc.get_epsilon(1e-5)
    # a client holding two tasks releases statistics twice
    two = from_dict(RunConfig, {"tasks": ["a", "b"], "federation": {"num_clients": 8, "clients_per_round": 4, "clip_update_norm": 1.0,
                                "feed_importance": False, "dp_noise_multiplier": 1.0, "head_fit": "lda", "dp_stats_feature_clip": 5.0}})
    assert dp_epsilon(two, 5, head_stats=True) > dp_epsilon(with_stats, 5, head_stats=True)


def test_private_statistics_bound_each_client_and_add_noise_of_the_sensitivity() -> None:
    import torch

    from fedtune.heads import (
        bound_contribution,
        class_stats,
        lda_head,
        nearest_psd,
        privatize_stats,
    )

    gen = torch.Generator().manual_seed(0)
    feats, labels = 30 * torch.randn(500, 6, generator=gen), torch.randint(0, 3, (500,), generator=gen)
    f, y = bound_contribution(feats, labels, clip=2.0, max_examples=100, seed=1)
    assert len(f) == 100 and float(f.norm(dim=1).max()) <= 2.0 + 1e-5
    st = class_stats(f, y, 3)
    assert np.linalg.norm(st["count"]) <= 100 and np.linalg.norm(st["sum"]) <= 100 * 2.0 + 1e-6 and np.linalg.norm(st["outer"]) <= 100 * 4.0 + 1e-6
    zero = {"count": np.zeros(3), "sum": np.zeros((3, 6)), "outer": np.zeros((6, 6))}
    noisy = [privatize_stats(zero, 2.0, 2.0, 100, np.random.default_rng(i)) for i in range(200)]
    sums = np.stack([n["sum"] for n in noisy])
    assert abs(sums.std() / (2.0 * 100 * 2.0) - 1) < 0.05  # noise of the multiplier times the sensitivity
    outer = noisy[0]["outer"]
    assert np.allclose(outer, outer.T) and abs(np.stack([n["outer"] for n in noisy]).std() / (2.0 * 100 * 4.0) - 1) < 0.05
    assert min(n["count"].min() for n in noisy) >= 1.0
    assert np.linalg.eigvalsh(nearest_psd(outer)).min() > 0
    # with little noise the private head is the plain one's
    big = class_stats(*bound_contribution(feats, labels, 1e3, 10_000, seed=0), 3)
    w, _ = lda_head(big)
    w_private, _ = lda_head(privatize_stats(big, 1e-9, 1e3, 10_000, np.random.default_rng(0)))
    assert torch.allclose(w, w_private, rtol=1e-4, atol=1e-6)


def test_federated_evaluation_every_n_rounds_and_always_in_the_last() -> None:
    strategy = SparseFedAvg(evaluate_every=3, last_round=5)
    grid = Mock()
    grid.get_node_ids.return_value = [1, 2]
    asked = [bool(list(strategy.configure_evaluate(r, global_arrays(), ConfigRecord(), grid))) for r in range(1, 6)]
    assert asked == [False, False, True, False, True]


def test_head_statistics_must_match_the_models_heads_even_when_they_come_first(caplog) -> None:
    from fedtune.heads import class_stats

    strategy = SparseFedAvg(head_stats_round=1)
    grid = Mock()
    grid.get_node_ids.return_value = [1, 2, 3]
    model = ArrayRecord({**dict(global_arrays().items()), "heads.digit.weight": Array(np.zeros((3, 4), dtype=F32))})
    list(strategy.configure_evaluate(1, model, ConfigRecord(), grid))
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(30, 4, generator=g), torch.arange(30) % 3
    wide, five = torch.randn(30, 6, generator=g), torch.arange(30) % 5

    def stats_reply(node_id: int, task: str, parts: dict) -> Message:
        msg = reply(node_id, None, 10, **{"accuracy-global": 0.5})
        msg.content[protocol.HEAD_STATS] = ArrayRecord({f"{task}.{k}": Array(v) for k, v in parts.items()})
        return msg

    with caplog.at_level("WARNING"):
        strategy.aggregate_evaluate(1, [
            stats_reply(1, "digit", class_stats(feats, five, 5)),  # first, self-consistent, 5 classes
            stats_reply(2, "digit", class_stats(wide, labels, 3)),  # 6 features
            stats_reply(3, "garment", class_stats(feats, labels, 3)),  # a task the model has no head for
            stats_reply(4, "digit", class_stats(feats, labels, 3)),  # the honest one
        ])
    assert set(strategy.head_stats) == {"digit"}
    for k, v in class_stats(feats, labels, 3).items():
        np.testing.assert_allclose(strategy.head_stats["digit"][k], v, rtol=1e-12, err_msg=k)
    assert "node 1 left out: task 'digit' statistics are for (5, 4)" in caplog.text
    assert "node 2 left out: task 'digit' statistics are for (3, 6)" in caplog.text
    assert "node 3 left out: task 'garment' is not one of the model's (digit)" in caplog.text


def test_weights_too_large_to_sum_are_rejected_and_no_mean_overflows(caplog) -> None:
    strategy = SparseFedAvg()
    g = global_arrays()
    configured(strategy, g)
    _, metrics = strategy.aggregate_train(1, [reply(1, arrays(a=[2.0, 2.0]), num_examples=1e308), reply(2, arrays(a=[3.0, 3.0]), num_examples=10)])
    assert [n for n, _ in strategy.last_rejections] == [1] and "is over" in strategy.last_rejections[0][1]
    assert metrics[protocol.NUM_EXAMPLES] == 10
    got, _ = strategy.aggregate_train(1, [reply(1, arrays(a=[2.0, 2.0]), counts={"a": 1e300}), reply(2, arrays(a=[3.0, 3.0]))])
    assert "not a count in [0," in strategy.last_rejections[0][1]
    np.testing.assert_array_equal(as_numpy(got)["a"], [3.0, 3.0])
    # float64 parameters can still overflow a weighted sum: the global value is kept
    g64 = ArrayRecord({"x": Array(np.array([1.0, 2.0]))})
    configured(strategy, g64)
    with caplog.at_level("WARNING"):
        got, _ = strategy.aggregate_train(1, [reply(1, ArrayRecord({"x": Array(np.array([1e300, 1e300]))}), num_examples=2**52),
                                              reply(2, ArrayRecord({"x": Array(np.array([1e300, 1e300]))}), num_examples=2**52)])
    np.testing.assert_array_equal(as_numpy(got)["x"], [1.0, 2.0])
    assert "the mean of 'x' is not finite" in caplog.text


def test_importance_length_is_the_models_depth_not_the_first_replys() -> None:
    strategy = SparseFedAvg(feed_importance=True, importance_len=2)
    configured(strategy, global_arrays())
    strategy.aggregate_train(1, [reply(1, arrays(a=[3, 5]), importance=[9.0, 9.0, 9.0]), reply(2, arrays(a=[7, 1]), importance=[1.0, 0.0])])
    assert strategy.last_rejections == [(1, "'importance' has 3 blocks, expected 2")]
    assert strategy.global_importance == pytest.approx([1.0, 0.0])
