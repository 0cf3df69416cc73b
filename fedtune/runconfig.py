"""The run config: the YAML of a federated simulation or deployment, typed and checked."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from moe.layer import MoEConfig

from . import protocol
from .data import DataConfig
from .errors import ConfigError
from .heads import ABSENT_CLASS_BIAS
from .methods import MethodConfig
from .model import ModelConfig, check_takes_images
from .profiles import AUTO, PROFILES
from .trainer import TrainConfig
from .typedconfig import apply_overrides, check_choices, from_dict, read_yaml, to_dict


@dataclass
class PartitionConfig:
    scheme: Literal["iid", "dirichlet", "pathological"] = "dirichlet"  # iid | dirichlet | pathological
    alpha: float = 0.5  # Dirichlet concentration (lower: more skewed)
    classes_per_partition: int = 2  # pathological: classes per client
    class_assignment: Literal["deterministic", "random", "first-deterministic"] = "deterministic"  # pathological: how classes go to clients (flwr-datasets' modes)
    min_partition_size: int = 10  # Dirichlet: resample until every client has this many
    self_balancing: bool = False  # Dirichlet: a client already over the average share gets none of the later classes (PFLlib's and NIID-Bench's generators; fewer classes per client)
    local_test_fraction: float = 0.2  # share of each client's data kept for its local test
    pool: bool = False  # partition the data set's train and test images together (the personalized-FL protocol); the central test set is then the union of the clients' local test splits

    def validate(self, prefix: str = "") -> None:
        check_choices(self, prefix)
        if not 0.0 < self.local_test_fraction < 1.0:  # 0 would leave clients nothing to test the personalized models on
            raise ConfigError(f"{prefix}local_test_fraction: must be in (0, 1), got {self.local_test_fraction}")
        if not self.alpha > 0:
            raise ConfigError(f"{prefix}alpha: the Dirichlet concentration must be > 0, got {self.alpha}")
        if self.classes_per_partition < 1:
            raise ConfigError(f"{prefix}classes_per_partition: must be >= 1, got {self.classes_per_partition}")
        if self.min_partition_size < 0:
            raise ConfigError(f"{prefix}min_partition_size: must be >= 0, got {self.min_partition_size}")
        if self.self_balancing and self.scheme != "dirichlet":
            raise ConfigError(f"{prefix}self_balancing: applies to the dirichlet scheme only, not {self.scheme!r}")


MAX_ROUNDS = 100_000  # more is a typo, not a run


@dataclass
class AttackConfig:
    """Simulated attackers, so robustness can be measured (simulation only)."""

    kind: Literal["none", "sign_flip", "noise", "label_flip"] = "none"  # sign_flip: the update negated and scaled | noise: Gaussian noise as the update | label_flip: trains on labels C-1-y
    clients: list[int] = field(default_factory=list)  # partition ids of the attacking clients
    scale: float = 10.0  # sign_flip: the update is -scale times the trained one
    noise_std: float = 1.0  # noise: standard deviation of the noise sent in place of the update

    def validate(self, prefix: str = "") -> None:
        check_choices(self, prefix)
        if self.kind != "none" and not self.clients:
            raise ConfigError(f"{prefix}clients: name the attacking clients' partition ids for attack {self.kind!r}")
        if not self.scale > 0 or not self.noise_std > 0:
            raise ConfigError(f"{prefix}scale and noise_std: must be positive, got {self.scale} and {self.noise_std}")


@dataclass
class FederationConfig:
    num_clients: int = 8  # virtual clients (SuperNodes) that train
    new_clients: int = 0  # clients that join after the federation: they never train and only personalize the final model in the final evaluation (their partitions come after the training clients')
    clients_per_round: int | None = None  # sampled per round (None: all)
    min_clients: int | None = None  # connected clients a round needs to start (None: num_clients); lower it so a deployment goes on when devices drop out
    eval_clients_per_round: int | None = None  # sampled for federated evaluation (None: as training)
    evaluate_every: int = 1  # federated evaluation every N rounds, and always in the last (the final evaluation comes after it)
    rounds: int = 5  # federated rounds
    send: Literal["updated", "all"] = "updated"  # updated: only what the client trained | all: full-model FedAvg
    weighting: protocol.Weighting = "examples"  # examples | updates
    aggregation: Literal["mean", "median", "trimmed_mean", "mean_around_median"] = "mean"  # how each parameter is combined over the clients that sent it
    trim_fraction: float = 0.2  # trimmed_mean: share of the largest and of the smallest values dropped per coordinate | mean_around_median: share of the values farthest from the median dropped | nnm: the share of clients assumed attackers
    robust_absent: Literal["skip", "unchanged"] = "skip"  # median/trimmed_mean/mean_around_median: skip: over a parameter's senders only | unchanged: a client that replied without it counts as a vote for no change
    nnm: bool = False  # nearest-neighbour mixing before median/trimmed_mean/mean_around_median (Allouah et al. 2023): each client's update replaced by the mean of the n - f nearest (f = floor(trim_fraction * n); robust_absent skip: per parameter over the neighbours that sent it | unchanged: a neighbour that did not counts as no change)
    clip_update_norm: float | None = None  # norm bounding: each client's update (over what it sent) scaled down to this L2 norm
    attack: AttackConfig = field(default_factory=AttackConfig)  # simulated attackers
    dp_noise_multiplier: float | None = None  # client-level DP: Gaussian noise of this multiple of clip_update_norm (per sampled client) on the aggregate; needs clip_update_norm
    dp_delta: float = 1e-5  # the delta at which the privacy spent (epsilon) is reported
    dp_stats_feature_clip: float | None = None  # DP with head_fit: lda: each feature vector in a client's statistics scaled down to this L2 norm (needed then)
    dp_stats_max_examples: int = 256  # DP with head_fit: lda: at most this many of a client's training examples (a seeded sample) enter its statistics
    personal: list[str] = field(default_factory=list)  # parameter-name prefixes that never leave a client
    personalization: Literal["local_head", "fedrod", "fedper", "fedrep", "fedbabu", "ditto", "lda", "finetune", "local", "none"] = "local_head"  # how each client's personalized model is made (see fedtune.client)
    balanced_loss: bool = False  # the shared model trains with balanced softmax (the client's log class priors added to the logits in its loss, as FedRoD trains its generic model), so label-skewed clients pull the global head the same way
    lda_shrink: float = 1.0  # lda: pseudo-examples of the federation's class mean added to each of the client's class means
    finetune_epochs: int = 1  # finetune, fedbabu: local epochs on the global model in the final evaluation
    rep_head_epochs: int = 1  # fedrep: epochs of the head alone before the body's each round
    ditto_lambda: float = 0.1  # ditto: strength of the pull of each client's own model towards the global model it received (the loss adds lambda/2 * ||v - w||^2)
    ditto_epochs: int = 1  # ditto: local epochs of the client's own model each round, besides the global model's
    downlink: Literal["sparse", "full"] = "sparse"  # sparse: clients keep the global model and get only what changed | full: the whole model in every instruction
    independent_tasks: bool = False  # one federation per task (each its own model, over the clients holding that task), run one after another; summary.json combines them
    final_evaluation: bool = True  # after the last round, every client evaluates the final global model (after the head fit) and its personalized one
    feed_importance: bool = True  # server sends the federation's block importance to clients
    profiles: list[str] = field(default_factory=lambda: ["workstation"])  # device profiles, cycled over clients
    client_tasks: list[list[str]] | None = None  # multitask: each client's tasks, cycled over clients (None: all tasks)
    checkpoint_every: int = 1  # rounds between server checkpoints
    allow_empty_rounds: bool = False  # a round in which no client reply is accepted fails the run (summary.json "error", non-zero exit) unless true
    round_timeout_s: float = 3600.0  # how long the server waits for replies
    connect_timeout_s: float = 120.0  # how long the server waits for num_clients nodes before failing
    head_fit: Literal["none", "lda"] = "none"  # none | lda: after the last round, fit each task's global head from the clients' feature statistics

    def validate(self, prefix: str = "") -> None:
        if self.num_clients < 1:
            raise ConfigError(f"{prefix}num_clients: must be >= 1, got {self.num_clients}")
        if self.new_clients < 0:
            raise ConfigError(f"{prefix}new_clients: must be >= 0, got {self.new_clients}")
        if self.new_clients and not self.final_evaluation:
            raise ConfigError(f"{prefix}new_clients: new clients are evaluated in the final evaluation only; set final_evaluation: true")
        if self.personalization in ("finetune", "fedbabu") and not self.final_evaluation:
            raise ConfigError(f"{prefix}personalization: {self.personalization} fine-tunes the final global model in the final evaluation; set final_evaluation: true")
        if self.personalization == "fedbabu" and self.dp_noise_multiplier and self.send == "all":
            raise ConfigError(f"{prefix}personalization: fedbabu with dp_noise_multiplier and send: all: the server's noise would move the task head FedBABU holds fixed; use send: updated")
        if self.personal and self.personalization in ("lda", "finetune", "fedbabu"):
            raise ConfigError(f"{prefix}personal: personalization {self.personalization} builds each client's model from the global one (its features, or a fine-tuned "
                              f"copy) and would leave the client's own parameters {self.personal} out of it; use personal with fedrod, local_head, fedper, fedrep or none")
        if self.new_clients and self.personalization in ("fedrod", "local_head", "fedper", "fedrep", "ditto", "local"):
            raise ConfigError(f"{prefix}new_clients: a new client never trains, so it has no {self.personalization} personal model; use personalization lda, finetune, fedbabu or none")
        if self.balanced_loss and self.heads_personal():
            raise ConfigError(f"{prefix}balanced_loss: the task head is personal here (personalization {self.personalization}, personal {self.personal}) and fits the client's own labels; balanced_loss is for a shared head (fedrod, local_head, fedbabu, lda, finetune, none)")
        if self.clients_per_round is not None and not 1 <= self.clients_per_round <= self.num_clients:
            raise ConfigError(f"{prefix}clients_per_round: must be in 1..num_clients ({self.num_clients}), got {self.clients_per_round}")
        if not 1 <= self.rounds <= MAX_ROUNDS:
            raise ConfigError(f"{prefix}rounds: must be in 1..{MAX_ROUNDS}, got {self.rounds}")
        if self.evaluate_every < 1:
            raise ConfigError(f"{prefix}evaluate_every: must be >= 1, got {self.evaluate_every}")
        if self.min_clients is not None and not 1 <= self.min_clients <= self.num_clients:
            raise ConfigError(f"{prefix}min_clients: must be in 1..num_clients ({self.num_clients}) or null, got {self.min_clients}")
        if self.eval_clients_per_round is not None and not 1 <= self.eval_clients_per_round <= self.num_clients:
            raise ConfigError(f"{prefix}eval_clients_per_round: must be in 1..num_clients ({self.num_clients}) or null, got {self.eval_clients_per_round}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"{prefix}checkpoint_every: must be >= 1 (rounds between checkpoints), got {self.checkpoint_every}")
        if not self.round_timeout_s > 0:
            raise ConfigError(f"{prefix}round_timeout_s: must be positive, got {self.round_timeout_s}")
        check_choices(self, prefix)
        if not self.connect_timeout_s >= 0:
            raise ConfigError(f"{prefix}connect_timeout_s: must be >= 0, got {self.connect_timeout_s}")
        for p in self.profiles:
            if p not in PROFILES and p != AUTO:
                raise ConfigError(f"{prefix}profiles: unknown device profile {p!r}; known: {', '.join(PROFILES)}, {AUTO}")
        if not self.profiles:
            raise ConfigError(f"{prefix}profiles: give at least one device profile")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"{prefix}trim_fraction: must be in [0, 0.5), got {self.trim_fraction}")
        if self.nnm and self.aggregation == "mean":
            raise ConfigError(f"{prefix}nnm: nearest-neighbour mixing needs aggregation median, trimmed_mean or mean_around_median (got 'mean')")
        if self.clip_update_norm is not None and not self.clip_update_norm > 0:
            raise ConfigError(f"{prefix}clip_update_norm: must be positive or null, got {self.clip_update_norm}")
        if self.dp_noise_multiplier is not None:
            if not self.dp_noise_multiplier > 0 or self.clip_update_norm is None or self.aggregation != "mean":
                raise ConfigError(f"{prefix}dp_noise_multiplier: needs a positive value, clip_update_norm (the sensitivity) and aggregation: mean")
            if self.personalization == "lda":
                raise ConfigError(f"{prefix}dp_noise_multiplier: personalization: lda shares feature statistics every round, which are not privatized; "
                                  "use another personalization with differential privacy")
            if self.head_fit == "lda" and not (self.dp_stats_feature_clip or 0) > 0:
                raise ConfigError(f"{prefix}dp_stats_feature_clip: head_fit: lda under differential privacy needs a positive bound on each feature vector's norm "
                                  "(the statistics' sensitivity), or use head_fit: none")
            if not self.dp_delta < 1 / self.num_clients:
                raise ConfigError(f"{prefix}dp_delta: {self.dp_delta} is not below 1/num_clients ({1 / self.num_clients:.3g}): a (epsilon, delta) "
                                  "guarantee with delta that large allows releasing a client's data outright; set a delta far below 1/num_clients (e.g. 0.1/num_clients)")
            if self.dp_stats_max_examples < 1:
                raise ConfigError(f"{prefix}dp_stats_max_examples: must be at least 1, got {self.dp_stats_max_examples}")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"{prefix}dp_delta: must be in (0, 1), got {self.dp_delta}")
        bad = [c for c in self.attack.clients if not 0 <= c < self.num_clients]
        if bad:
            raise ConfigError(f"{prefix}attack.clients: partition id {bad[0]} is not a training client (0..{self.num_clients - 1}; "
                              "new clients never train, so they cannot attack)")
        if not self.lda_shrink >= 0:
            raise ConfigError(f"{prefix}lda_shrink: must be >= 0 (0: the client's own statistics only), got {self.lda_shrink}")
        if self.rep_head_epochs < 1:
            raise ConfigError(f"{prefix}rep_head_epochs: must be >= 1, got {self.rep_head_epochs}")
        if self.finetune_epochs < 1:
            raise ConfigError(f"{prefix}finetune_epochs: must be >= 1, got {self.finetune_epochs}")
        if not self.ditto_lambda >= 0:
            raise ConfigError(f"{prefix}ditto_lambda: must be >= 0 (0: each client's own model trains without the pull to the global one), got {self.ditto_lambda}")
        if self.ditto_epochs < 1:
            raise ConfigError(f"{prefix}ditto_epochs: must be >= 1, got {self.ditto_epochs}")

    def total_clients(self) -> int:
        """Partitions and SuperNodes: the training clients and the new ones."""
        return self.num_clients + self.new_clients

    def heads_personal(self) -> bool:
        """Whether a task head (or part of one) stays on the client: a personal prefix covers `heads.`."""
        return any("heads.".startswith(p) or p.startswith("heads.") for p in self.personal_prefixes())

    def personal_prefixes(self) -> list[str]:
        """Parameter-name prefixes that never leave a client: `personal`, the task heads under
        fedper, everything under local (no federation)."""
        return list(self.personal) + {"fedper": ["heads."], "fedrep": ["heads."], "local": [""]}.get(self.personalization, [])




@dataclass
class BackendConfig:
    cpus_per_client: float = 1.0  # Ray resources per virtual client
    torch_threads: int = 1  # torch threads inside each simulated client (a deployed client uses all of its device's cores)
    launcher: Literal["run_simulation", "flwr-run"] = "flwr-run"  # flwr-run: a private SuperLink with Flower's simulation runtime and `flwr run` (the path Flower supports) | run_simulation: Flower's in-process launcher (deprecated in flwr 1.42)

    def validate(self, prefix: str = "") -> None:
        check_choices(self, prefix)
        if not self.cpus_per_client > 0:
            raise ConfigError(f"{prefix}cpus_per_client: must be > 0 (Ray's CPUs per virtual client), got {self.cpus_per_client}")
        if self.torch_threads < 1:
            raise ConfigError(f"{prefix}torch_threads: must be >= 1, got {self.torch_threads}")


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
    task_data: dict[str, DataConfig] | None = None  # multidomain: each task's own data source (fedtune.data.multidomain); data gives the image size and channels

    def validate(self, prefix: str = "") -> None:
        if self.federation.personalization == "fedbabu" and self.train.head_fit != "none":
            raise ConfigError(f"{prefix}federation.personalization: fedbabu holds the task head at its initialization during the federation; train.head_fit {self.train.head_fit!r} would refit it on each client, set train.head_fit: none")
        if self.federation.personalization == "fedrep" and self.train.head_fit != "none":
            raise ConfigError(f"{prefix}federation.personalization: fedrep trains the personal head first and then the body with the head fixed; train.head_fit {self.train.head_fit!r} "
                              "would refit the head inside the body's phase, set train.head_fit: none")
        if not self.federation.heads_personal() and self.train.head_fit != "none" and self.train.head_fit_kind == "lda":
            raise ConfigError(f"{prefix}train.head_fit_kind: lda on a client gives the classes it has no example of a bias of {ABSENT_CLASS_BIAS:g}, which averaging the shared "
                              "head spreads to the whole federation; use head_fit_kind: logistic, federation.head_fit: lda (the server's fit from every client's statistics), "
                              "or keep the heads personal (federation.personal: [heads.])")
        if self.federation.balanced_loss and self.train.head_fit != "none":
            raise ConfigError(f"{prefix}federation.balanced_loss: train.head_fit {self.train.head_fit!r} would refit the shared head on the client's skewed labels, undoing the balanced loss; set train.head_fit: none")
        if self.method.name == "alast" and self.method.alast.shared_blocks and not self.federation.feed_importance:
            raise ConfigError(f"{prefix}method.alast.shared_blocks: the shared blocks are the federation's top-K by importance, which clients get only with federation.feed_importance: true")
        if self.method.name == "alast" and self.federation.feed_importance and self.federation.dp_noise_multiplier is not None:
            raise ConfigError(f"{prefix}federation.feed_importance: under differential privacy the federation's block importance (the clients' class-token "
                              "changes, averaged without noise) would go back to every client unprivatized; set federation.feed_importance: false "
                              "(and method.alast.shared_blocks: false)")
        if self.seed < 0:
            raise ConfigError(f"{prefix}seed: must be >= 0, got {self.seed}")
        check_takes_images(self.model, self.data.img_size, self.data.channels, prefix)
        if self.task is not None and self.tasks is not None:
            raise ConfigError(f"{prefix}task/tasks: give one of them (task for one task, tasks for several)")
        if self.tasks is not None and not self.tasks:
            raise ConfigError(f"{prefix}tasks: give at least one task")
        if self.task_data is not None:
            if not self.task_data:
                raise ConfigError(f"{prefix}task_data: give at least one task and its data source")
            if self.task is not None or (self.tasks is not None and list(self.tasks) != list(self.task_data)):
                raise ConfigError(f"{prefix}task_data: names the run's tasks ({', '.join(self.task_data)}); leave task/tasks out")
        for i, group in enumerate(self.federation.client_tasks or []):
            if not group:
                raise ConfigError(f"{prefix}federation.client_tasks[{i}]: empty; each group names the tasks its clients train (at least one)")
            if len(set(group)) != len(group):
                raise ConfigError(f"{prefix}federation.client_tasks[{i}]: task {next(t for t in group if group.count(t) > 1)!r} is named twice")
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
        """The model's tasks: `task_data`'s, `tasks`, or [`task`] ([] when the data set's first task is meant)."""
        if self.task_data is not None:
            return list(self.task_data)
        return list(self.tasks) if self.tasks is not None else ([self.task] if self.task else [])

    def key(self) -> str:
        return hashlib.sha256(json.dumps(to_dict(self), sort_keys=True).encode()).hexdigest()[:12]

    def profile_of(self, partition_id: int) -> str:
        return self.federation.profiles[partition_id % len(self.federation.profiles)]


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data = read_yaml(path) if path else {}
    cfg = from_dict(RunConfig, apply_overrides(data, overrides or []))
    return cfg
