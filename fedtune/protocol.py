"""Record and metric keys shared by the client and the server, in one place.

A train reply from a client is a RecordDict with:

- ``ARRAYS``: ArrayRecord of exactly the parameters the client updated, keyed by
  parameter name (the names of the global model's state dict);
- ``METRICS``: MetricRecord of scalars, at least ``NUM_EXAMPLES`` (> 0); may carry
  ``IMPORTANCE``, a list of per-block importance floats;
- ``UPDATE_COUNTS`` (optional): MetricRecord, parameter name -> number of local
  optimizer steps that updated that parameter.

This module imports no Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

# Record keys in a Message's RecordDict.
ARRAYS = "arrays"  # ArrayRecord: parameter name -> Array
CONFIG = "config"  # ConfigRecord sent with every instruction
METRICS = "metrics"  # MetricRecord of scalars (and a few lists)
UPDATE_COUNTS = "update-counts"  # MetricRecord: parameter name -> int steps
FED_STATS = "fed-stats"  # ArrayRecord in an evaluate instruction: the federation's summed HEAD_STATS of its latest round that collected them
HEAD_STATS = "head-stats"  # ArrayRecord in an evaluate reply: per task "<task>.count" [C], "<task>.sum" [C, d], "<task>.outer" [d, d]

# Metric keys in the METRICS record of a reply.
NUM_EXAMPLES = "num-examples"  # int > 0, weight of the reply
IMPORTANCE = "importance"  # list[float], one per block; also the config key sent back

# Config keys in the CONFIG record of an instruction.
SERVER_ROUND = "server-round"  # set by Flower's FedAvg.configure_train
WANT_HEAD_STATS = "want-head-stats"  # in an evaluate instruction: reply with HEAD_STATS too
BASE_VERSION = "base-version"  # int: the global model version the sent arrays complete (-1: they are the whole model)
MODEL_VERSION = "model-version"  # int: the version the client holds once it applied them (-1: no sparse downlink, keep no copy)
INITIAL_SHA256 = "initial-sha256"  # str: checksum of version 0 when clients may build it themselves (BASE_VERSION 0, no copy held)
FINAL = "final"  # in an evaluate instruction: the run's final evaluation (every client personalizes fully)
CONFIG_KEY = "config-key"  # str: the server's RunConfig.key(); a client whose own config has another key refuses the instruction
RUN_TOKEN = "run-token"  # str: the run's identity (kept across --resume); a client keeps state only from files of its run


def valid_run_token(token: object) -> bool:
    """A run token names a folder on the device (other-runs/<token>): letters, digits, - and _ only."""
    return isinstance(token, str) and 0 < len(token) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in token)

# Metric keys in a reply that carries no result.
NEED_FULL_MODEL = "need-full-model"  # 1: the client holds no copy of BASE_VERSION; the server resends the whole model

# How the server weights each sender of a parameter (federation.weighting).
Weighting = Literal["examples", "updates"]  # by the reply's NUM_EXAMPLES | by its UPDATE_COUNTS for that parameter
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)

# Metric keys the server adds to each round's aggregated train MetricRecord.
REPLIES_ACCEPTED = "replies-accepted"  # replies that entered the aggregate
REPLIES_REJECTED = "replies-rejected"  # error replies and replies failing validation
BYTES_UP = "bytes-up"  # raw tensor bytes received in accepted replies


# --------------------------------------------------------------------------- typed replies


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _whole(value: Any, key: str) -> int:
    """`value` as an int, when it is a whole number (a metric record holds ints and floats)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ValueError(f"{key!r} is not a whole number: {value!r}")
    return int(value)


def _number(value: Any, key: str) -> float:
    """`value` as a float, when it is a number (not a bool, a string or a list)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key!r} is not a number: {value!r}")
    return float(value)


def _finite(value: Any, key: str) -> float:
    """`value` as a float, when it is a finite number."""
    number = _number(value, key)
    if not math.isfinite(number):
        raise ValueError(f"{key!r} is not finite: {value!r}")
    return number


def _wholes(values: Any, key: str) -> list[int]:
    if not isinstance(values, list):
        raise TypeError(f"{key!r} is not a list: {values!r}")
    return [_whole(v, key) for v in values]


@dataclass
class TrainMetrics:
    """The METRICS record of a train reply, typed. Keys on the wire are the field names with
    dashes (`num-examples`, `block-updates`, ...); expert usage travels as `experts-<task>`."""

    num_examples: int = 0  # NUM_EXAMPLES: the reply's weight
    partition_id: int = -1  # the client's data partition
    task_ids: list[int] = field(default_factory=list)  # indices into the model's tasks
    train_loss: float | None = None  # mean over the round's training examples
    train_accuracy: float | None = None  # on the training batches, as seen during training
    steps: int = 0  # optimizer steps this round
    flops_per_step: float = 0.0  # measured training FLOPs per step (mean of the counted steps)
    survey_flops: float = 0.0  # FLOPs of the forward passes before training that choose blocks or experts (not in flops_per_step)
    activation_bytes: int = 0  # largest activation bytes saved for backward in a step
    memory_bytes: int = 0  # largest measured training memory of a step: activations plus trainable state (what a device profile budgets)
    steps_over_memory_budget: int = 0  # steps whose measured memory passed the device profile's budget (the planner's estimate ran low)
    trainable_params: int = 0  # largest number of trainable parameters in a step
    step_time_s: float = 0.0  # median step time
    time_s: float = 0.0  # the whole round on the client
    bytes_sent: int = 0  # tensor bytes of the update
    bytes_received: int = 0  # tensor bytes of the instruction's arrays
    block_updates: list[int] = field(default_factory=list)  # per block: steps that trained it
    importance: list[float] | None = None  # IMPORTANCE: the client's per-block importance estimate
    experts: dict[str, list[int]] = field(default_factory=dict)  # task -> tokens per expert before capacity, [MoE blocks x experts] flattened
    expert_dropped: int = 0  # MoE: token-to-expert assignments over an expert's capacity (not processed), all blocks and tasks
    task_examples: dict[str, int] = field(default_factory=dict)  # `num-examples-<task>`: each task's training examples (what its head and routers are weighted by)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "experts":
                out.update({f"experts-{task}": counts for task, counts in value.items()})
            elif f.name == "task_examples":
                out.update({f"{NUM_EXAMPLES}-{task}": n for task, n in value.items()})
            elif value is not None:
                out[_key(f.name)] = value
        return out

    @classmethod
    def from_dict(cls, m: Mapping[str, Any]) -> TrainMetrics:
        """From a reply's metrics; keys it lacks keep their defaults (a rejected reply may lack any).
        Raises ValueError or TypeError naming the key whose value is not what the field holds."""
        known = {f.name: m[_key(f.name)] for f in fields(cls) if f.name not in ("experts", "task_examples") and _key(f.name) in m}
        if "partition_id" in known:
            known["partition_id"] = _whole(known["partition_id"], "partition-id")
        for name in ("expert_dropped", "steps", "activation_bytes", "memory_bytes", "steps_over_memory_budget", "trainable_params", "bytes_sent", "bytes_received"):
            if name in known:  # counts: the run's totals and the summary add and compare them
                known[name] = _whole(known[name], _key(name))
                if known[name] < 0:
                    raise ValueError(f"{_key(name)!r} is negative: {known[name]}")
        for name in ("num_examples", "flops_per_step", "survey_flops", "step_time_s", "time_s"):
            if name in known:
                known[name] = _finite(known[name], _key(name))
        if "num_examples" in known and known["num_examples"].is_integer():
            known["num_examples"] = int(known["num_examples"])  # a count, as the client sent it
        for name in ("train_loss", "train_accuracy"):  # NaN allowed: a client that took no step has none
            if known.get(name) is not None:
                known[name] = _number(known[name], _key(name))
        if known.get("importance") is not None:
            if not isinstance(known["importance"], list):
                raise TypeError(f"'importance' is not a list: {known['importance']!r}")
            known["importance"] = [_number(v, "importance") for v in known["importance"]]
        for name in ("task_ids", "block_updates"):
            if name in known:
                known[name] = _wholes(known[name], _key(name))
        experts = {k.removeprefix("experts-"): _wholes(c, k) for k, c in m.items() if k.startswith("experts-")}
        task_examples = {k.removeprefix(f"{NUM_EXAMPLES}-"): _whole(n, k) for k, n in m.items() if k.startswith(f"{NUM_EXAMPLES}-")}
        if any(n < 0 for n in task_examples.values()):
            raise ValueError(f"a {NUM_EXAMPLES}-<task> count is negative: {task_examples}")
        return cls(**known, experts=experts, task_examples=task_examples)


@dataclass
class EvalMetrics:
    """The METRICS record of an evaluate reply, typed: accuracies on the client's local test
    split, of the global model and of the client's personalized one, mean over its tasks and
    per task (`accuracy-global-<task>`, `accuracy-personal-<task>` on the wire). A client
    whose local test split is empty reports num-examples 0 and no accuracy."""

    num_examples: int = 0
    partition_id: int = -1
    accuracy_global: float | None = 0.0  # None: no local test example to measure it on
    accuracy_personal: float | None = None  # None: the client has no personalized model to report
    per_task_global: dict[str, float] = field(default_factory=dict)
    per_task_personal: dict[str, float] = field(default_factory=dict)
    per_task_examples: dict[str, int] = field(default_factory=dict)  # `num-examples-<task>`: the local test examples of each task (what its accuracies are weighted by)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {NUM_EXAMPLES: self.num_examples, "partition-id": self.partition_id}
        out.update({f"{NUM_EXAMPLES}-{t}": n for t, n in self.per_task_examples.items()})
        if self.accuracy_global is not None:
            out["accuracy-global"] = self.accuracy_global
        if self.accuracy_personal is not None:
            out["accuracy-personal"] = self.accuracy_personal
        out.update({f"accuracy-global-{t}": a for t, a in self.per_task_global.items()})
        out.update({f"accuracy-personal-{t}": a for t, a in self.per_task_personal.items()})
        return out

    @classmethod
    def from_dict(cls, m: Mapping[str, Any]) -> EvalMetrics:
        """From a reply's metrics; raises KeyError naming a missing required key (the global
        accuracy is required of a reply that measured it on some example)."""
        if NUM_EXAMPLES not in m:
            raise KeyError(f"evaluate reply without {NUM_EXAMPLES}")
        num_examples = _whole(m[NUM_EXAMPLES], NUM_EXAMPLES)
        if num_examples < 0:
            raise ValueError(f"{NUM_EXAMPLES} is negative: {num_examples}")
        if num_examples and "accuracy-global" not in m:
            raise KeyError("evaluate reply without accuracy-global")
        glob, personal = m.get("accuracy-global"), m.get("accuracy-personal")
        return cls(
            num_examples=num_examples,
            partition_id=_whole(m.get("partition-id", -1), "partition-id"),
            accuracy_global=None if glob is None else float(glob),
            accuracy_personal=None if personal is None else float(personal),
            per_task_global={k.removeprefix("accuracy-global-"): float(v) for k, v in m.items() if k.startswith("accuracy-global-")},
            per_task_personal={k.removeprefix("accuracy-personal-"): float(v) for k, v in m.items() if k.startswith("accuracy-personal-")},
            per_task_examples={k.removeprefix(f"{NUM_EXAMPLES}-"): _whole(v, k) for k, v in m.items() if k.startswith(f"{NUM_EXAMPLES}-")},
        )
