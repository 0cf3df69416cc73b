"""The server side of a run: the global model, the strategy, per-round records and checkpoints.

After every round (Flower's evaluate_fn hook) it evaluates the global model on
the central test set, appends the round to metrics.jsonl (per client: what it
trained, sent and measured), and checkpoints the global state with the
strategy's state, so a killed run resumes from its last completed round.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from clients.records import numpy_to_arrays
from fedtune import protocol
from fedtune.errors import CheckpointError, ConfigError
from fedtune.federated import federated_data, global_model, load_numpy_state, state_to_numpy
from fedtune.heads import (
    class_moments,
    discriminant,
    evaluate,
    join_stats,
    lda_head,
    nearest_psd,
    privatize_stats,
    set_head,
    split_stats,
)
from fedtune.lora import is_lora_name
from fedtune.model import checkpoint_meta, model_meta, read_state, save_checkpoint
from fedtune.protocol import TrainMetrics
from fedtune.report import (
    append_jsonl,
    plot_run,
    protocol_numbers,
    read_jsonl,
    replace_durably,
    rss_bytes,
    run_identity,
    write_json,
)
from fedtune.runconfig import RunConfig
from fedtune.typedconfig import differences, from_dict, to_dict

from .strategy import SparseFedAvg

CHECKPOINT = "checkpoint.safetensors"
DP_LEDGER = "dp_ledger.json"  # under DP: rounds a --resume repeated (their first models went out), written before metrics.jsonl is cut
FED_STATS = "fed_stats.safetensors"  # the federation's latest summed statistics (personalization: lda), beside the checkpoint
FED_STATS_STAGED = "fed_stats.next.safetensors"  # a round's statistics until its checkpoint is written
# Config keys a resumed run may change: they do not change what the rounds compute.
RESUME_MAY_CHANGE = ("name", "federation.rounds", "federation.round_timeout_s", "federation.connect_timeout_s",
                     "federation.checkpoint_every", "federation.final_evaluation", "backend")


def _weighted_mean(evals: list[dict[str, Any]], key: str) -> float | None:
    """The examples-weighted mean of `key` over the client evaluations that report it."""
    have = [e for e in evals if e.get(key) is not None]
    n = sum(e["num_examples"] for e in have)
    return sum(e[key] * e["num_examples"] for e in have) / n if n else None


def check_model_config(cfg: RunConfig, model) -> None:
    """What only the built model can tell, before any round: a `federation.personal` prefix
    that names no parameter (nothing would stay on the clients) and a method setting the model
    cannot take (a block it does not have) are refused; a device profile
    of `federation.profiles` the method cannot plan for is a warning (each simulated client
    given it will reply with an error every round, which an experiment may want: the
    robustness runs give two clients the mcu profile on purpose; deployed devices plan for
    their own node's profile)."""
    from fedtune.errors import PlanError
    from fedtune.methods import make_method
    from fedtune.profiles import AUTO, UNLIMITED

    names = [n for n, _ in model.named_parameters()]
    for i, prefix in enumerate(cfg.federation.personal):
        if not any(n.startswith(prefix) for n in names):
            heads = sorted({n.split(".")[0] + "." for n in names})
            raise ConfigError(f"federation.personal[{i}]: {prefix!r} is the start of no parameter name, so nothing would stay on the clients "
                              f"(names start with {', '.join(heads)}; the task heads are heads.<task>.)")
    with torch.random.fork_rng(devices=[]):  # planning measures the model: the run's random stream stays as it was
        # a method setting the model cannot take (a block it does not have) is refused: no client could train
        make_method(cfg.method, model, UNLIMITED, cfg.train.batch_size, model.tasks[0], seed=cfg.seed)
        for i, name in enumerate(cfg.federation.profiles):
            if name == AUTO or name in cfg.federation.profiles[:i]:
                continue
            try:
                make_method(cfg.method, model, name, cfg.train.batch_size, model.tasks[0], seed=cfg.seed)
            except PlanError as err:
                log(30, "federation.profiles[%d]: method %r cannot plan for device profile %r, so every simulated client given it will reply "
                    "with an error and be left out of every round: %s", i, cfg.method.name, name, err)


class ServerRunner:
    def __init__(self, cfg: RunConfig, out: Path, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        self.out = Path(out)
        self.resume = resume
        self.progress = progress
        self.model = global_model(cfg)
        self.task = self.model.tasks[0]
        self.tasks = self.model.tasks
        check_model_config(cfg, self.model)
        self.split, _ = federated_data(cfg)
        self.rounds: list[dict[str, Any]] = []
        self.done_rounds = 0
        self.dp_stats_rng = np.random.default_rng()  # the head fit's noise under DP: secret (fresh entropy), never derived from the config
        self.bar = None
        self.started = time.time()
        self.time_before = 0.0  # a resumed run: the seconds its earlier processes ran (their last kept round's elapsed_s)
        self.final: dict[str, Any] | None = None
        self.strategy: SparseFedAvg | None = None  # made by run()
        self.released_through = 0  # under DP: the newest round whose model went out (the ledger's)
        self.cut_at: int | None = None  # under DP: the checkpoint round a resume counted and cut metrics.jsonl back to
        # what full-model FedAvg sends per model: every tensor but LoRA adapters (it trains the weights they adapt)
        self.full_bytes = int(sum(v.numel() * v.element_size() for k, v in self.model.state_dict().items() if not is_lora_name(k)))

    # -- checkpoints
    def _repeated(self) -> int:
        """Rounds a --resume repeated (DP: their first noisy models count in the privacy spent)."""
        return self.strategy.dp_rounds_repeated if self.strategy is not None else 0

    def count_repeated(self, strategy: SparseFedAvg, records: list[dict[str, Any]]) -> None:
        """On --resume: the rounds after the checkpoint, which this run repeats, had their noisy
        models go out (DP counts each release): those with a record in metrics.jsonl, and those
        the ledger saw released before a crash cut their record. Written to the ledger before the
        records are cut, so a second crash before the next checkpoint still knows them."""
        ledger = self.out / DP_LEDGER
        kept = json.loads(ledger.read_text()) if ledger.is_file() else {}
        recorded = {r["round"] for r in records if isinstance(r.get("round"), int) and r["round"] > self.done_rounds}
        if kept.get("cut_at") == self.done_rounds:  # an earlier resume from this checkpoint counted the records it was to cut
            recorded = set()
        repeated = max(len(recorded), int(kept.get("released_through", 0)) - self.done_rounds)
        strategy.dp_rounds_repeated = max(strategy.dp_rounds_repeated, int(kept.get("rounds_repeated", 0))) + repeated
        if self.cfg.federation.dp_noise_multiplier:
            self._write_ledger(strategy.dp_rounds_repeated, self.done_rounds, self.done_rounds)

    def released(self, server_round: int) -> None:
        """Under DP: round `server_round`'s model is about to go out; the ledger keeps the newest
        such round, so a crash before its record is written still counts it on --resume."""
        if server_round <= self.released_through or self.strategy is None:
            return
        self.released_through = server_round
        self._write_ledger(self.strategy.dp_rounds_repeated, server_round, self.cut_at)

    def _write_ledger(self, rounds_repeated: int, released_through: int, cut_at: int | None) -> None:
        """dp_ledger.json: the rounds resumes repeated, the newest round whose model went out, and
        the checkpoint whose later records a resume counted and cut (a newer checkpoint makes it
        stale: its strategy state holds the count then)."""
        write_json(self.out / DP_LEDGER, {"rounds_repeated": rounds_repeated, "released_through": released_through, "cut_at": cut_at})

    def _checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def save_checkpoint(self, arrays: ArrayRecord, strategy: SparseFedAvg, server_round: int) -> None:
        state = {k: torch.from_numpy(np.array(v.numpy())) for k, v in arrays.items()}
        meta = model_meta(self.cfg.model, {t: int(self.model.heads[t].out_features) for t in self.tasks},
                          run=to_dict(self.cfg), round=server_round, strategy=strategy.state_dict(), method=self.cfg.method.name)
        staged = self.out / FED_STATS_STAGED
        if strategy.fed_stats:  # staged beside the previous round's, which stays until the checkpoint is written
            save_checkpoint(staged, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in join_stats(strategy.fed_stats).items()},
                            {"round": server_round})
        save_checkpoint(self._checkpoint_path(), state, meta)
        if staged.is_file():
            replace_durably(staged, self.out / FED_STATS)

    def load_fed_stats(self) -> dict[str, dict[str, np.ndarray]]:
        """The federation's statistics as the checkpoint's round left them (the next evaluate
        instruction carries them); none when there are none, or, with a warning, when the
        file is damaged or newer than the checkpoint (the next evaluation collects them again).
        A crash after the checkpoint but before the staged statistics replaced the previous
        round's leaves them staged: they are the checkpoint's then, and taken."""
        staged = self.out / FED_STATS_STAGED
        if staged.is_file():
            try:
                state, raw = read_state(staged)
                if int(checkpoint_meta(raw).get("round", -1)) == self.done_rounds:
                    replace_durably(staged, self.out / FED_STATS)
            except (CheckpointError, TypeError, ValueError):
                pass
            staged.unlink(missing_ok=True)  # another round's (the checkpoint was not written) or damaged
        path = self.out / FED_STATS
        if not path.is_file():
            return {}
        try:
            state, raw = read_state(path)
            written = int(checkpoint_meta(raw).get("round", -1))
        except (CheckpointError, TypeError, ValueError) as err:
            log(30, "resume: %s set aside (%s); clients build their personal heads without the federation's statistics until the next evaluation", path, err)
            return {}
        if written > self.done_rounds:
            log(30, "resume: %s is from round %d, after the checkpoint's %d: set aside", path, written, self.done_rounds)
            return {}
        return split_stats({k: v.numpy() for k, v in state.items()})

    def load_checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        path = self._checkpoint_path()
        if not path.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {path}")
        state, raw = read_state(path)
        meta = checkpoint_meta(raw)
        if "round" not in meta or "strategy" not in meta:
            raise CheckpointError(f"{path}: not a server checkpoint (no round/strategy in its metadata)")
        resume_conflicts(path, raw, self.cfg)
        arrays = {k: v.numpy() for k, v in state.items()}
        load_numpy_state(self.model, arrays, f"checkpoint {path}")
        return arrays, meta

    # -- the run
    def make_strategy(self, round_offset: int) -> SparseFedAvg:
        f = self.cfg.federation
        per_round = f.clients_per_round or f.num_clients
        per_eval = f.eval_clients_per_round or per_round
        need = f.min_clients or f.num_clients  # connected clients a round waits for
        return SparseFedAvg(
            weighting=f.weighting,
            personal_keys=f.personal_prefixes(),
            feed_importance=f.feed_importance,
            # DP's accountant counts the privacy of a secret sample of clients: under DP the
            # sample is drawn from fresh entropy, not from the config's seed
            sample_seed=None if f.dp_noise_multiplier else self.cfg.seed,
            round_offset=round_offset,
            head_stats_round=f.rounds if f.head_fit == "lda" else None,
            head_stats_every_round=f.personalization == "lda",
            evaluate_every=f.evaluate_every,
            last_round=f.rounds,
            sparse_downlink=f.downlink == "sparse",
            initial_on_clients=f.downlink == "sparse" and round_offset == 0,
            aggregation=f.aggregation,
            trim_fraction=f.trim_fraction,
            robust_absent=f.robust_absent,
            nnm=f.nnm,
            importance_len=self.model.depth,
            clip_update_norm=f.clip_update_norm,
            dp_noise_multiplier=f.dp_noise_multiplier,
            dp_sample_rate=per_round / f.num_clients if f.dp_noise_multiplier else None,
            dp_eval_sample_rate=min(per_eval, f.num_clients) / f.num_clients if f.dp_noise_multiplier else None,
            dp_population=f.num_clients,
            dp_stats_bounds=(f.dp_stats_feature_clip, f.dp_stats_max_examples) if f.dp_noise_multiplier and f.head_fit == "lda" else None,
            resend_timeout=f.round_timeout_s,
            # Flower samples int(nodes * fraction): half a client more than per_round / N keeps float
            # rounding (15 / 22 * 22 = 14.99...) from sampling one client fewer
            fraction_train=min(1.0, (per_round + 0.5) / f.num_clients),
            min_train_nodes=min(per_round, need),
            fraction_evaluate=min(1.0, (per_eval + 0.5) / f.num_clients),
            min_evaluate_nodes=min(per_eval, need),
            min_available_nodes=need,
        )

    def run(self, grid: Grid) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out / "metrics.jsonl"
        f = self.cfg.federation
        if self.resume:
            arrays_np, meta = self.load_checkpoint()
            self.done_rounds = int(meta["round"])
            records = read_jsonl(metrics_path)
            self.rounds = [r for r in records if r.get("round", 0) <= self.done_rounds]
            self.time_before = max([float(r.get("elapsed_s", 0.0)) for r in self.rounds] + [0.0])
            strategy = self.make_strategy(self.done_rounds)
            strategy.load_state_dict(meta["strategy"])
            self.count_repeated(strategy, records)
            self.cut_at = self.done_rounds
            cut = metrics_path.with_name(metrics_path.name + ".tmp")  # a crash while cutting leaves the old file whole
            cut.write_text("".join(json.dumps(r) + "\n" for r in self.rounds))
            replace_durably(cut, metrics_path)
            strategy.fed_stats = self.load_fed_stats()
            log(30, "resuming %s from round %d of %d", self.out, self.done_rounds, f.rounds)
        else:
            if metrics_path.exists() or self._checkpoint_path().exists():
                raise ConfigError(f"{self.out} already holds a run (metrics.jsonl/checkpoint); use --resume to continue it or choose another --out")
            arrays_np = state_to_numpy(self.model)
            strategy = self.make_strategy(0)
        remaining = f.rounds - self.done_rounds
        strategy.config_key = self.cfg.key()
        self.released_through = self.done_rounds
        if f.dp_noise_multiplier:
            strategy.on_release = self.released
        self.strategy = strategy
        final_path = self.out / "final_evaluation.json"
        # a run stopped after its last checkpoint but before its final evaluation does it on --resume
        final_due = f.final_evaluation and (remaining > 0 or not final_path.is_file())
        if f.final_evaluation and not final_due:
            try:
                self.final = json.loads(final_path.read_text())
            except (OSError, ValueError) as err:
                log(30, "resume: %s unreadable (%s): the final evaluation runs again", final_path, err)
                final_due = True
        if remaining > 0 or final_due:
            wait_for_nodes(grid, f.total_clients(), f.connect_timeout_s)
            if f.new_clients or f.clients_per_round is not None or f.eval_clients_per_round is not None:
                # the seeded samples are drawn over partitions, not over node ids (random per launch)
                self.strategy.node_partition = self.node_partitions(grid, strict=bool(f.new_clients))
            if f.new_clients:
                self.strategy.exclude_nodes = self.new_client_nodes(self.strategy.node_partition)
        if remaining > 0:
            if self.progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=f.rounds, initial=self.done_rounds, desc=f"{self.cfg.name}", unit="round")
            strategy.start(
                grid,
                numpy_to_arrays(arrays_np),
                num_rounds=remaining,
                timeout=f.round_timeout_s,
                train_config=ConfigRecord({}),
                evaluate_config=ConfigRecord({}),
                evaluate_fn=self.on_round,
            )
            if self.bar is not None:
                self.bar.close()
        if final_due:
            self.final_evaluation(grid)
        return self.finish()

    def node_partitions(self, grid: Grid, strict: bool = True) -> dict[int, int]:
        """Ask every node which partition it holds (node ids are drawn afresh at each launch;
        partitions are the run's own). A node that does not say is an error when `strict` (new
        clients must be told apart), else logged: it is sampled after the others, by id."""
        nodes = sorted(grid.get_node_ids())
        timeout = (self.cfg.federation.connect_timeout_s or 60.0) + 0.5 * len(nodes)  # a simulation answers one node at a time
        replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes], timeout=timeout)
        parts, problems = {}, []
        for reply in replies:
            if reply.has_error() or protocol.METRICS not in reply.content.metric_records:
                problems.append(f"node {reply.metadata.src_node_id} did not say which partition it holds: {reply.error.reason if reply.has_error() else 'no metrics'}")
                continue
            parts[reply.metadata.src_node_id] = int(reply.content.metric_records[protocol.METRICS]["partition-id"])
        problems += [f"node {n} did not say which partition it holds: no reply within {timeout:.0f} s" for n in sorted(set(nodes) - set(parts) - {r.metadata.src_node_id for r in replies})]
        if problems and strict:
            raise ConfigError(problems[0])
        for problem in problems:
            log(30, "%s; it is sampled after the nodes that did, by its id", problem)
        return parts

    def new_client_nodes(self, parts: dict[int, int]) -> set[int]:
        """The nodes holding partitions from num_clients on: new clients, left out of every
        round (they join in the final evaluation)."""
        new = {node for node, part in parts.items() if part >= self.cfg.federation.num_clients}
        if len(new) != self.cfg.federation.new_clients:
            raise ConfigError(f"federation.new_clients is {self.cfg.federation.new_clients} but {len(new)} node(s) hold partitions from {self.cfg.federation.num_clients} on")
        log(20, "new clients (final evaluation only): nodes %s", sorted(new))
        return new

    def final_evaluation(self, grid: Grid) -> None:
        """Every client (at most eval_clients_per_round of them in a sampled federation)
        evaluates the final global model, after the head fit, and its personalized model on
        its local test split; kept as the record `final` of metrics.jsonl."""
        f, s = self.cfg.federation, self.strategy
        new = sorted(s.exclude_nodes)
        nodes = s.by_partition(set(grid.get_node_ids()) - s.exclude_nodes)
        if f.clients_per_round is not None:
            nodes = random.Random(self.cfg.seed).sample(nodes, min(len(nodes), f.eval_clients_per_round or f.clients_per_round))
        nodes += new
        arrays = numpy_to_arrays(state_to_numpy(self.model))
        s.downlink.observe(arrays)
        s.bytes_down_round, s.messages_round, s.start_messages_round = 0, 0, 0
        config = ConfigRecord({protocol.SERVER_ROUND: f.rounds, protocol.FINAL: True})
        messages = s.instructions(RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: config}), nodes, MessageType.EVALUATE)
        started = time.time()
        s.aggregate_evaluate(f.rounds, grid.send_and_receive(messages, timeout=f.round_timeout_s))
        evals = [{"node_id": e["node_id"], "new": e["node_id"] in s.exclude_nodes, **{k.replace("-", "_"): v for k, v in e["metrics"].to_dict().items()}} for e in s.last_eval_metrics]
        self.final = {
            "round": f.rounds, "clients_asked": len(nodes), "client_evaluations": evals,
            "eval_rejected": [{"node_id": n, "reason": r} for n, r in s.last_eval_rejections],
            "bytes_down": s.bytes_down_round, "bytes_down_full_fedavg": self.full_bytes * s.messages_round,
            "bytes_down_full_fedavg_same_start": self.full_bytes * (s.messages_round - s.start_messages_round),
            "time_s": round(time.time() - started, 2),
        }
        write_json(self.out / "final_evaluation.json", self.final)

    def on_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Flower calls this before round 1 (0) and after every round: evaluate (after the
        head-fit step in the round that carries statistics), record, checkpoint."""
        rnd = server_round + self.done_rounds
        load_numpy_state(self.model, {k: v.numpy() for k, v in arrays.items()})
        per_task, ev = self.evaluate_global()
        if server_round == 0:
            if not self.rounds:
                self.record({"round": 0, "accuracy_global": ev["accuracy"], "loss_global": ev["loss"], "accuracy_per_task": {t: e["accuracy"] for t, e in per_task.items()}, "bytes_up": 0, "bytes_down": 0, "bytes_up_full_fedavg": 0})
            return MetricRecord({"accuracy": ev["accuracy"]})
        head_fit = {}
        # the statistics this round's evaluation replies carried (for the head fit, or for the
        # clients' personal heads in every evaluated round): uplink bytes like any other
        stats_bytes = self.strategy.head_stats_bytes
        if self.strategy.head_stats and self.cfg.federation.head_fit == "lda" and rnd == self.cfg.federation.rounds:
            arrays, head_fit = self.fit_heads(self.strategy.head_stats)
            head_fit.update(accuracy_global_before_head_fit=ev["accuracy"],
                            accuracy_per_task_before_head_fit={t: e["accuracy"] for t, e in per_task.items()})
            per_task, ev = self.evaluate_global()
        rec = {**self.round_record(rnd, per_task, ev), **head_fit, **({"bytes_up_head_stats": stats_bytes} if stats_bytes else {})}
        self.record(rec)
        if rnd % self.cfg.federation.checkpoint_every == 0 or rnd == self.cfg.federation.rounds:
            self.save_checkpoint(arrays, self.strategy, rnd)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(acc=f"{100 * ev['accuracy']:.1f}%", up=f"{rec['bytes_up'] / 2**20:.1f}MiB")
        return MetricRecord({"accuracy": ev["accuracy"]})

    def record(self, rec: dict[str, Any]) -> None:
        """Keep a round's record and append it to metrics.jsonl."""
        self.rounds.append(rec)
        append_jsonl(self.out / "metrics.jsonl", rec)

    def round_record(self, rnd: int, per_task: dict[str, dict[str, float]], ev: dict[str, float]) -> dict[str, Any]:
        """What metrics.jsonl keeps of a round: the global evaluation, each client's train reply
        and evaluation, bytes both ways (and full FedAvg's), rejections, importance, memory."""
        s = self.strategy
        clients = [self.client_record(c) for c in s.last_client_metrics]
        evals = [{"node_id": e["node_id"], "new": e["node_id"] in s.exclude_nodes, **{k.replace("-", "_"): v for k, v in e["metrics"].to_dict().items()}} for e in s.last_eval_metrics]
        accepted = [c for c in clients if c["accepted"]]
        proc_rss, total_rss = rss_bytes()
        return {
            "round": rnd,
            "accuracy_global": ev["accuracy"],
            "loss_global": ev["loss"],
            "accuracy_per_task": {t: e["accuracy"] for t, e in per_task.items()},
            "accuracy_personalized": _weighted_mean(evals, "accuracy_personal"),
            "accuracy_global_on_client_tests": _weighted_mean(evals, "accuracy_global"),
            "bytes_up": int(s.bytes_up_round),  # as the server received them, not as clients report
            "bytes_up_rejected": int(s.bytes_up_rejected_round),  # what rejected replies carried (not in bytes_up)
            "bytes_down": int(s.bytes_down_round),
            "bytes_up_full_fedavg": int(self.full_bytes * len(accepted)),
            "bytes_down_full_fedavg": int(self.full_bytes * s.messages_round),
            "bytes_down_full_fedavg_same_start": int(self.full_bytes * (s.messages_round - s.start_messages_round)),
            "sampled": int(s.sampled_round),
            "accepted": len(accepted),
            "rejected": [{"node_id": n, "reason": r} for n, r in s.last_rejections],
            "eval_rejected": [{"node_id": n, "reason": r} for n, r in s.last_eval_rejections],
            "clients": clients,
            "client_evaluations": evals,
            "global_importance": s.global_importance,
            **({"dp_epsilon": dp_epsilon(self.cfg, rnd + self._repeated(), head_stats=self._stats_released(rnd))} if self.cfg.federation.dp_noise_multiplier else {}),
            **({"update_norms": [{"node_id": n, "norm": round(v, 6)} for n, v in s.last_update_norms]} if s.clip_update_norm is not None else {}),
            **({"nnm_neighbours": [{"node_id": n, "neighbours": nb} for n, nb in s.last_nnm_neighbours]} if s.nnm else {}),
            "rss_bytes": proc_rss,
            "rss_bytes_with_workers": total_rss,
            "elapsed_s": round(self.time_before + time.time() - self.started, 2),
        }

    def client_record(self, c: dict[str, Any]) -> dict[str, Any]:
        """One client's train reply as metrics.jsonl records it."""
        try:
            m = TrainMetrics.from_dict(c.get("metrics", {}))
        except (TypeError, ValueError):  # a rejected reply's malformed metrics (its reason says so)
            m = TrainMetrics()
        return {
            "node_id": c.get("node_id"), "accepted": c.get("accepted"), "reason": c.get("reason"),
            "partition_id": m.partition_id, "profile": self.cfg.profile_of(max(m.partition_id, 0)),
            "num_examples": m.num_examples, "loss": m.train_loss, "train_accuracy": m.train_accuracy,
            "steps": m.steps, "flops_per_step": m.flops_per_step, "survey_flops": m.survey_flops, "activation_bytes": m.activation_bytes,
            "memory_bytes": m.memory_bytes, "steps_over_memory_budget": m.steps_over_memory_budget,
            "trainable_params": m.trainable_params, "time_s": m.time_s, "bytes_sent": m.bytes_sent,
            "bytes_received": m.bytes_received, "block_updates": m.block_updates, "importance": m.importance,
            "tasks": [self.tasks[i] if 0 <= i < len(self.tasks) else f"unknown task id {i}" for i in m.task_ids],
            "experts": m.experts, "expert_dropped": m.expert_dropped,
        }

    def evaluate_global(self) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """The global model on the central test set: per task, and the mean over tasks."""
        per_task = {t: evaluate(self.model, self.split.test, t) for t in self.tasks}
        return per_task, {k: float(np.mean([e[k] for e in per_task.values()])) for k in ("accuracy", "loss")}

    def _stats_released(self, rnd: int) -> bool:
        """Whether this round's head fit released (noisy) feature statistics."""
        return self.cfg.federation.head_fit == "lda" and rnd == self.cfg.federation.rounds and bool(self.strategy.head_stats)

    def _private_lda_head(self, stats: dict[str, np.ndarray]):
        """The discriminant head of the summed statistics after the Gaussian mechanism
        (fedtune.heads.privatize_stats; its privacy is in dp_epsilon), the noisy covariance
        made positive definite."""
        f = self.cfg.federation
        noisy = privatize_stats(stats, f.dp_noise_multiplier, f.dp_stats_feature_clip, f.dp_stats_max_examples, self.dp_stats_rng)
        count, means, cov = class_moments(noisy)
        return discriminant(means, nearest_psd(cov), count / count.sum(), count > 0)

    def fit_heads(self, stats: dict[str, dict[str, np.ndarray]]) -> tuple[ArrayRecord, dict[str, Any]]:
        """Replace each task's global head by the discriminant head of the clients' summed
        feature statistics (fedtune.heads.lda_head); return the new global arrays."""
        fitted = []
        for task, parts in stats.items():
            if task not in self.tasks:
                log(30, "head statistics for unknown task %r ignored", task)
                continue
            head = self.model.heads[task]
            if parts["sum"].shape != (head.out_features, head.in_features):
                log(30, "head statistics for task %r have shape %s, the head is %s: ignored", task, parts["sum"].shape, tuple(head.weight.shape))
                continue
            try:
                weight, bias = self._private_lda_head(parts) if self.cfg.federation.dp_noise_multiplier else lda_head(parts)
            except (ValueError, np.linalg.LinAlgError) as err:
                log(30, "head fit for task %r failed (%s); its averaged head stays", task, err)
                continue
            set_head(head, weight, bias)
            fitted.append(task)
        return numpy_to_arrays(state_to_numpy(self.model)), {"head_fit": "lda", "head_fit_tasks": fitted, "head_fit_examples": {t: int(stats[t]["count"].sum()) for t in fitted}}

    def client_summary(self, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        """The personalized-FL protocol's numbers (protocol_numbers), from the final evaluation
        (else the last round's), for the training clients and apart for the new ones."""
        evals = self.final["client_evaluations"] if self.final else next((r["client_evaluations"] for r in reversed(rounds) if r.get("client_evaluations")), [])
        out: dict[str, Any] = {"clients_evaluated_in": "final evaluation" if self.final else "last round"}
        out.update(protocol_numbers([e for e in evals if not e.get("new")]))
        if self.cfg.federation.new_clients:
            out["new_clients"] = protocol_numbers([e for e in evals if e.get("new")])
        return out

    def finish(self) -> dict[str, Any]:
        rounds = [r for r in self.rounds if r["round"] > 0]
        last = self.rounds[-1] if self.rounds else {}
        per_client: dict[int, dict[str, Any]] = {}
        for r in rounds:
            for e in r.get("client_evaluations", []):
                per_client[int(e.get("partition_id", -1))] = {"accuracy_global": e.get("accuracy_global"), "accuracy_personalized": e.get("accuracy_personal"), "round": r["round"], "num_examples": e.get("num_examples")}
        for e in (self.final or {}).get("client_evaluations", []):  # the final evaluation is each client's latest (round: "final")
            if not e.get("new"):
                per_client[int(e.get("partition_id", -1))] = {"accuracy_global": e.get("accuracy_global"), "accuracy_personalized": e.get("accuracy_personal"), "round": "final", "num_examples": e.get("num_examples")}
        peak = max([r.get("rss_bytes_with_workers", 0) for r in self.rounds] + [rss_bytes()[1]])
        times = [r["elapsed_s"] for r in rounds if "elapsed_s" in r]
        summary = {
            "name": self.cfg.name,
            **run_identity(self.cfg),  # seed, partition, data: what makes two runs comparable
            "method": self.cfg.method.name + ("+lora" if self.cfg.method.lora.enabled else ""),
            "send": self.cfg.federation.send,
            "rounds": len(rounds),
            "clients_per_round": self.cfg.federation.clients_per_round or self.cfg.federation.num_clients,
            "profiles": self.cfg.federation.profiles,
            "task": self.task,
            "test_size": len(self.split.test),
            "accuracy_global": last.get("accuracy_global"),
            "accuracy_per_task": last.get("accuracy_per_task"),
            "tasks": self.tasks,
            "accuracy_per_client": {str(k): v for k, v in sorted(per_client.items())},
            "accuracy_global_per_round": [r["accuracy_global"] for r in self.rounds],
            "bytes_up_total": int(sum(r["bytes_up"] + r.get("bytes_up_head_stats", 0) for r in rounds)),
            "head_fit": self.cfg.federation.head_fit,
            "accuracy_global_before_head_fit": last.get("accuracy_global_before_head_fit"),
            "accuracy_per_task_before_head_fit": last.get("accuracy_per_task_before_head_fit"),
            "downlink": self.cfg.federation.downlink,
            "personalization": self.cfg.federation.personalization,
            "bytes_down_total": int(sum(r["bytes_down"] for r in rounds) + (self.final or {}).get("bytes_down", 0)),
            "bytes_up_full_fedavg": int(sum(r["bytes_up_full_fedavg"] for r in rounds)),
            "bytes_down_full_fedavg": int(sum(r.get("bytes_down_full_fedavg", 0) for r in rounds) + (self.final or {}).get("bytes_down_full_fedavg", 0)),
            # full FedAvg whose clients also build the starting model themselves (no first download), as this run's do
            "bytes_down_full_fedavg_same_start": int(sum(r.get("bytes_down_full_fedavg_same_start", r.get("bytes_down_full_fedavg", 0)) for r in rounds)
                                                     + (self.final or {}).get("bytes_down_full_fedavg_same_start", 0)),
            "bytes_up_per_round": [r["bytes_up"] for r in rounds],
            "bytes_down_per_round": [r["bytes_down"] for r in rounds],
            "model_bytes": self.full_bytes,
            # the largest reply one client sent in one round (accepted replies)
            "bytes_up_client_max": int(max((c.get("bytes_sent") or 0 for r in rounds for c in r.get("clients", []) if c.get("accepted")), default=0)),
            "rejected_replies": int(sum(len(r.get("rejected", [])) for r in rounds)),
            "bytes_up_rejected_total": int(sum(r.get("bytes_up_rejected", 0) for r in rounds)),
            # client rounds whose measured training memory passed their device profile's budget on some step
            "client_rounds_over_memory_budget": int(sum(1 for r in rounds for c in r.get("clients", []) if c.get("accepted") and (c.get("steps_over_memory_budget") or 0) > 0)),
            "wall_time_s": round(self.time_before + time.time() - self.started, 1),  # over every process of a resumed run
            "peak_rss_bytes": int(peak),
            "rss_bytes_per_round": [r.get("rss_bytes_with_workers") for r in rounds],
            # seconds each round took (the first, and the first after a resume, include the start: data, model, workers)
            "round_time_s": [round(t - p if t >= p else t, 2) for p, t in zip([0.0, *times][: len(times)], times, strict=True)],
            "checkpoint": str(self._checkpoint_path()),
        }
        summary.update(self.client_summary(rounds))
        trained = [c for r in rounds for c in r.get("clients", []) if c.get("accepted")]
        routed = sum(int(sum(flat)) for c in trained for flat in (c.get("experts") or {}).values())
        if routed:  # MoE: how much of the training's routing the experts' capacity turned away
            dropped = sum(int(c.get("expert_dropped") or 0) for c in trained)
            summary["moe_training_assignments"] = routed
            summary["moe_training_dropped"] = dropped
            summary["moe_training_dropped_fraction"] = dropped / routed
        if self.cfg.federation.dp_noise_multiplier:
            released = any(r.get("head_fit") for r in rounds)
            summary["dp"] = {"noise_multiplier": self.cfg.federation.dp_noise_multiplier, "clip_update_norm": self.cfg.federation.clip_update_norm,
                             "delta": self.cfg.federation.dp_delta,
                             "epsilon": dp_epsilon(self.cfg, (len(rounds) and rounds[-1]["round"]) + self._repeated(), head_stats=released),
                             "rounds_repeated_after_resume": self._repeated(),
                             "head_stats_privatized": released,
                             "dp_stats_feature_clip": self.cfg.federation.dp_stats_feature_clip, "dp_stats_max_examples": self.cfg.federation.dp_stats_max_examples,
                             "epsilon_per_round": [r.get("dp_epsilon") for r in rounds], "accountant": "dp_accounting RDP, Poisson-sampled Gaussian"}
        # a round whose DP Poisson sample drew nobody is the mechanism at work, not a failure
        poisson = bool(self.cfg.federation.dp_noise_multiplier) and (self.cfg.federation.clients_per_round or self.cfg.federation.num_clients) < self.cfg.federation.num_clients
        summary["empty_rounds"] = [r["round"] for r in rounds if r.get("accepted", 0) == 0 and not (poisson and r.get("sampled") == 0)]
        if summary["empty_rounds"] and not self.cfg.federation.allow_empty_rounds:
            reasons = sorted({x["reason"] for r in rounds if r["round"] in summary["empty_rounds"] for x in r.get("rejected", [])})
            summary["error"] = (f"round(s) {summary['empty_rounds']} had no accepted client reply, so the model did not train there"
                                + (f"; rejections: {'; '.join(reasons[:3])}" if reasons else "; no client replied")
                                + " (set federation.allow_empty_rounds: true to accept such runs)")
        summary["bytes_up_client_max_vs_model"] = summary["bytes_up_client_max"] / self.full_bytes if self.full_bytes else None
        summary["bytes_up_ratio_vs_full_fedavg"] = summary["bytes_up_total"] / summary["bytes_up_full_fedavg"] if summary["bytes_up_full_fedavg"] else None
        full_total = summary["bytes_up_full_fedavg"] + summary["bytes_down_full_fedavg"]
        summary["traffic_ratio_vs_full_fedavg"] = (summary["bytes_up_total"] + summary["bytes_down_total"]) / full_total if full_total else None
        same_start = summary["bytes_up_full_fedavg"] + summary["bytes_down_full_fedavg_same_start"]
        summary["traffic_ratio_vs_full_fedavg_same_start"] = (summary["bytes_up_total"] + summary["bytes_down_total"]) / same_start if same_start else None
        # summary.json last: it marks the run complete (deploy local stops the server when it appears)
        try:
            plot_run(self.rounds, self.out / "plots", self.model.depth, getattr(self.model, "moe_blocks", None))
        except Exception as err:  # a plot that fails loses no result
            log(30, "plots of %s not written: %s: %s", self.out, type(err).__name__, err)
        write_json(self.out / "summary.json", summary)
        return summary


def dp_epsilon(cfg: RunConfig, rounds: int, head_stats: bool = False) -> float:
    """The privacy spent after `rounds` rounds (epsilon at federation.dp_delta), by Google's
    dp_accounting RDP accountant: each round a Gaussian mechanism of the configured noise
    multiplier on a Poisson sample of rate clients_per_round / num_clients (the server samples
    so under DP, with a fixed denominator); with `head_stats`, also the head fit's release of
    the statistics: three Gaussian mechanisms (counts, sums, second moment) per task a client
    holds (the most any client holds), all on the one sample of clients that evaluated."""
    import dp_accounting
    from dp_accounting import rdp

    f = cfg.federation
    if rounds <= 0:
        return 0.0
    q = (f.clients_per_round or f.num_clients) / f.num_clients
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(f.dp_noise_multiplier)), rounds))
    if head_stats:
        q_eval = min(f.eval_clients_per_round or f.clients_per_round or f.num_clients, f.num_clients) / f.num_clients  # the sample the run evaluates
        from fedtune.federated import client_tasks

        per_client = max(len(client_tasks(cfg, pid)) for pid in range(f.num_clients))
        # the 3 * per_client releases share one sample (the evaluation that feeds the head fit):
        # together one sampled Gaussian, of multiplier z / sqrt(3 * per_client)
        joint = f.dp_noise_multiplier / math.sqrt(3 * per_client)
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q_eval, dp_accounting.GaussianDpEvent(joint)))
    return float(accountant.get_epsilon(f.dp_delta))


def resume_conflicts(path: Path, raw_meta: dict[str, str], cfg: RunConfig) -> None:
    """Refuse to resume the checkpoint at `path` with a config that changes what its rounds
    compute, naming the keys that differ (RESUME_MAY_CHANGE may)."""
    meta = checkpoint_meta(raw_meta)
    started = meta.get("run", {})
    try:  # keys added to the config since the run started take their defaults, as the run had them
        started = to_dict(from_dict(RunConfig, started))
    except (ConfigError, TypeError, ValueError, KeyError):
        pass  # a config this version cannot read: compare it as written
    changed = [k for k in differences(started, to_dict(cfg)) if not k.startswith(RESUME_MAY_CHANGE)]
    if changed:
        raise CheckpointError(f"{path}: was written by a run whose config differs in {', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}; "
                              f"resume with the config it started with (config.json beside it); only {', '.join(RESUME_MAY_CHANGE)} may change")


def wait_for_nodes(grid: Grid, needed: int, timeout_s: float, poll_s: float = 1.0) -> int:
    """Wait until `needed` nodes are connected; fail clearly after `timeout_s`.

    Flower's strategies wait for their minimum of nodes without end, so a run started
    with fewer SuperNodes than `federation.num_clients` would hang.
    """
    deadline = time.monotonic() + timeout_s
    logged = -1
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= needed:
            return connected
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"the run needs {needed} nodes (federation.num_clients plus federation.new_clients) but only {connected} "
                f"connected within federation.connect_timeout_s={timeout_s:g} s: start {needed} SuperNodes (under `flwr run`, "
                f"options.num-supernodes={needed} in the connection's config) or lower federation.num_clients / new_clients "
                f"to {connected} nodes in all"
            )
        if connected != logged:
            log(20, "waiting for nodes: %d of %d connected", connected, needed)
            logged = connected
        time.sleep(poll_s)
