"""SparseFedAvg: FedAvg over replies that carry only the parameters a client updated.

Each client sends the parameters it trained this round (see ``fedtune.protocol``).
The server averages every parameter over the clients that sent it, weighted by
their number of examples (a task's head and routers by the client's examples of that
task) or by how many local steps updated that parameter; parameters nobody sent keep
their global value. When every client sends every parameter and trains one task (and
``weighting="examples"``), the result equals Flower's FedAvg.
"""

from __future__ import annotations

import math
import random
import re
import secrets
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from clients.records import tensor_bytes
from fedtune import protocol
from fedtune.errors import CheckpointError, ConfigError
from fedtune.heads import StatsSum, join_stats, project_contribution

from .downlink import FULL, Downlink

ROBUST_ABSENT = ("skip", "unchanged")
AGGREGATIONS = ("mean", "median", "trimmed_mean", "mean_around_median")  # how each parameter is combined over its senders
IMPORTANCE_EMA_RATE = 0.5  # weight of the new round's mean in the running importance
_STATE_VERSION = 1
_NOT_AVERAGED = (protocol.NUM_EXAMPLES, "partition-id")  # evaluation metrics that are not means
MAX_WEIGHT = float(2**53)  # the largest num-examples or update count taken: far beyond any client, and no weighted sum overflows


class _Rejected(Exception):
    """A reply failed validation; the message is the reason."""


@dataclass
class _Reply:
    """A validated reply, decoded."""

    node_id: int
    arrays: dict[str, np.ndarray]  # personal keys already dropped
    num_examples: float
    update_counts: dict[str, float] | None
    importance: list[float] | None
    metrics: MetricRecord
    nbytes: int  # raw tensor bytes of every array received
    task_examples: dict[str, float] = field(default_factory=dict)  # a multitask client's examples per task (its heads' and routers' weights)


class SparseFedAvg(FedAvg):
    """FedAvg that aggregates each parameter over the clients that sent it.

    Parameters
    ----------
    weighting
        ``"examples"``: weight a reply by its num-examples. ``"updates"``: weight a
        parameter by the sender's UPDATE_COUNTS for it (a reply without them is
        rejected: its example count is not in the same unit as the others' steps).
    personal_keys
        Parameter-name prefixes (e.g. ``"head."``) never aggregated; a client that
        sends them has them dropped, with a warning.
    feed_importance
        Send the running global block importance to clients in the train config
        under ``protocol.IMPORTANCE``.
    fedavg_kwargs
        Passed to Flower's FedAvg (fraction_train, min_train_nodes, ...). The record
        keys and the weighting key are fixed by ``fedtune.protocol``.

    If no reply is accepted in a round, ``aggregate_train`` returns ``(None,
    metrics)``: Flower's ``start()`` then keeps the current global arrays. With no
    replies at all it returns ``(None, None)``, as FedAvg does.
    """

    def __init__(
        self,
        *,
        weighting: str = "examples",
        personal_keys: Sequence[str] = (),
        feed_importance: bool = False,
        sample_seed: int | None = None,
        round_offset: int = 0,
        head_stats_round: int | None = None,
        head_stats_every_round: bool = False,
        evaluate_every: int = 1,
        last_round: int | None = None,
        sparse_downlink: bool = False,
        initial_on_clients: bool = False,
        resend_timeout: float = 3600.0,
        aggregation: str = "mean",
        trim_fraction: float = 0.2,
        clip_update_norm: float | None = None,
        dp_noise_multiplier: float | None = None,
        dp_sample_rate: float | None = None,
        dp_eval_sample_rate: float | None = None,
        dp_population: int = 0,
        dp_stats_bounds: tuple[float, int] | None = None,
        robust_absent: str = "skip",
        nnm: bool = False,
        importance_len: int | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
        if not 0.0 <= trim_fraction < 0.5:
            raise ConfigError(f"trim_fraction: must be in [0, 0.5), got {trim_fraction}")
        if clip_update_norm is not None and not clip_update_norm > 0:
            raise ConfigError(f"clip_update_norm: must be positive or None, got {clip_update_norm}")
        if dp_noise_multiplier is not None and (clip_update_norm is None or aggregation != "mean" or not dp_noise_multiplier > 0):
            raise ConfigError("dp_noise_multiplier: needs clip_update_norm (the sensitivity), aggregation 'mean' and a positive multiplier")
        if robust_absent not in ROBUST_ABSENT:
            raise ConfigError(f"robust_absent: expected one of {ROBUST_ABSENT}, got {robust_absent!r}")
        if nnm and aggregation == "mean":
            raise ConfigError("nnm: nearest-neighbour mixing comes before a robust rule: it needs aggregation "
                              "median, trimmed_mean or mean_around_median (got 'mean')")
        self.aggregation, self.trim_fraction, self.clip_update_norm = aggregation, trim_fraction, clip_update_norm
        # the model's depth: an importance vector of another length is rejected (None: the
        # first accepted vector's length, or the restored global importance's)
        self.importance_len = importance_len
        self.robust_absent, self.nnm = robust_absent, nnm
        self.dp_noise_multiplier = dp_noise_multiplier
        self.dp_rng = np.random.default_rng()
        # Under DP with a fraction of the clients a round: Poisson sampling (each client in
        # with probability q, from the OS's entropy) and a fixed denominator (q times the
        # clients), DP-FedAvg's estimator, which the accountant's sampled Gaussian assumes
        if dp_sample_rate is not None and not (dp_noise_multiplier is not None and 0 < dp_sample_rate <= 1):
            raise ConfigError(f"dp_sample_rate: needs dp_noise_multiplier and a rate in (0, 1], got {dp_sample_rate}")
        self.dp_sample_rate = dp_sample_rate if dp_sample_rate is not None and dp_sample_rate < 1 else None
        if self.dp_sample_rate is not None and dp_population < 1:
            raise ConfigError("dp_sample_rate: needs dp_population, the number of clients (public), for the fixed denominator")
        self.dp_population = dp_population
        # the head fit's statistics come from the evaluation: the same sampling there
        self.dp_eval_sample_rate = dp_eval_sample_rate if dp_noise_multiplier is not None and dp_eval_sample_rate is not None and dp_eval_sample_rate < 1 else None
        self.dp_sampler = random.SystemRandom()
        # Under DP with the head fit: (feature clip, max examples), the bounds each client's
        # statistics are projected onto before they are summed (fedtune.heads.project_contribution)
        if dp_stats_bounds is not None and not (dp_noise_multiplier is not None and dp_stats_bounds[0] > 0 and dp_stats_bounds[1] >= 1):
            raise ConfigError(f"dp_stats_bounds: needs dp_noise_multiplier, a positive feature clip and at least 1 example, got {dp_stats_bounds}")
        self.dp_stats_bounds = dp_stats_bounds
        self.dp_rounds_repeated = 0  # rounds a --resume made the server run again: their noisy models were released once already
        self.run_token: str | None = uuid.uuid4().hex  # the run's identity in every instruction (state_dict keeps it across --resume)
        self.config_key: str | None = None  # the server's RunConfig.key(), in every instruction: a node that read another config refuses it
        self.on_release: Callable[[int], None] | None = None  # under DP: called with the run's round whose model an instruction is about to carry out (the runner's ledger)
        if weighting not in protocol.WEIGHTINGS:
            raise ConfigError(f"weighting: expected one of {protocol.WEIGHTINGS}, got {weighting!r}")
        if isinstance(personal_keys, str):
            raise ConfigError(
                f"personal_keys: expected a sequence of name prefixes, got the string "
                f"{personal_keys!r} (write [{personal_keys!r}])"
            )
        fixed = {
            "weighted_by_key": protocol.NUM_EXAMPLES,
            "arrayrecord_key": protocol.ARRAYS,
            "configrecord_key": protocol.CONFIG,
        }
        for key, value in fixed.items():
            if fedavg_kwargs.setdefault(key, value) != value:
                raise ConfigError(f"{key}: fixed to {value!r} by fedtune.protocol")
        super().__init__(**fedavg_kwargs)

        self.weighting = weighting
        self.personal_keys: tuple[str, ...] = tuple(personal_keys)
        self.feed_importance = feed_importance
        # Seeded node sampling (reproducible runs) and the rounds done before a resume.
        self.sample_seed = sample_seed
        self.round_offset = round_offset
        self.last_eval_metrics: list[dict[str, Any]] = []  # node_id, metrics (protocol.EvalMetrics)
        self.last_eval_rejections: list[tuple[int, str]] = []  # (node, reason) of evaluate replies left out
        # The round (counted over the whole run) whose evaluate replies carry feature
        # statistics for the server's head fit; what they summed to and their size.
        self.head_stats_round = head_stats_round
        self.head_stats_every_round = head_stats_every_round
        # Federated evaluation every N rounds (always in the last round, whose statistics the head fit uses).
        self.evaluate_every, self.final_round = evaluate_every, last_round
        self._stats = StatsSum()
        # The federation's summed statistics of the latest round that collected them, sent
        # with the next evaluate instruction when clients build personal heads from them
        # (head_stats_every_round: personalization lda); otherwise kept from the clients.
        self.fed_stats: dict[str, dict[str, np.ndarray]] = {}

        # What each node holds of the global model (server/downlink.py), the bytes sent down
        # this round (instructions' tensors), and what a node that lost its copy is resent.
        self.downlink = Downlink(sparse_downlink, initial_on_clients, first_version=0 if round_offset == 0 else secrets.randbelow(2**31) << 20)
        self.resend_timeout = resend_timeout
        self.bytes_down_round = 0
        self.bytes_up_round = 0  # tensor bytes of the accepted train replies, as received
        self.bytes_up_rejected_round = 0  # serialized array bytes of the rejected train replies
        self.messages_round = 0  # instructions sent this round (for full FedAvg's downlink bytes)
        # of them, instructions of the starting model to nodes that built it themselves: a full
        # FedAvg whose clients also start from that model would send those nothing
        self.start_messages_round = 0
        self._grid: Grid | None = None
        self._records: dict[str, RecordDict] = {}
        # Nodes never sampled for a round (new clients, who join in the final evaluation).
        self.exclude_nodes: set[int] = set()
        self.node_partition: dict[int, int] = {}  # node id -> the partition it holds, where the runner asked (seeded sampling)

        # The global arrays of the round being trained (set by configure_train).
        self.current_arrays: ArrayRecord | None = None
        self.head_shapes: dict[str, tuple[int, int]] | None = None  # the global heads' (classes, features), per task
        # Running, exponentially averaged global block importance.
        self.global_importance: list[float] | None = None
        # Facts about the latest aggregate_train call.
        self.last_rejections: list[tuple[int, str]] = []
        self.last_client_metrics: list[dict[str, Any]] = []
        self.last_update_norms: list[tuple[int, float]] = []  # (node, norm of its update) under norm bounding
        self.last_nnm_neighbours: list[tuple[int, list[int]]] = []  # (node, the nodes whose updates its mixed update averages) under nnm
        self.sampled_round = 0  # nodes sent a train instruction this round (the DP average's denominator)
        # Counters across rounds, saved by state_dict().
        self.last_round = 0
        self.rounds_aggregated = 0
        self.total_bytes_up = 0
        self.total_accepted = 0
        self.total_rejected = 0

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "\t├──> SparseFedAvg settings:")
        log(INFO, "\t│\t├── Weighting: %s", self.weighting)
        log(INFO, "\t│\t├── Personal keys: %s", list(self.personal_keys))
        log(INFO, "\t│\t└── Feed importance: %s", self.feed_importance)
        super().summary()

    def is_personal(self, name: str) -> bool:
        """Whether a parameter name is personal (never aggregated)."""
        return name.startswith(self.personal_keys) if self.personal_keys else False

    def by_partition(self, nodes) -> list[int]:
        """`nodes` in the order of the partitions they hold (those not known after, by id): a seeded
        sample over this list picks the same partitions at every launch, whatever ids the nodes got."""
        return sorted(nodes, key=lambda n: (n not in self.node_partition, self.node_partition.get(n, 0), n))

    def _seed_sampling(self, server_round: int, phase: int) -> None:
        # FedAvg samples nodes with the global `random` over _Sampled's partition-ordered list;
        # seed it per round so runs repeat.
        if self.sample_seed is not None:
            random.seed(self.sample_seed * 1_000_003 + server_round * 2 + phase)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's, with seeded sampling and the run's round number."""
        server_round += self.round_offset
        if self.evaluate_every > 1 and server_round % self.evaluate_every and server_round != self.final_round:
            return []
        self._seed_sampling(server_round, 1)
        if self.on_release is not None:
            self.on_release(server_round)
        config = ConfigRecord(dict(config))
        if self.head_stats_every_round or (self.head_stats_round is not None and server_round == self.head_stats_round):
            config[protocol.WANT_HEAD_STATS] = True
        self._grid = grid
        self.downlink.observe(arrays)
        self.head_shapes = head_shapes(arrays)
        if self.dp_eval_sample_rate is not None:
            return self._poisson_instructions(server_round, arrays, config, grid, self.dp_eval_sample_rate, MessageType.EVALUATE)
        return super().configure_evaluate(server_round, arrays, config, _Sampled(grid, self))

    def _poisson_instructions(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, rate: float,
                              message_type: str) -> list[Message]:
        """FedAvg's instructions, to a Poisson sample instead of its fixed-size one: each node (but
        the excluded ones) in with probability `rate`, from the OS's entropy."""
        nodes = [n for n in _Sampled(grid, self).get_node_ids() if self.dp_sampler.random() < rate]
        log(INFO, "Poisson-sampled %s nodes (rate %.3f, DP)", len(nodes), rate)
        config["server-round"] = server_round
        return list(self._construct_messages(RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config}), nodes, message_type))

    def instructions(self, record: RecordDict, node_ids: list[int], message_type: str) -> list[Message]:
        """The messages of `record` to `node_ids` as this strategy sends them (sparse downlink, statistics)."""
        return list(self._construct_messages(record, node_ids, message_type))

    def _construct_messages(self, record: RecordDict, node_ids: list[int], message_type: str, resend: bool = False) -> Iterable[Message]:
        """One instruction per node: the global arrays that node lacks (the sparse downlink),
        with the versions in its config; evaluate instructions also carry the federation's
        latest feature statistics when clients personalize from them. A `resend` (the whole
        model, to a node that lost its copy) counts in the bytes sent but not in full
        FedAvg's instructions, which never need one."""
        self._records[message_type] = record
        extra: dict[str, Array] = {}
        if message_type == MessageType.EVALUATE and self.fed_stats:
            # float64: the client subtracts n mu mu^T from the summed second moment, which float32 rounding ruins on poorly conditioned features
            extra = {k: Array(np.asarray(v, dtype=np.float64)) for k, v in join_stats(self.fed_stats).items()}
        messages = []
        for node_id in node_ids:
            arrays, base = self.downlink.payload(node_id, record[protocol.ARRAYS])
            # the starting model, to a node that built it itself: full FedAvg from the same start sends it nothing
            from_start = base == 0 and self.downlink.version == 0 and node_id not in self.downlink.held
            config = ConfigRecord(dict(record[protocol.CONFIG]))
            if self.run_token is not None:
                config[protocol.RUN_TOKEN] = self.run_token
            if self.config_key is not None:
                config[protocol.CONFIG_KEY] = self.config_key
            config[protocol.BASE_VERSION] = base
            config[protocol.MODEL_VERSION] = self.downlink.version if self.downlink.sparse else FULL
            if base == 0 and self.downlink.initial_sha256 is not None:
                config[protocol.INITIAL_SHA256] = self.downlink.initial_sha256
            content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: config})
            if extra:
                content[protocol.FED_STATS] = ArrayRecord(dict(extra))
            self.bytes_down_round += tensor_bytes(content)
            if not resend:
                self.messages_round += 1
                self.start_messages_round += from_start
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node_id))
        return messages

    def _settle_downlink(self, replies: list[Message], message_type: str) -> list[Message]:
        """Resend the whole model, within the round, to nodes whose copy is missing or another
        version; then note what every replying node holds."""
        need = [m for m in replies if not m.has_error() and _needs_full_model(m)]
        if need and self._grid is not None:
            for m in need:
                self.downlink.forget(m.metadata.src_node_id, "it holds no copy of the version the server assumed")
            log(WARNING, "downlink: %d node(s) lost their model copy; resending them the whole model", len(need))
            resend = [msg for m in need for msg in self._construct_messages(self._records[message_type], [m.metadata.src_node_id], message_type, resend=True)]
            skip = {id(m) for m in need}
            replies = [m for m in replies if id(m) not in skip] + list(self._grid.send_and_receive(resend, timeout=self.resend_timeout))
        for m in replies:
            if m.has_error() or _needs_full_model(m):
                self.downlink.forget(m.metadata.src_node_id, "error reply")
            else:
                self.downlink.delivered(m.metadata.src_node_id)
        return replies

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Each metric's mean over the clients that reported it, weighted by num-examples.

        Clients of different tasks report different per-task keys, so unlike FedAvg's
        (which requires every reply to carry the same keys) a key need not be in every
        reply. Each client's metrics are kept in last_eval_metrics, and each reply left out
        with its reason in last_eval_rejections.
        """
        self.last_eval_metrics = []
        self.last_eval_rejections = []
        self._stats = StatsSum()
        replies = self._settle_downlink(list(replies), MessageType.EVALUATE)
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for msg in replies:
            if msg.has_error():
                self._leave_out(msg.metadata.src_node_id, f"error reply (code {msg.error.code}): {msg.error.reason}")
                continue
            if protocol.METRICS not in msg.content.metric_records:
                self._leave_out(msg.metadata.src_node_id, f"no {protocol.METRICS!r} metric record")
                continue
            if _needs_full_model(msg):
                self._leave_out(msg.metadata.src_node_id, _STILL_NO_COPY)
                continue
            metrics = {k: v for k, v in msg.content.metric_records[protocol.METRICS].items()}
            try:
                typed = protocol.EvalMetrics.from_dict(metrics)
            except (KeyError, TypeError, ValueError) as err:
                self._leave_out(msg.metadata.src_node_id, f"malformed metrics: {err}")
                continue
            self.last_eval_metrics.append({"node_id": msg.metadata.src_node_id, "metrics": typed})
            if protocol.HEAD_STATS in msg.content.array_records:
                self._add_head_stats(msg.metadata.src_node_id, msg.content.array_records[protocol.HEAD_STATS])
            weight = metrics.get(protocol.NUM_EXAMPLES)
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
                continue
            for key, value in metrics.items():
                if key in _NOT_AVERAGED or key.startswith(f"{protocol.NUM_EXAMPLES}-") or not isinstance(value, (int, float)) or not math.isfinite(value):
                    continue
                # a task's accuracy weighs by that task's test examples (a client that reports them)
                task = key.removeprefix("accuracy-global-").removeprefix("accuracy-personal-") if key.startswith(("accuracy-global-", "accuracy-personal-")) else None
                w = typed.per_task_examples.get(task, weight) if task is not None else weight
                if w <= 0:
                    continue
                sums[key] = sums.get(key, 0.0) + float(value) * w
                weights[key] = weights.get(key, 0.0) + w
        if self._stats.tasks and self.head_stats_every_round:  # only clients that personalize from them are sent them
            self.fed_stats = {t: {k: v.copy() for k, v in parts.items()} for t, parts in self._stats.tasks.items()}
        if not sums:
            return None
        return MetricRecord({k: sums[k] / weights[k] for k in sorted(sums)})

    def _add_head_stats(self, node_id: int, record: ArrayRecord) -> None:
        """Add one client's per-task feature statistics to the round's sums (fedtune.heads.StatsSum);
        a task's statistics that are malformed are left out, with a warning."""
        stats: dict[str, dict[str, np.ndarray]] = {}
        for key, array in record.items():
            task, _, part = key.rpartition(".")
            try:
                stats.setdefault(task, {})[part] = np.asarray(_decoded(array), dtype=np.float64)
            except ValueError as err:
                log(WARNING, "head statistics from node %s left out: cannot decode %r: %s", node_id, key, err)
                return
        if self.dp_stats_bounds is not None:  # the noise's sensitivity holds whatever the client sent
            for task, parts in stats.items():
                stats[task], scaled = project_contribution(parts, *self.dp_stats_bounds)
                if scaled:
                    log(WARNING, "head statistics from node %s, task %r, exceed the DP bounds; scaled onto them: %s", node_id, task, ", ".join(scaled))
        for problem in self._stats.add(stats, self.head_shapes):
            log(WARNING, "head statistics from node %s left out: %s", node_id, problem)

    @property
    def head_stats(self) -> dict[str, dict[str, np.ndarray]]:
        """This round's summed statistics per task (empty outside the head-fit round)."""
        return self._stats.tasks

    @property
    def head_stats_bytes(self) -> int:
        return self._stats.nbytes

    # ------------------------------------------------------------------ train

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays, add the global importance, then FedAvg's."""
        self.current_arrays = arrays
        self._grid = grid
        self.downlink.observe(arrays)
        self.bytes_down_round, self.messages_round, self.start_messages_round = 0, 0, 0
        self.sampled_round = 0
        self.bytes_up_round = 0  # a round without replies receives nothing (aggregate_train returns early then)
        self.bytes_up_rejected_round = 0
        server_round += self.round_offset
        self._seed_sampling(server_round, 0)
        if self.on_release is not None:
            self.on_release(server_round - 1)  # round r trains from round r-1's model
        # A copy: FedAvg writes into the config it gets, and the caller reuses its own.
        config = ConfigRecord(dict(config))
        if self.feed_importance and self.global_importance is not None:
            config[protocol.IMPORTANCE] = [float(v) for v in self.global_importance]
        if self.dp_sample_rate is not None:
            messages = self._poisson_instructions(server_round, arrays, config, grid, self.dp_sample_rate, MessageType.TRAIN)
        else:
            messages = list(super().configure_train(server_round, arrays, config, _Sampled(grid, self)))
        self.sampled_round = len(messages)
        return messages

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies and average each parameter over its senders."""
        if self.current_arrays is None:
            raise RuntimeError(
                "SparseFedAvg.aggregate_train called before configure_train: "
                "the global arrays are unknown"
            )
        server_round += self.round_offset  # the run's round, as configure_train numbered it
        replies = self._settle_downlink(list(replies), MessageType.TRAIN)
        self.last_rejections = []
        self.last_client_metrics = []
        self.last_update_norms = []
        self.last_nnm_neighbours = []
        if not replies:
            return None, None

        error_replies = [msg for msg in replies if msg.has_error()]
        content_replies = [msg for msg in replies if not msg.has_error()]
        log(INFO, "aggregate_train: received %s results and %s failures", len(content_replies), len(error_replies))
        for msg in error_replies:
            self._reject(
                msg.metadata.src_node_id, f"error reply (code {msg.error.code}): {msg.error.reason}"
            )

        accepted: list[_Reply] = []
        rejected_bytes = 0  # what rejected replies carried: it crossed the link all the same (reported apart)
        importance_len = self.importance_len or (len(self.global_importance) if self.global_importance is not None else None)
        for msg in content_replies:
            node_id = msg.metadata.src_node_id
            try:
                reply = self._validate(msg, self.current_arrays, importance_len)
            except _Rejected as err:
                self._reject(node_id, str(err))
                self._record_client_metrics(server_round, msg, accepted=False, reason=str(err))
                rejected_bytes += sum(len(a.data) for rec in msg.content.array_records.values() for a in rec.values())  # as they came
                continue
            if reply.importance is not None and importance_len is None:
                importance_len = len(reply.importance)
            accepted.append(reply)
            self._record_client_metrics(server_round, msg, accepted=True, reason=None)

        bytes_up = sum(r.nbytes for r in accepted)
        self.bytes_up_rejected_round = rejected_bytes
        self.bytes_up_round = bytes_up
        self.last_round = server_round
        self.total_accepted += len(accepted)
        self.total_rejected += len(self.last_rejections)
        self.total_bytes_up += bytes_up

        if accepted:
            arrays: ArrayRecord | None = self._aggregate_arrays(self.current_arrays, accepted)
            metrics = self.train_metrics_aggr_fn(
                [_scalar_metrics(r.metrics) for r in accepted], self.weighted_by_key
            )
            self._update_importance(accepted)
            self.rounds_aggregated += 1
        else:
            log(WARNING, "aggregate_train: no reply accepted, the global model is unchanged")
            arrays, metrics = None, MetricRecord()

        metrics[protocol.NUM_EXAMPLES] = round(sum(r.num_examples for r in accepted))
        metrics[protocol.REPLIES_ACCEPTED] = len(accepted)
        metrics[protocol.REPLIES_REJECTED] = len(self.last_rejections)
        metrics[protocol.BYTES_UP] = bytes_up
        if self.global_importance is not None:
            metrics[protocol.IMPORTANCE] = list(self.global_importance)
        return arrays, metrics

    # ------------------------------------------------------------- validation

    def _reject(self, node_id: int, reason: str) -> None:
        log(WARNING, "aggregate_train: rejected reply from node %d: %s", node_id, reason)
        self.last_rejections.append((node_id, reason))

    def _leave_out(self, node_id: int, reason: str) -> None:
        """An evaluate reply that does not count: logged and kept in last_eval_rejections."""
        log(WARNING, "aggregate_evaluate: left out the reply from node %d: %s", node_id, reason)
        self.last_eval_rejections.append((node_id, reason))

    def _validate(
        self, msg: Message, global_arrays: ArrayRecord, importance_len: int | None
    ) -> _Reply:
        """Decode and check one reply against the global arrays; raise _Rejected."""
        node_id = msg.metadata.src_node_id
        content = msg.content

        if _needs_full_model(msg):  # it asked again after the whole model was resent to it
            raise _Rejected(_STILL_NO_COPY)
        record = content.get(protocol.ARRAYS)
        if not isinstance(record, ArrayRecord):
            raise _Rejected(f"missing ArrayRecord {protocol.ARRAYS!r}")
        metrics = content.get(protocol.METRICS)
        if not isinstance(metrics, MetricRecord):
            raise _Rejected(f"missing MetricRecord {protocol.METRICS!r}")

        num_examples = metrics.get(protocol.NUM_EXAMPLES)
        if num_examples is None:
            raise _Rejected(f"missing {protocol.NUM_EXAMPLES!r} in {protocol.METRICS!r}")
        if isinstance(num_examples, list) or not math.isfinite(num_examples):
            raise _Rejected(f"{protocol.NUM_EXAMPLES!r} is not a finite number: {num_examples!r}")
        if num_examples <= 0:
            raise _Rejected(f"non-positive {protocol.NUM_EXAMPLES!r}: {num_examples!r}")
        if num_examples > MAX_WEIGHT:
            raise _Rejected(f"{protocol.NUM_EXAMPLES!r} {num_examples!r} is over {MAX_WEIGHT:.0f}: no client holds that many")

        try:
            typed = protocol.TrainMetrics.from_dict(metrics)
        except (TypeError, ValueError) as err:
            raise _Rejected(f"malformed {protocol.METRICS!r}: {err}") from err

        arrays: dict[str, np.ndarray] = {}
        nbytes = 0
        personal: list[str] = []
        for name, array in record.items():
            try:
                value = _decoded(array)
            except ValueError as err:
                raise _Rejected(f"cannot decode parameter {name!r}: {err}") from err
            nbytes += value.nbytes
            if self.is_personal(name):
                personal.append(name)
                continue
            reference = global_arrays.get(name)
            if reference is None:
                raise _Rejected(f"unknown parameter {name!r} (not in the global arrays)")
            if tuple(value.shape) != tuple(reference.shape):
                raise _Rejected(
                    f"shape mismatch for {name!r}: got {tuple(value.shape)}, "
                    f"expected {tuple(reference.shape)}"
                )
            if str(value.dtype) != reference.dtype:
                raise _Rejected(
                    f"dtype mismatch for {name!r}: got {value.dtype}, expected {reference.dtype}"
                )
            if np.issubdtype(value.dtype, np.inexact):
                if np.isnan(value).any():
                    raise _Rejected(f"NaN in parameter {name!r}")
                if np.isinf(value).any():
                    raise _Rejected(f"Inf in parameter {name!r}")
            arrays[name] = value
        if personal:
            log(
                WARNING,
                "aggregate_train: node %d sent personal parameters, ignored: %s",
                node_id,
                personal,
            )

        return _Reply(
            node_id=node_id,
            arrays=arrays,
            num_examples=float(num_examples),
            update_counts=self._validate_update_counts(content, arrays),
            importance=_validate_importance(metrics, importance_len),
            metrics=metrics,
            nbytes=nbytes,
            task_examples=_task_examples(typed.task_examples, float(num_examples)),
        )

    def _validate_update_counts(
        self, content: RecordDict, arrays: dict[str, np.ndarray]
    ) -> dict[str, float] | None:
        """The reply's per-parameter update counts, or None if it has none."""
        if protocol.UPDATE_COUNTS not in content:
            if self.weighting == "updates":
                raise _Rejected(f"weighting 'updates' needs {protocol.UPDATE_COUNTS!r}, which the reply lacks (its example count is not a step count)")
            return None
        record = content[protocol.UPDATE_COUNTS]
        if not isinstance(record, MetricRecord):
            raise _Rejected(f"{protocol.UPDATE_COUNTS!r} is not a MetricRecord")
        counts: dict[str, float] = {}
        for name, count in record.items():
            if isinstance(count, list) or not math.isfinite(count) or not 0 <= count <= MAX_WEIGHT:
                raise _Rejected(
                    f"{protocol.UPDATE_COUNTS!r} for {name!r} is not a count in [0, {MAX_WEIGHT:.0f}]: {count!r}"
                )
            counts[name] = float(count)
        if self.weighting == "updates":
            missing = sorted(set(arrays) - set(counts))
            if missing:
                raise _Rejected(f"{protocol.UPDATE_COUNTS!r} lacks sent parameters {missing}")
        return counts

    def _record_client_metrics(
        self, server_round: int, msg: Message, *, accepted: bool, reason: str | None
    ) -> None:
        metrics = msg.content.get(protocol.METRICS)
        entry: dict[str, Any] = {
            "round": server_round,
            "node_id": msg.metadata.src_node_id,
            "accepted": accepted,
            "metrics": (
                {k: (list(v) if isinstance(v, list) else v) for k, v in metrics.items()}
                if isinstance(metrics, MetricRecord)
                else {}
            ),
        }
        if reason is not None:
            entry["reason"] = reason
        self.last_client_metrics.append(entry)

    # ------------------------------------------------------------ aggregation

    def _weight(self, reply: _Reply, name: str) -> float:
        # under "updates" every accepted reply carries counts for what it sent (_validate_update_counts)
        if self.weighting == "updates":
            return reply.update_counts[name]
        task = _task_of(name) if reply.task_examples else None
        # a task's head and routers by that task's examples, not by the client's examples over all its tasks
        return reply.task_examples.get(task, reply.num_examples) if task is not None else reply.num_examples

    def _bounded(self, global_arrays: ArrayRecord, replies: list[_Reply]) -> list[_Reply]:
        """Norm bounding: each reply's update (its values minus the global ones, over the
        parameters it sent) scaled down to norm clip_update_norm when it is longer."""
        if self.clip_update_norm is None:
            return replies
        out = []
        for reply in replies:
            deltas = {n: v.astype(np.float64) - global_arrays[n].numpy().astype(np.float64) for n, v in reply.arrays.items() if np.issubdtype(v.dtype, np.inexact)}
            norm = math.sqrt(sum(float((d * d).sum()) for d in deltas.values()))
            # under DP a hair below the bound: the scaled update is stored back in float32, and
            # its rounding must not take the norm (the sensitivity) past clip_update_norm
            bound = self.clip_update_norm * (1 - 1e-6 if self.dp_noise_multiplier is not None else 1.0)
            scale = min(1.0, bound / norm) if norm > 0 else 1.0
            self.last_update_norms.append((reply.node_id, norm))
            if scale < 1.0:
                arrays = dict(reply.arrays)
                for n, d in deltas.items():
                    arrays[n] = (global_arrays[n].numpy().astype(np.float64) + scale * d).astype(reply.arrays[n].dtype)
                reply = _Reply(reply.node_id, arrays, reply.num_examples, reply.update_counts, reply.importance, reply.metrics, reply.nbytes, reply.task_examples)
            out.append(reply)
        return out

    def _aggregate_arrays(self, global_arrays: ArrayRecord, replies: list[_Reply]) -> ArrayRecord:
        """A new ArrayRecord with every global key, in the global order: each parameter
        combined over the replies that sent it (weighted mean, or coordinate-wise median, trimmed
        mean or mean around the median), after norm bounding."""
        self.last_update_norms = []
        self.last_nnm_neighbours = []
        replies = self._bounded(global_arrays, replies)
        if self.dp_noise_multiplier is not None:
            return self._private_arrays(global_arrays, replies)
        if self.aggregation != "mean":
            return self._robust_arrays(global_arrays, replies)
        sums: dict[str, np.ndarray] = {}
        weights: dict[str, float] = {}
        for reply in replies:
            for name, value in reply.arrays.items():
                weight = self._weight(reply, name)
                if weight == 0:
                    continue
                with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught below, per parameter
                    term = value.astype(np.promote_types(value.dtype, np.float64)) * weight
                if name in sums:
                    sums[name] += term
                    weights[name] += weight
                else:
                    sums[name], weights[name] = term, weight

        aggregated: dict[str, Array] = {}
        for name, reference in global_arrays.items():
            if name not in sums:
                # Nobody updated it: keep the global value, bit for bit.
                aggregated[name] = Array(
                    dtype=reference.dtype,
                    shape=tuple(reference.shape),
                    stype=reference.stype,
                    data=reference.data,
                )
                continue
            with np.errstate(over="ignore", invalid="ignore"):
                mean = sums[name] / weights[name]
            dtype = np.dtype(reference.dtype)
            if not np.issubdtype(dtype, np.inexact):
                mean = np.rint(mean)
            mean = mean.astype(dtype)
            if not np.isfinite(mean).all():  # finite replies whose weighted sum overflowed: nothing poisons the model
                log(WARNING, "aggregate_train: the mean of %r is not finite (values too large): its global value is kept", name)
                mean = reference.numpy()
            aggregated[name] = Array(np.asarray(mean))
        return ArrayRecord(aggregated)

    def _private_arrays(self, global_arrays: ArrayRecord, replies: list[_Reply]) -> ArrayRecord:
        """Client-level DP (DP-FedAvg, McMahan et al. 2018) for sparse updates: each sampled
        client's clipped update counts with weight 1/m (m: every client when all train each
        round; under Poisson sampling the expected sample, q times the clients, whatever the
        round drew; a client that did not send a parameter contributes a zero change to it),
        and Gaussian noise of std noise_multiplier * clip / m is added to every coordinate of
        every parameter some client sent this round. The set of parameters sent is not privatized."""
        if self.dp_sample_rate is not None:
            m = max(self.dp_sample_rate * self.dp_population, 1e-12)
        else:
            m = max(self.sampled_round, len(replies), 1)
        sums: dict[str, np.ndarray] = {}
        for reply in replies:
            for name, value in reply.arrays.items():
                if not np.issubdtype(value.dtype, np.inexact):
                    continue
                delta = value.astype(np.float64) - global_arrays[name].numpy().astype(np.float64)
                sums[name] = sums[name] + delta if name in sums else delta
        sigma = self.dp_noise_multiplier * self.clip_update_norm / m
        aggregated: dict[str, Array] = {}
        for name, reference in global_arrays.items():
            if name not in sums:
                aggregated[name] = Array(dtype=reference.dtype, shape=tuple(reference.shape), stype=reference.stype, data=reference.data)
                continue
            noisy = reference.numpy().astype(np.float64) + sums[name] / m + self.dp_rng.normal(0.0, sigma, size=sums[name].shape)
            aggregated[name] = Array(np.asarray(noisy.astype(np.dtype(reference.dtype))))
        return ArrayRecord(aggregated)

    def _robust_arrays(self, global_arrays: ArrayRecord, replies: list[_Reply]) -> ArrayRecord:
        """Coordinate-wise median, trimmed mean or mean around the median (unweighted) of each
        parameter over its senders;
        with robust_absent 'unchanged', every client that replied this round and did not send
        the parameter counts as a vote for its global value (no change), so attackers who are
        many among a block's few senders but few among the round's clients are outvoted.
        With nnm, each client's update is first replaced by the mean of its nearest neighbours'
        (_nnm_weights; with robust_absent 'skip', per parameter the mean over the neighbours
        that sent it, with 'unchanged' a neighbour that did not counts as no change), and the
        rule combines those."""
        senders: dict[str, list[np.ndarray]] = {}
        for reply in replies:
            for name, value in reply.arrays.items():
                senders.setdefault(name, []).append(value)
        mixing = self._nnm_weights(global_arrays, replies) if self.nnm else None
        aggregated: dict[str, Array] = {}
        for name, reference in global_arrays.items():
            values = senders.get(name)
            if not values:
                aggregated[name] = Array(dtype=reference.dtype, shape=tuple(reference.shape), stype=reference.stype, data=reference.data)
                continue
            dtype = np.dtype(reference.dtype)
            if mixing is not None and np.issubdtype(dtype, np.inexact):
                base = reference.numpy().astype(np.float64)
                stack = self._deltas(name, base, replies)  # built again, not kept from _nnm_weights: one parameter's at a time in memory
                if self.robust_absent == "unchanged":  # a neighbour that did not send it counts as no change
                    combined = base + self._combine(np.tensordot(mixing, stack, axes=1))
                else:  # the mean over the neighbours that sent it; a client none of whose neighbours did does not vote
                    sent = np.array([name in r.arrays for r in replies], dtype=np.float64)
                    share = mixing * sent[None, :]
                    voters = share.sum(axis=1) > 0
                    mixed = np.tensordot(share[voters] / share[voters].sum(axis=1, keepdims=True), stack, axes=1)
                    combined = base + self._combine(mixed)
            else:
                if self.robust_absent == "unchanged":
                    values = values + [reference.numpy()] * (len(replies) - len(values))
                combined = self._combine(np.stack([v.astype(np.float64) for v in values]))
            if not np.issubdtype(dtype, np.inexact):
                combined = np.rint(combined)
            aggregated[name] = Array(np.asarray(combined.astype(dtype)))
        return ArrayRecord(aggregated)

    def _combine(self, stack: np.ndarray) -> np.ndarray:
        """The robust rule over the votes stacked on axis 0."""
        n = stack.shape[0]
        k = int(math.floor(self.trim_fraction * n))  # trimmed_mean: dropped at each end | mean_around_median: dropped in all
        if self.aggregation == "median":
            return np.median(stack, axis=0)
        if self.aggregation == "mean_around_median":
            # Xie et al. 2018: per coordinate, the mean of the values nearest the median
            # (the trim_fraction share farthest from it dropped), so one-sided outliers are
            # what is dropped, not honest values on the other side
            nearest = np.argsort(np.abs(stack - np.median(stack, axis=0)), axis=0, kind="stable")[: n - k]
            return np.take_along_axis(stack, nearest, axis=0).mean(axis=0)
        return np.sort(stack, axis=0)[k : n - k].mean(axis=0)

    @staticmethod
    def _deltas(name: str, base: np.ndarray, replies: list[_Reply]) -> np.ndarray:
        """Each reply's change to parameter `name` (zero where it did not send it), stacked."""
        stack = np.zeros((len(replies), *base.shape), dtype=np.float64)
        for i, reply in enumerate(replies):
            if name in reply.arrays:
                stack[i] = reply.arrays[name].astype(np.float64) - base
        return stack

    def _nnm_weights(self, global_arrays: ArrayRecord, replies: list[_Reply]) -> np.ndarray:
        """Nearest-neighbour mixing (Allouah et al. 2023, "Fixing by Mixing"): row i averages the
        n - f updates nearest to client i's (itself included; L2 over every float parameter sent
        this round, an unsent one counting as no change), f = floor(trim_fraction * n). Honest
        clients' mixed updates then sit close to the honest mean, however skewed their data, so
        the coordinate-wise rule after it no longer has to pick one client's value."""
        n = len(replies)
        f = int(math.floor(self.trim_fraction * n))
        gram = np.zeros((n, n), dtype=np.float64)
        names = {name for reply in replies for name, v in reply.arrays.items() if np.issubdtype(v.dtype, np.inexact)}
        for name in sorted(names):
            flat = self._deltas(name, global_arrays[name].numpy().astype(np.float64), replies).reshape(n, -1)
            gram += flat @ flat.T
        sq = np.diag(gram)
        distances = sq[:, None] + sq[None, :] - 2.0 * gram
        weights = np.zeros((n, n), dtype=np.float64)
        for i in range(n):
            nearest = np.argsort(distances[i], kind="stable")[: n - f]
            if i not in nearest:  # ties at zero distance: a client is always its own neighbour
                nearest[-1] = i
            weights[i, nearest] = 1.0 / (n - f)
        self.last_nnm_neighbours = [(replies[i].node_id, sorted(replies[j].node_id for j in np.flatnonzero(weights[i]))) for i in range(n)]
        return weights

    def _update_importance(self, replies: list[_Reply]) -> None:
        """Fold the examples-weighted mean importance of the round into the EMA."""
        carriers = [r for r in replies if r.importance is not None]
        if not carriers:
            return
        total = sum(r.num_examples for r in carriers)
        mean = np.zeros(len(carriers[0].importance or []), dtype=np.float64)
        for reply in carriers:
            mean += np.asarray(reply.importance, dtype=np.float64) * (reply.num_examples / total)
        if self.global_importance is None:
            updated = mean
        else:
            previous = np.asarray(self.global_importance, dtype=np.float64)
            updated = (1 - IMPORTANCE_EMA_RATE) * previous + IMPORTANCE_EMA_RATE * mean
        self.global_importance = [float(v) for v in updated]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The strategy's own state (JSON-serializable), for server checkpoints."""
        return {
            "version": _STATE_VERSION,
            "global_importance": (
                None if self.global_importance is None else list(self.global_importance)
            ),
            "last_round": self.last_round,
            "rounds_aggregated": self.rounds_aggregated,
            "total_bytes_up": self.total_bytes_up,
            "total_accepted": self.total_accepted,
            "total_rejected": self.total_rejected,
            "run_token": self.run_token,
            "dp_rounds_repeated": self.dp_rounds_repeated,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state written by state_dict()."""
        expected = set(self.state_dict())
        # a checkpoint from before run tokens resumes without one: its clients' state files
        # name no run, and a token would set them aside
        state = {"run_token": None, "dp_rounds_repeated": 0, **state}
        if state["run_token"] is not None and not protocol.valid_run_token(state["run_token"]):
            raise CheckpointError(f"strategy state: run_token is not a token of letters, digits, - and _: {state['run_token']!r}")
        missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unknown:
            raise CheckpointError(f"strategy state: missing keys {missing}, unknown keys {unknown}")
        if state["version"] != _STATE_VERSION:
            raise CheckpointError(
                f"strategy state: version {state['version']!r}, expected {_STATE_VERSION}"
            )
        importance = state["global_importance"]
        if importance is not None and not (
            isinstance(importance, list)
            and all(isinstance(v, int | float) and math.isfinite(v) for v in importance)
        ):
            raise CheckpointError("strategy state: global_importance is not a list of numbers")
        self.run_token = state["run_token"]
        counters = [k for k in expected if k not in ("version", "global_importance", "run_token")]
        for key in counters:
            if not isinstance(state[key], int) or isinstance(state[key], bool):
                raise CheckpointError(f"strategy state: {key} is not an int: {state[key]!r}")
        self.global_importance = None if importance is None else [float(v) for v in importance]
        for key in counters:
            setattr(self, key, state[key])


def _decoded(array: Array) -> np.ndarray:
    """A client's array as numpy; ValueError (naming what failed) when its bytes do not decode
    to an array (empty, truncated, another format)."""
    try:
        value = array.numpy()
    except Exception as err:  # numpy's loaders raise many types on bad bytes
        raise ValueError(f"{type(err).__name__}: {err}") from err
    if not isinstance(value, np.ndarray):
        raise ValueError(f"decodes to {type(value).__name__}, not an array")
    return value


def _task_examples(per_task: dict[str, int], num_examples: float) -> dict[str, float]:
    """A multitask reply's examples per task (`num-examples-<task>`): they weigh that task's head
    and routers, so they must add up to the reply's `num-examples` (_Rejected otherwise)."""
    counts = {t: float(n) for t, n in per_task.items()}
    if counts and not math.isclose(sum(counts.values()), num_examples, rel_tol=1e-9, abs_tol=1e-6):
        raise _Rejected(f"its {protocol.NUM_EXAMPLES}-<task> counts add up to {sum(counts.values()):g}, not its {protocol.NUM_EXAMPLES} {num_examples:g}")
    return counts


def _task_of(name: str) -> str | None:
    """The task a parameter belongs to: a head (`heads.<task>.…`), a per-task router
    (`….routers.<task>.…`) or a shared router's task embedding (`….task_embed.<task>`); None
    for what every task shares."""
    parts = name.split(".")
    if parts[0] == "heads" and len(parts) > 2:
        return parts[1]
    for per_task in ("routers", "task_embed"):  # per-task routers; the shared router's task embeddings
        if per_task in parts[:-1] and parts.index(per_task) + 1 < len(parts):
            return parts[parts.index(per_task) + 1]
    return None


class _Sampled:
    """The grid as FedAvg's node sampling sees it: without the excluded nodes, in the order of
    the partitions they hold (so that a seeded sample repeats across launches)."""

    def __init__(self, grid: Grid, strategy: SparseFedAvg) -> None:
        self._grid, self._strategy = grid, strategy

    def get_node_ids(self) -> list[int]:
        return self._strategy.by_partition(n for n in self._grid.get_node_ids() if n not in self._strategy.exclude_nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


_STILL_NO_COPY = "it still holds no usable model copy after the whole model was resent"


def _needs_full_model(msg: Message) -> bool:
    """Whether a reply says the node could not complete the sent arrays (protocol.NEED_FULL_MODEL)."""
    metrics = msg.content.metric_records.get(protocol.METRICS)
    return bool(metrics is not None and metrics.get(protocol.NEED_FULL_MODEL))


def _scalar_metrics(metrics: MetricRecord) -> RecordDict:
    """A RecordDict with only the reply's scalar metrics, for Flower's averaging.

    Lists (importance, per-block counts) may differ in length between clients and
    would break aggregate_metricrecords; they stay in last_client_metrics.
    """
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, list)}
    return RecordDict({protocol.METRICS: MetricRecord(scalars)})


_HEAD_WEIGHT = re.compile(r"^heads\.([^.]+)\.weight$")


def head_shapes(arrays: ArrayRecord) -> dict[str, tuple[int, int]] | None:
    """Each task's head shape (classes, features) in the global arrays, which a client's head
    statistics must match (None: the model has no `heads.<task>.weight`)."""
    shapes = {m.group(1): (int(a.shape[0]), int(a.shape[1])) for name, a in arrays.items() if (m := _HEAD_WEIGHT.match(name)) and len(a.shape) == 2}
    return shapes or None


def _validate_importance(metrics: MetricRecord, expected_len: int | None) -> list[float] | None:
    """The reply's importance vector, or None if it has none; raise _Rejected if bad."""
    if protocol.IMPORTANCE not in metrics:
        return None
    value = metrics[protocol.IMPORTANCE]
    if not isinstance(value, list) or not value:
        raise _Rejected(f"{protocol.IMPORTANCE!r} is not a non-empty list: {value!r}")
    if not all(math.isfinite(v) for v in value):
        raise _Rejected(f"{protocol.IMPORTANCE!r} has non-finite values")
    if expected_len is not None and len(value) != expected_len:
        raise _Rejected(f"{protocol.IMPORTANCE!r} has {len(value)} blocks, expected {expected_len}")
    return [float(v) for v in value]
