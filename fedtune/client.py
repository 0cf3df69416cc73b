"""A client's side of a round in plain torch, and what it keeps.

`ClientRuntime` loads the global parameters, plans for its device profile, trains on its
partition, and returns exactly the parameters it updated (minus personal ones) with its
measured metrics. The Flower apps in clients/ and server/ only turn Messages into these calls.

Each client's personalized model follows `federation.personalization`:

- fedrod: besides the global (generic) head, aggregated, the client trains a personal head
  of its own, kept in its state and never sent; the personalized prediction is the generic
  head's logits plus the personal head's, and the personal head trains on that sum with the
  generic logits and the features detached (it starts at zero: the personalized model starts
  as the global one). With `federation.balanced_loss` the shared model trains with balanced
  softmax, as FedRoD's generic model does (FedRoD, Chen & Chao 2022);
- local_head: a personal linear head trained beside the global one on the same detached
  features, started from the global head and predicting alone (a local linear probe that
  follows the federation's features; fedtune's `fedrod` before it added the generic logits);
- fedper: the task head itself is personal: trained with the body, never sent (FedPer);
- fedrep: the task head is personal and trains first each round (`federation.rep_head_epochs`,
  body fixed), then the body trains with the head fixed (FedRep);
- lda: a discriminant head in closed form, from the client's class statistics on the global
  model's features shrunk towards the federation's, with the client's class priors;
- finetune: the global model fine-tuned locally (`federation.finetune_epochs`) in the final
  evaluation (FedAvg + fine-tuning);
- fedbabu: the task head never trains during the federation (it stays as initialized, or as
  the server last set it); only the body learns and is averaged. In the final evaluation the
  whole global model is fine-tuned locally, as under finetune (FedBABU);
- ditto: each client keeps a whole model of its own besides the global one, and each round
  trains it (`federation.ditto_epochs`, with the run's method) on its data with the pull
  `federation.ditto_lambda` / 2 * ||v - w||^2 towards the global model w it received, before
  training w as usual; only w's update is sent (Ditto, Li et al. 2021);
- local: nothing is sent; each client trains its own model (local training only);
- none: the global model only.

Parameters named in `federation.personal` also stay on the client.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .client_state import (
    PERSONAL_HEAD,
    PERSONAL_MODEL,
    ClientState,
    personal_head,
    personal_model,
    personal_params,
)
from .engine import Plan, dense_plan
from .errors import ConfigError
from .federated import (
    client_data,
    client_tasks,
    is_personal,
    load_numpy_state,
    shared_model,
    state_to_numpy,
)
from .heads import (
    bound_contribution,
    class_stats,
    extract_features,
    personal_lda_head,
)
from .methods import Method, MethodConfig, make_method
from .profiles import AUTO, get_profile, simulated_auto_profile
from .protocol import EvalMetrics, TrainMetrics
from .runconfig import RunConfig
from .trainer import Trainer, balanced_softmax_adjustment

# --------------------------------------------------------------------------- a client's round


class PersonalHeadTrainer(Trainer):
    """Trainer that also fits the client's personal head on the detached features: on its own
    (local_head) or, when `additive`, added to the generic head's detached logits (FedRoD)."""

    def __init__(self, *args, personal_head: nn.Linear | None = None, additive: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.personal_head = personal_head
        self.additive = additive
        if personal_head is not None:
            self.optimizer.add_param_group({"params": list(personal_head.parameters()), "lr": self.head_lr})
            self._base_lrs.append(self.head_lr)

    def heads_to_fit(self) -> list[nn.Linear]:
        # an additive head is fitted to what the generic head leaves, not refitted on its own
        own = self.personal_head is not None and not self.additive
        return super().heads_to_fit() + ([self.personal_head] if own else [])

    def extra_loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        if self.personal_head is None:
            return None
        feats = feats.detach()
        logits = self.personal_head(feats)
        if self.additive:
            logits = logits + self.model.forward_head(feats, self.task).detach()
        return F.cross_entropy(logits, labels)


class ProximalTrainer(Trainer):
    """Trainer whose loss adds `strength` / 2 times the squared distance of the trained
    parameters from `anchor` (Ditto's personal objective; FedProx's local one)."""

    def __init__(self, *args, anchor: dict[str, torch.Tensor], strength: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.anchor = anchor
        self.strength = strength

    def extra_loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        if not self.strength:
            return None
        terms = [(p - self.anchor[n]).pow(2).sum() for n, p in self.model.named_parameters() if p.requires_grad and n in self.anchor]
        return 0.5 * self.strength * torch.stack(terms).sum() if terms else None


class HeadFixed:
    """A method whose every plan leaves the task head as it is (FedRep's body phase, FedBABU)."""

    def __init__(self, method: Method) -> None:
        self._method = method

    def plan(self) -> Plan:
        return replace(self._method.plan(), train_head=False)

    def __getattr__(self, name: str):
        return getattr(self._method, name)


class ClientRuntime:
    """One client's model and data; `fit` and `evaluate` a round at a time, over the client's tasks."""

    def __init__(self, cfg: RunConfig, partition_id: int, profile: str | None = None):
        self.cfg = cfg
        self.partition_id = partition_id
        if profile is None and cfg.profile_of(partition_id) == AUTO:  # a simulated client: it shares this machine
            self.profile = simulated_auto_profile(cfg.backend.cpus_per_client, cfg.federation.total_clients())
        else:
            self.profile = get_profile(profile or cfg.profile_of(partition_id))
        self.train_set, self.test_set = client_data(cfg, partition_id)
        if len(self.train_set) == 0:
            raise ConfigError(f"client {partition_id} has no training data")
        self.model = shared_model(cfg)
        self.tasks = client_tasks(cfg, partition_id)
        for task in self.tasks:
            self.model.check_task(task)
        dim = self.model.vit.embed_dim
        self.personal_heads = {t: nn.Linear(dim, self.model.heads[t].out_features) for t in self.tasks} if cfg.federation.personalization in ("fedrod", "local_head") else {}
        self.personal_prefixes = cfg.federation.personal_prefixes()

    def _load(self, global_arrays: dict[str, np.ndarray], state: ClientState) -> None:
        load_numpy_state(self.model, global_arrays)
        personal = personal_params(state.personal)
        if personal:
            load_numpy_state(self.model, personal, "client state")
        for task, head in self.personal_heads.items():
            saved = personal_head(state.personal, task)
            if saved:
                head.load_state_dict(saved)
            elif self.cfg.federation.personalization == "fedrod":  # added to the generic logits: zero changes nothing
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
            else:  # local_head: start from the global head
                head.load_state_dict(self.model.heads[task].state_dict())

    def fit(self, global_arrays: dict[str, np.ndarray], state: ClientState, importance: list[float] | None = None, server_round: int = 0) -> tuple[dict[str, np.ndarray], dict[str, int], TrainMetrics, ClientState]:
        """Train one round on each of the client's tasks; return (update, update counts, metrics, new state)."""
        start = time.perf_counter()
        cfg = self.cfg
        seed = cfg.seed * 7919 + self.partition_id * 31 + server_round
        own_model, steps = self._train_own_model(global_arrays, state, seed) if cfg.federation.personalization == "ditto" else ({}, [])
        self._load(global_arrays, state)
        kept = state.method
        counts_all: Counter = Counter()
        block_updates = [0] * self.model.depth
        expert_counts: dict[str, dict[int, list[int]]] = {}
        examples, loss_sum, correct = 0, 0.0, 0.0
        survey_flops = 0.0
        task_examples: dict[str, int] = {}
        expert_dropped = 0
        for i, task in enumerate(self.tasks):
            method = make_method(cfg.method, self.model, self.profile, cfg.train.batch_size, task, seed=seed + i)
            method.load_state_dict(kept)
            if importance is not None:
                method.set_importance(importance)
            torch.manual_seed(seed + i)
            tcfg = replace(cfg.train, seed=seed + i)
            if cfg.federation.personalization == "fedrep":
                # FedRep: the (personal) head first, on the received body; then the body, head fixed
                head_only = make_method(MethodConfig(name="head"), self.model, self.profile, cfg.train.batch_size, task, seed=seed + i)
                head_phase = Trainer(self.model, head_only, replace(tcfg, epochs=cfg.federation.rep_head_epochs), task).train(self.train_set.for_task(task))
                steps += head_phase.steps  # its compute counts with the body's (FLOPs, activation bytes, steps)
            if cfg.federation.personalization in ("fedrep", "fedbabu"):
                method = HeadFixed(method)
            trainer = PersonalHeadTrainer(self.model, method, tcfg, task, personal_head=self.personal_heads.get(task),
                                          additive=self.cfg.federation.personalization == "fedrod")
            data = self.train_set.for_task(task)
            if cfg.federation.attack.kind == "label_flip" and self.partition_id in cfg.federation.attack.clients:
                data = flipped_labels(data, task)
            if cfg.federation.balanced_loss:
                trainer.log_prior = balanced_softmax_adjustment(data.labels[task], data.num_classes[task])
            result = trainer.train(data)
            survey_flops += result.survey_flops
            counts_all.update(result.update_counts)
            block_updates = [a + b for a, b in zip(block_updates, result.block_updates, strict=True)]
            steps += result.steps
            if result.expert_counts:
                expert_counts[task] = result.expert_counts
            expert_dropped += result.expert_dropped
            examples += result.num_examples
            task_examples[task] = result.num_examples
            if result.num_examples:  # a task that took no step has NaN loss and accuracy
                loss_sum += result.loss * result.num_examples
                correct += result.accuracy * result.num_examples
            kept = method.state_dict() or kept
        personal = self.personal_prefixes
        if cfg.federation.send == "all":
            names = [n for n in self.model.state_dict() if not is_personal(n, personal)]
        else:
            names = [n for n in counts_all if not is_personal(n, personal)]
        update = state_to_numpy(self.model, names)
        attack = cfg.federation.attack
        if attack.kind in ("sign_flip", "noise") and self.partition_id in attack.clients:
            update = attacked_update(update, global_arrays, attack, seed)
        counts = {n: int(counts_all.get(n, 0)) for n in names}
        heads = {f"{PERSONAL_HEAD}{t}.{k}": v.detach().numpy().copy() for t, h in self.personal_heads.items() for k, v in h.state_dict().items()}
        new_state = ClientState(personal={**state_to_numpy(self.model, [n for n in self.model.state_dict() if is_personal(n, personal)]), **heads, **own_model}, method=kept)
        flops = [s.train_flops for s in steps if s.train_flops is not None]
        memory = [s.activation_bytes + s.trainable_state_bytes for s in steps]  # what a device profile budgets, per step
        metrics = TrainMetrics(
            num_examples=examples,
            partition_id=self.partition_id,
            task_ids=[self.model.tasks.index(t) for t in self.tasks],
            task_examples=task_examples if len(self.tasks) > 1 else {},
            train_loss=loss_sum / max(examples, 1),
            train_accuracy=correct / max(examples, 1),
            steps=len(steps),
            flops_per_step=float(np.mean(flops)) if flops else 0.0,
            survey_flops=survey_flops,
            activation_bytes=int(max((s.activation_bytes for s in steps), default=0)),
            memory_bytes=int(max(memory, default=0)),
            steps_over_memory_budget=sum(m > self.profile.memory_bytes for m in memory),
            trainable_params=int(max((s.trainable_params for s in steps), default=0)),
            step_time_s=float(np.median([s.step_time_s for s in steps])) if steps else 0.0,
            time_s=time.perf_counter() - start,
            bytes_sent=int(sum(v.nbytes for v in update.values())),
            bytes_received=int(sum(v.nbytes for v in global_arrays.values())),
            block_updates=block_updates,
            importance=None if kept.get("importance") is None else [float(v) for v in kept["importance"]],
            # per task: tokens per expert, [MoE blocks x experts] flattened, blocks in order
            experts={task: [c for b in sorted(per_block) for c in per_block[b]] for task, per_block in expert_counts.items()},
            expert_dropped=expert_dropped,
        )
        return update, counts, metrics, new_state

    def _train_own_model(self, global_arrays: dict[str, np.ndarray], state: ClientState, seed: int) -> tuple[dict[str, np.ndarray], list]:
        """Ditto's personal step: the client's own model (the received global one in its first
        round) trained on each of its tasks with the pull towards the received global model.
        Returns it as state entries under PERSONAL_MODEL, and its steps' stats (the round's
        reported steps and FLOPs include them)."""
        fed = self.cfg.federation
        load_numpy_state(self.model, global_arrays)
        anchor = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        own = personal_model(state.personal)
        if own:
            load_numpy_state(self.model, own, "client state")
        steps: list = []
        for i, task in enumerate(self.tasks):
            method = make_method(self.cfg.method, self.model, self.profile, self.cfg.train.batch_size, task, seed=seed + 101 + i)
            tcfg = replace(self.cfg.train, epochs=fed.ditto_epochs, seed=seed + 101 + i)
            torch.manual_seed(seed + 101 + i)
            steps += ProximalTrainer(self.model, method, tcfg, task, anchor=anchor, strength=fed.ditto_lambda).train(self.train_set.for_task(task)).steps
        return {f"{PERSONAL_MODEL}{k}": v for k, v in state_to_numpy(self.model).items()}, steps

    @torch.no_grad()
    def head_stats(self, global_arrays: dict[str, np.ndarray], state: ClientState) -> dict[str, np.ndarray]:
        """Per task, the class statistics of the global model's features (every block, every
        token) on this client's training data: what the server's discriminant head fit sums."""
        self._load(global_arrays, state)
        out = {}
        for task in self.tasks:
            feats, labels = extract_features(self.model, self.train_set, task)
            for part, value in self._stats_to_send(task, feats, labels).items():
                out[f"{task}.{part}"] = value
        return out

    def _stats_to_send(self, task: str, feats: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
        """The class statistics of `feats` this client sends the server; under differential
        privacy from a bounded contribution (a seeded sample of examples, each feature vector
        clipped), to which the server adds the noise (heads.privatize_stats)."""
        fed = self.cfg.federation
        if fed.dp_noise_multiplier and fed.dp_stats_feature_clip:
            feats, labels = bound_contribution(feats, labels, fed.dp_stats_feature_clip, fed.dp_stats_max_examples, seed=self.cfg.seed * 7919 + self.partition_id)
        return class_stats(feats, labels, self.model.heads[task].out_features)

    @torch.no_grad()
    def evaluate(self, global_arrays: dict[str, np.ndarray], state: ClientState, fed_stats: dict[str, dict[str, np.ndarray]] | None = None,
                 final: bool = False, want_stats: bool = False) -> tuple[EvalMetrics, dict[str, np.ndarray], ClientState | None]:
        """The global model and the personalized one on the client's local test split, per task.

        The personalized model follows `federation.personalization` (module docstring); the
        "lda" head is built here, from this client's class statistics on its training data
        shrunk towards the federation's (`fed_stats`), and "finetune" and "fedbabu" train a
        copy of the global model locally, in the final evaluation only. Returns the metrics,
        this client's class statistics when `want_stats` (what the server's head fit sums)
        and, when the evaluation built a personal head, the state that keeps it (else None)."""
        fed = self.cfg.federation
        mode = fed.personalization
        # a task without a local test example is not measured (its head is still built, and its
        # statistics still sent); a client with none reports num-examples 0 and no accuracy
        sets = {t: self.test_set.for_task(t) for t in self.tasks if self.test_set.count(t)}
        out = EvalMetrics(num_examples=sum(len(d) for d in sets.values()), partition_id=self.partition_id,
                          per_task_examples={t: len(d) for t, d in sets.items()})
        load_numpy_state(self.model, global_arrays)
        plan = dense_plan(self.model)
        stats: dict[str, np.ndarray] = {}
        new_heads: dict[str, np.ndarray] = {}
        global_feats = {}
        for task in self.tasks:
            if task in sets:
                feats, labels = extract_features(self.model, sets[task], task, 256, plan)
                global_feats[task] = (feats, labels)
                out.per_task_global[task] = _accuracy(self.model.forward_head(feats, task), labels)
            if want_stats or mode == "lda":
                train_feats, train_labels = extract_features(self.model, self.train_set, task, 256, plan)
                own = class_stats(train_feats, train_labels, self.model.heads[task].out_features)
                if want_stats:
                    stats.update({f"{task}.{k}": v for k, v in self._stats_to_send(task, train_feats, train_labels).items()})
                if mode == "lda":
                    weight, bias = personal_lda_head(own, (fed_stats or {}).get(task), fed.lda_shrink)
                    if task in sets:
                        out.per_task_personal[task] = _accuracy(global_feats[task][0] @ weight.T + bias, global_feats[task][1])
                    new_heads.update({f"{PERSONAL_HEAD}{task}.weight": weight.numpy(), f"{PERSONAL_HEAD}{task}.bias": bias.numpy()})
        if mode in PERSONAL_PARAM_MODES:
            self._load(global_arrays, state)
            personal = bool(personal_params(state.personal))
            for task in sets:
                feats, labels = extract_features(self.model, sets[task], task, 256, plan) if personal else global_feats[task]
                head = self.personal_heads.get(task)
                logits = self.model.forward_head(feats, task)
                if head is not None:
                    logits = logits + head(feats) if mode == "fedrod" else head(feats)
                out.per_task_personal[task] = _accuracy(logits, labels)
        elif mode == "ditto":
            own = personal_model(state.personal)
            if own:  # else the client has not trained yet: its own model would start from the global one
                load_numpy_state(self.model, own, "client state")
            for task in sets:
                feats, labels = extract_features(self.model, sets[task], task, 256, plan) if own else global_feats[task]
                out.per_task_personal[task] = _accuracy(self.model.forward_head(feats, task), labels)
            load_numpy_state(self.model, global_arrays)
        elif mode in ("finetune", "fedbabu") and final:
            with torch.enable_grad():
                for i, task in enumerate(self.tasks):
                    if task not in sets:
                        continue
                    load_numpy_state(self.model, global_arrays)
                    method = make_method(self.cfg.method, self.model, self.profile, self.cfg.train.batch_size, task, seed=self.cfg.seed + i)
                    tcfg = replace(self.cfg.train, epochs=fed.finetune_epochs, seed=self.cfg.seed * 7919 + self.partition_id * 31 + i)
                    Trainer(self.model, method, tcfg, task).train(self.train_set.for_task(task))
                    feats, labels = extract_features(self.model, sets[task], task, 256, plan)
                    out.per_task_personal[task] = _accuracy(self.model.forward_head(feats, task), labels)
            load_numpy_state(self.model, global_arrays)
        out.accuracy_global = sum(out.per_task_global.values()) / len(sets) if sets else None
        out.accuracy_personal = sum(out.per_task_personal.values()) / len(sets) if out.per_task_personal else None
        kept = ClientState(personal={**state.personal, **new_heads}, method=state.method) if new_heads and final else None
        return out, stats, kept


def attacked_update(update: dict[str, np.ndarray], global_arrays: dict[str, np.ndarray], attack, seed: int) -> dict[str, np.ndarray]:
    """What a simulated attacker sends instead of its update: sign_flip, the global value minus
    `scale` times the trained change; noise, the global value plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in update.items():
        if not np.issubdtype(value.dtype, np.floating):
            out[name] = value
            continue
        base = global_arrays[name]
        if attack.kind == "sign_flip":
            out[name] = (base - attack.scale * (value - base)).astype(value.dtype)
        else:
            out[name] = (base + rng.normal(0.0, attack.noise_std, size=value.shape)).astype(value.dtype)
    return out


def flipped_labels(data, task: str):
    """`data` with `task`'s labels y replaced by C-1-y (a label-flipping attacker)."""
    from .data import ImageSet

    c = data.num_classes[task]
    return ImageSet(data.images, {**data.labels, task: (c - 1) - data.labels[task]}, dict(data.num_classes), dict(data.class_names))


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return int((logits.argmax(-1) == labels).sum()) / max(len(labels), 1)


PERSONAL_PARAM_MODES = ("fedrod", "local_head", "fedper", "fedrep", "local")  # the personalized model: the global one with the client's personal parameters (and head)
