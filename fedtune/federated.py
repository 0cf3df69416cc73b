"""Federated runs without Flower: the run config and what one client does in a round.

`RunConfig` is the YAML of a simulation or deployment. `ClientRuntime` is a
client's side of a round in plain torch: load the global parameters, plan for
its device profile, train on its partition, and return exactly the
parameters it updated (minus personal ones) with its measured metrics. The
Flower apps in clients/ and server/ only turn Messages into these calls.

Personalization follows FedRoD: besides the global head (aggregated), every
client trains a personal head of its own on the same features (detached), kept
in the client's state and never sent. Parameters named in
`federation.personal` also stay on the client.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe.layer import MoEConfig

from . import protocol
from .client_state import PERSONAL_HEAD, ClientState, personal_head, personal_params
from .data import DataConfig, DataSplit, ImageSet, load_data, partition_indices
from .engine import full_plan
from .errors import ConfigError
from .heads import class_stats, extract_features
from .methods import MethodConfig, make_method, prepare_model
from .model import FedViT, ModelConfig, build_model
from .profiles import AUTO, PROFILES, get_profile
from .protocol import EvalMetrics, TrainMetrics
from .trainer import TrainConfig, Trainer
from .typedconfig import apply_overrides, check_choices, from_dict, read_yaml, to_dict
from .weights import resolve_pretrained


@dataclass
class PartitionConfig:
    scheme: Literal["iid", "dirichlet", "pathological"] = "dirichlet"  # iid | dirichlet | pathological
    alpha: float = 0.5  # Dirichlet concentration (lower: more skewed)
    classes_per_partition: int = 2  # pathological: classes per client
    class_assignment: Literal["deterministic", "random", "first-deterministic"] = "deterministic"  # pathological: how classes go to clients (flwr-datasets' modes)
    min_partition_size: int = 10  # Dirichlet: resample until every client has this many
    local_test_fraction: float = 0.2  # share of each client's data kept for its local test

    def validate(self, prefix: str = "") -> None:
        check_choices(self, prefix)
        if not 0.0 <= self.local_test_fraction < 1.0:
            raise ConfigError(f"{prefix}local_test_fraction: must be in [0, 1), got {self.local_test_fraction}")


@dataclass
class FederationConfig:
    num_clients: int = 8  # virtual clients (SuperNodes)
    clients_per_round: int | None = None  # sampled per round (None: all)
    eval_clients_per_round: int | None = None  # sampled for federated evaluation (None: as training)
    rounds: int = 5  # federated rounds
    send: Literal["updated", "all"] = "updated"  # updated: only what the client trained | all: full-model FedAvg
    weighting: protocol.Weighting = "examples"  # examples | updates
    personal: list[str] = field(default_factory=list)  # parameter-name prefixes that never leave a client
    personal_head: bool = True  # each client also trains its own head (never sent)
    feed_importance: bool = True  # server sends the federation's block importance to clients
    profiles: list[str] = field(default_factory=lambda: ["workstation"])  # device profiles, cycled over clients
    client_tasks: list[list[str]] | None = None  # multitask: each client's tasks, cycled over clients (None: all tasks)
    checkpoint_every: int = 1  # rounds between server checkpoints
    round_timeout_s: float = 3600.0  # how long the server waits for replies
    connect_timeout_s: float = 120.0  # how long the server waits for num_clients nodes before failing
    head_fit: Literal["none", "lda"] = "none"  # none | lda: after the last round, fit each task's global head from the clients' feature statistics

    def validate(self, prefix: str = "") -> None:
        if self.num_clients < 1:
            raise ConfigError(f"{prefix}num_clients: must be >= 1, got {self.num_clients}")
        if self.clients_per_round is not None and not 1 <= self.clients_per_round <= self.num_clients:
            raise ConfigError(f"{prefix}clients_per_round: must be in 1..num_clients ({self.num_clients}), got {self.clients_per_round}")
        if self.rounds < 1:
            raise ConfigError(f"{prefix}rounds: must be >= 1, got {self.rounds}")
        check_choices(self, prefix)
        if not self.connect_timeout_s >= 0:
            raise ConfigError(f"{prefix}connect_timeout_s: must be >= 0, got {self.connect_timeout_s}")
        for p in self.profiles:
            if p not in PROFILES and p != AUTO:
                raise ConfigError(f"{prefix}profiles: unknown device profile {p!r}; known: {', '.join(PROFILES)}, {AUTO}")
        if not self.profiles:
            raise ConfigError(f"{prefix}profiles: give at least one device profile")




@dataclass
class BackendConfig:
    cpus_per_client: float = 1.0  # Ray resources per virtual client
    torch_threads: int = 1  # torch threads inside each client


@dataclass
class RunConfig:
    name: str = "run"  # a label for the run
    seed: int = 0  # seed for partitioning, initialisation and shuffling
    task: str | None = None  # the task to learn (None: the data set's first); see also tasks
    tasks: list[str] | None = None  # multitask runs: the tasks the model has a head (and routers) for
    model: ModelConfig = field(default_factory=lambda: ModelConfig(pretrained="default"))
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, batch_size=32))
    federation: FederationConfig = field(default_factory=FederationConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    moe: MoEConfig | None = None  # an MoE ViT (see moe.MoEConfig); None: a dense ViT

    def validate(self, prefix: str = "") -> None:
        if self.task is not None and self.tasks is not None:
            raise ConfigError(f"{prefix}task/tasks: give one of them (task for one task, tasks for several)")
        if self.tasks is not None and not self.tasks:
            raise ConfigError(f"{prefix}tasks: give at least one task")
        for group in self.federation.client_tasks or []:
            for t in group:
                if t not in self.run_tasks():
                    raise ConfigError(f"{prefix}federation.client_tasks: task {t!r} is not one of the run's tasks {self.run_tasks()}")
        groups = self.federation.client_tasks
        if groups:
            held = {t for pid in range(min(self.federation.num_clients, len(groups))) for t in groups[pid]}
            missing = [t for t in self.run_tasks() if t not in held]
            if missing:
                raise ConfigError(
                    f"{prefix}federation.client_tasks: no client holds task {missing[0]!r} (with {self.federation.num_clients} "
                    f"clients the groups in use are {groups[: self.federation.num_clients]}), so its head and routers would never train"
                )

    def run_tasks(self) -> list[str]:
        """The model's tasks: `tasks`, or [`task`] ([] when the data set's first task is meant)."""
        return list(self.tasks) if self.tasks is not None else ([self.task] if self.task else [])

    def tasks_of(self, partition_id: int) -> list[str]:
        """The tasks client `partition_id` trains on (federation.client_tasks, cycled; default all)."""
        groups = self.federation.client_tasks
        if groups:
            return list(groups[partition_id % len(groups)])
        return self.run_tasks() or [federated_data(self)[0].train.tasks[0]]

    def key(self) -> str:
        return hashlib.sha256(json.dumps(to_dict(self), sort_keys=True).encode()).hexdigest()[:12]

    def profile_of(self, partition_id: int) -> str:
        return self.federation.profiles[partition_id % len(self.federation.profiles)]


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data = read_yaml(path) if path else {}
    cfg = from_dict(RunConfig, apply_overrides(data, overrides or []))
    return cfg


# --------------------------------------------------------------------------- data per client

_DATA_CACHE: dict[str, tuple[DataSplit, list[np.ndarray]]] = {}


def federated_data(cfg: RunConfig) -> tuple[DataSplit, list[np.ndarray]]:
    """The data split and each client's train indices (cached per process)."""
    key = json.dumps([to_dict(cfg.data), to_dict(cfg.partition), cfg.federation.num_clients, cfg.seed, cfg.run_tasks()], sort_keys=True)
    if key not in _DATA_CACHE:
        split = load_data(cfg.data)
        for task in cfg.run_tasks():
            if task not in split.train.tasks:
                raise ConfigError(f"task: {task!r} is not in the data set {cfg.data.name}; it has {', '.join(split.train.tasks)}")
        task = (cfg.run_tasks() or split.train.tasks)[0]
        p = cfg.partition
        parts = partition_indices(
            split.train.labels[task].numpy(), cfg.federation.num_clients, p.scheme, alpha=p.alpha,
            classes_per_partition=p.classes_per_partition, seed=cfg.seed, min_partition_size=p.min_partition_size,
            class_assignment=p.class_assignment,
        )
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = (split, parts)
    return _DATA_CACHE[key]


def client_data(cfg: RunConfig, partition_id: int) -> tuple[ImageSet, ImageSet]:
    """A client's local train and test sets (its partition, split by local_test_fraction)."""
    split, parts = federated_data(cfg)
    if not 0 <= partition_id < len(parts):
        raise ConfigError(f"partition-id {partition_id} out of range: the run has {len(parts)} clients")
    idx = parts[partition_id]
    rng = np.random.default_rng(cfg.seed * 1_000_003 + partition_id)
    idx = rng.permutation(idx)
    n_test = int(round(len(idx) * cfg.partition.local_test_fraction))
    n_test = min(n_test, max(len(idx) - 1, 0))
    return split.train.subset(idx[n_test:]), split.train.subset(idx[:n_test])


# --------------------------------------------------------------------------- models


def global_model(cfg: RunConfig) -> FedViT:
    """The model every participant starts from: pretrained backbone, method's extras, seeded heads."""
    split, _ = federated_data(cfg)
    tasks = cfg.run_tasks() or [split.train.tasks[0]]
    torch.manual_seed(cfg.seed)
    model = build_model(resolve_pretrained(cfg.model), {t: split.train.num_classes[t] for t in tasks})
    if cfg.moe is not None:
        from moe import build_moe_vit

        model = build_moe_vit(None, cfg.moe, {t: split.train.num_classes[t] for t in tasks}, dense=model)
    prepare_model(model, cfg.method)
    return model


_MODEL_CACHE: dict[str, FedViT] = {}


def shared_model(cfg: RunConfig) -> FedViT:
    """One model per process, reused by every client this process plays (all its
    parameters are overwritten from the global ones and the client's state each round)."""
    key = cfg.key()
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = global_model(cfg)
    return _MODEL_CACHE[key]


def state_to_numpy(model: nn.Module, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Copies of the model's tensors (not views: the process's model trains on for other clients)."""
    state = model.state_dict()
    names = list(state) if names is None else names
    return {n: state[n].detach().cpu().numpy().copy() for n in names}


def load_numpy_state(model: nn.Module, arrays: dict[str, np.ndarray], where: str = "global parameters") -> None:
    """Copy arrays into the model's parameters/buffers; unknown names or wrong shapes are errors."""
    state = model.state_dict()
    for name, value in arrays.items():
        if name not in state:
            raise ConfigError(f"{where}: unknown parameter {name!r} (does the config match the model?)")
        if tuple(value.shape) != tuple(state[name].shape):
            raise ConfigError(f"{where}: {name} has shape {tuple(value.shape)}, the model expects {tuple(state[name].shape)}")
    with torch.no_grad():
        for name, value in arrays.items():
            state[name].copy_(torch.as_tensor(np.asarray(value)))


def is_personal(name: str, prefixes: list[str]) -> bool:
    return any(name.startswith(p) for p in prefixes)


# --------------------------------------------------------------------------- a client's round


class PersonalHeadTrainer(Trainer):
    """Trainer that also fits the client's personal head on the detached features (FedRoD)."""

    def __init__(self, *args, personal_head: nn.Linear | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.personal_head = personal_head
        if personal_head is not None:
            self.optimizer.add_param_group({"params": list(personal_head.parameters()), "lr": self.head_lr})
            self._base_lrs.append(self.head_lr)

    def heads_to_fit(self) -> list[nn.Linear]:
        return super().heads_to_fit() + ([self.personal_head] if self.personal_head is not None else [])

    def extra_loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        if self.personal_head is None:
            return None
        return F.cross_entropy(self.personal_head(feats.detach()), labels)


class ClientRuntime:
    """One client's model and data; `fit` and `evaluate` a round at a time, over the client's tasks."""

    def __init__(self, cfg: RunConfig, partition_id: int, profile: str | None = None):
        self.cfg = cfg
        self.partition_id = partition_id
        self.profile = get_profile(profile or cfg.profile_of(partition_id))
        self.train_set, self.test_set = client_data(cfg, partition_id)
        if len(self.train_set) == 0:
            raise ConfigError(f"client {partition_id} has no training data")
        self.model = shared_model(cfg)
        self.tasks = cfg.tasks_of(partition_id)
        for task in self.tasks:
            self.model.check_task(task)
        dim = self.model.vit.embed_dim
        self.personal_heads = {t: nn.Linear(dim, self.model.heads[t].out_features) for t in self.tasks} if cfg.federation.personal_head else {}

    def _load(self, global_arrays: dict[str, np.ndarray], state: ClientState) -> None:
        load_numpy_state(self.model, global_arrays)
        personal = personal_params(state.personal)
        if personal:
            load_numpy_state(self.model, personal, "client state")
        for task, head in self.personal_heads.items():
            # start the personal head from the global one
            head.load_state_dict(personal_head(state.personal, task) or self.model.heads[task].state_dict())

    def fit(self, global_arrays: dict[str, np.ndarray], state: ClientState, importance: list[float] | None = None, server_round: int = 0) -> tuple[dict[str, np.ndarray], dict[str, int], TrainMetrics, ClientState]:
        """Train one round on each of the client's tasks; return (update, update counts, metrics, new state)."""
        start = time.perf_counter()
        self._load(global_arrays, state)
        cfg = self.cfg
        seed = cfg.seed * 7919 + self.partition_id * 31 + server_round
        kept = state.method
        counts_all: Counter = Counter()
        block_updates = [0] * self.model.depth
        steps: list = []
        expert_counts: dict[str, dict[int, list[int]]] = {}
        examples, loss_sum, correct = 0, 0.0, 0.0
        for i, task in enumerate(self.tasks):
            method = make_method(cfg.method, self.model, self.profile, cfg.train.batch_size, task, seed=seed + i)
            method.load_state_dict(kept)
            if importance is not None:
                method.set_importance(importance)
            torch.manual_seed(seed + i)
            tcfg = replace(cfg.train, seed=seed + i)
            trainer = PersonalHeadTrainer(self.model, method, tcfg, task, personal_head=self.personal_heads.get(task))
            result = trainer.train(self.train_set)
            counts_all.update(result.update_counts)
            block_updates = [a + b for a, b in zip(block_updates, result.block_updates, strict=True)]
            steps += result.steps
            if result.expert_counts:
                expert_counts[task] = result.expert_counts
            examples += result.num_examples
            loss_sum += result.loss * result.num_examples
            correct += result.accuracy * result.num_examples
            kept = method.state_dict() or kept
        personal = cfg.federation.personal
        if cfg.federation.send == "all":
            names = [n for n in self.model.state_dict() if not is_personal(n, personal)]
        else:
            names = [n for n in counts_all if not is_personal(n, personal)]
        update = state_to_numpy(self.model, names)
        counts = {n: int(counts_all.get(n, 0)) for n in names}
        heads = {f"{PERSONAL_HEAD}{t}.{k}": v.detach().numpy().copy() for t, h in self.personal_heads.items() for k, v in h.state_dict().items()}
        new_state = ClientState(personal={**state_to_numpy(self.model, [n for n in self.model.state_dict() if is_personal(n, personal)]), **heads}, method=kept)
        flops = [s.train_flops for s in steps if s.train_flops is not None]
        metrics = TrainMetrics(
            num_examples=examples,
            partition_id=self.partition_id,
            task_ids=[self.model.tasks.index(t) for t in self.tasks],
            train_loss=loss_sum / max(examples, 1),
            train_accuracy=correct / max(examples, 1),
            steps=len(steps),
            flops_per_step=float(np.mean(flops)) if flops else 0.0,
            activation_bytes=int(max((s.activation_bytes for s in steps), default=0)),
            trainable_params=int(max((s.trainable_params for s in steps), default=0)),
            step_time_s=float(np.median([s.step_time_s for s in steps])) if steps else 0.0,
            time_s=time.perf_counter() - start,
            bytes_sent=int(sum(v.nbytes for v in update.values())),
            bytes_received=int(sum(v.nbytes for v in global_arrays.values())),
            block_updates=block_updates,
            importance=None if kept.get("importance") is None else [float(v) for v in kept["importance"]],
            # per task: tokens per expert, [MoE blocks x experts] flattened, blocks in order
            experts={task: [c for b in sorted(per_block) for c in per_block[b]] for task, per_block in expert_counts.items()},
        )
        return update, counts, metrics, new_state

    @torch.no_grad()
    def head_stats(self, global_arrays: dict[str, np.ndarray], state: ClientState) -> dict[str, np.ndarray]:
        """Per task, the class statistics of the global model's features (every block, every
        token) on this client's training data: what the server's discriminant head fit sums."""
        self._load(global_arrays, state)
        out = {}
        for task in self.tasks:
            feats, labels = extract_features(self.model, self.train_set, task)
            for part, value in class_stats(feats, labels, self.model.heads[task].out_features).items():
                out[f"{task}.{part}"] = value
        return out

    @torch.no_grad()
    def evaluate(self, global_arrays: dict[str, np.ndarray], state: ClientState) -> EvalMetrics:
        """Accuracy of the global model and of the personalized one on the client's local test set, per task."""
        self._load(global_arrays, state)
        data = self.test_set if len(self.test_set) else self.train_set
        out = EvalMetrics(num_examples=len(data) * len(self.tasks), partition_id=self.partition_id)
        self.model.eval()
        plan = full_plan(self.model.depth)
        for task in self.tasks:
            feats, labels = extract_features(self.model, data, task, 256, plan)
            logits = self.model.forward_head(feats, task)
            head = self.personal_heads.get(task)
            out.per_task_global[task] = int((logits.argmax(-1) == labels).sum()) / max(len(data), 1)
            out.per_task_personal[task] = int(((head(feats) if head is not None else logits).argmax(-1) == labels).sum()) / max(len(data), 1)
        out.accuracy_global = sum(out.per_task_global.values()) / len(self.tasks)
        out.accuracy_personal = sum(out.per_task_personal.values()) / len(self.tasks)
        return out


# --------------------------------------------------------------------------- reference


def head_fit_reference(cfg: RunConfig) -> dict[str, Any]:
    """What the run's starting model scores with no training: each task's head fitted (LDA)
    from the summed feature statistics of that task's clients, exactly as `federation.head_fit:
    lda` fits it after the last round, then evaluated on the central test set.

    A run with the head fit that ends near this number learnt its accuracy from the head fit,
    not from fine-tuning. One process plays every client (a simulation-side tool); every
    task has a client (RunConfig.validate checks federation.client_tasks).
    """
    from .heads import evaluate, lda_head, set_head

    model = global_model(cfg)
    arrays = state_to_numpy(model)
    totals: dict[str, dict[str, np.ndarray]] = {}
    for pid in range(cfg.federation.num_clients):
        for key, value in ClientRuntime(cfg, pid).head_stats(arrays, ClientState()).items():
            task, _, part = key.rpartition(".")
            parts = totals.setdefault(task, {})
            parts[part] = parts[part] + value if part in parts else value.copy()
    split, _ = federated_data(cfg)
    per_task, examples = {}, {}
    for task in model.tasks:
        set_head(model.heads[task], *lda_head(totals[task]))
        per_task[task] = evaluate(model, split.test, task)["accuracy"]
        examples[task] = int(totals[task]["count"].sum())
    return {
        "name": cfg.name,
        "accuracy_per_task": per_task,
        "accuracy_global": float(np.mean(list(per_task.values()))),
        "head_fit_examples": examples,
        "test_size": len(split.test),
    }
