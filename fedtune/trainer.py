"""The local trainer: data -> plan -> forward -> loss -> gradients on the planned blocks.

Readable top to bottom: `train_step` asks the method for a plan, sets
trainability from it (the only place requires_grad changes), runs the engine,
steps the optimizer, lets the method observe what the forward pass saw, and
returns the step's measured costs.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from .accounting import (
    SavedBytesMeter,
    StepStats,
    flop_counter_mode,
    trainable_params,
    trainable_state_bytes,
)
from .data import ImageSet
from .engine import Plan, Trace, param_groups, set_trainable
from .errors import ConfigError
from .heads import (
    class_stats,
    evaluate,
    extract_features,
    fit_linear_head,
    lda_head,
    set_head,
    single_class_head,
)
from .methods import Method
from .model import FedViT
from .typedconfig import check_choices


@dataclass
class TrainConfig:
    epochs: int = 3  # local epochs
    batch_size: int = 64  # training batch size
    lr: float = 5e-4  # AdamW peak learning rate
    head_lr: float | None = None  # learning rate of the heads (None: lr)
    weight_decay: float = 0.05  # AdamW weight decay
    decay_all: bool = True  # decay every parameter; false: not biases, norms, tokens and position embeddings (timm's rule)
    warmup_steps: int = 5  # linear warm-up steps
    schedule: Literal["cosine", "constant"] = "cosine"  # cosine | constant
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    flops_every: int = 10  # count FLOPs on the first step and every Nth step after
    max_steps: int | None = None  # stop after this many steps (quick runs)
    eval_batch_size: int = 256  # evaluation batch size
    seed: int = 0  # seed for shuffling and initialisation
    head_fit: Literal["none", "before", "after", "both"] = "none"  # none | before | after | both: refit the head(s) on every-token features (see fit_heads)
    head_fit_reg: float = 0.005  # logistic: L2 penalty (mean cross-entropy + reg/2 * |W|^2)
    head_fit_kind: Literal["logistic", "lda"] = "logistic"  # logistic (L-BFGS) | lda (linear discriminant, closed form; see lda_head)
    head_fit_samples: int | None = None  # fit on at most this many training images (None: all)

    def validate(self, prefix: str = "") -> None:
        if self.epochs < 0:
            raise ConfigError(f"{prefix}epochs: must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"{prefix}batch_size: must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"{prefix}lr: must be positive, got {self.lr}")
        if self.flops_every < 1:
            raise ConfigError(f"{prefix}flops_every: must be >= 1, got {self.flops_every}")
        if self.head_lr is not None and not self.head_lr > 0:
            raise ConfigError(f"{prefix}head_lr: must be positive or null (= lr), got {self.head_lr}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"{prefix}weight_decay: must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{prefix}warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"{prefix}label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"{prefix}max_steps: must be >= 1 or null, got {self.max_steps}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"{prefix}eval_batch_size: must be >= 1, got {self.eval_batch_size}")
        check_choices(self, prefix)
        if self.head_fit_reg < 0:
            raise ConfigError(f"{prefix}head_fit_reg: must be >= 0, got {self.head_fit_reg}")
        if self.head_fit_samples is not None and self.head_fit_samples < 1:
            raise ConfigError(f"{prefix}head_fit_samples: must be >= 1 or null, got {self.head_fit_samples}")




def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at `step` of `total` (a pure function)."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant" or total <= cfg.warmup_steps:
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    steps: list[StepStats] = field(default_factory=list)
    update_counts: Counter = field(default_factory=Counter)  # parameter name -> steps that updated it
    block_updates: list[int] = field(default_factory=list)  # per block: steps that trained it
    num_examples: int = 0
    loss: float = float("nan")
    accuracy: float = float("nan")  # on the training batches, as seen during training
    expert_counts: dict[int, list[int]] = field(default_factory=dict)  # MoE: block -> tokens routed to each expert (before capacity)
    expert_dropped: int = 0  # MoE: of those assignments, the ones over an expert's capacity (not processed), all blocks
    head_fit_s: float = 0.0  # wall time of the head fits (feature extraction included)
    head_fit_flops: float = 0.0  # FLOPs of the head fits' feature extraction (no autograd, every token)
    survey_flops: float = 0.0  # FLOPs of the survey's forward passes before training (ALaST's survey_batches, MoE's train_experts)

    def summary(self) -> dict:
        timed = [s.step_time_s for s in self.steps if s.train_flops is None] or [s.step_time_s for s in self.steps]
        flops = [s.train_flops for s in self.steps if s.train_flops is not None]
        return {
            "steps": len(self.steps),
            "step_time_s": float(np.median(timed)) if timed else 0.0,
            "train_flops_per_step": float(np.mean(flops)) if flops else 0.0,
            "activation_bytes": int(np.max([s.activation_bytes for s in self.steps])) if self.steps else 0,
            "trainable_params": int(np.max([s.trainable_params for s in self.steps])) if self.steps else 0,
            "trainable_state_bytes": int(np.max([s.trainable_state_bytes for s in self.steps])) if self.steps else 0,
            "loss": self.loss,
            "train_accuracy": self.accuracy,
            "num_examples": self.num_examples,
            "head_fit_s": round(self.head_fit_s, 2),
            "head_fit_flops": self.head_fit_flops,
            "survey_flops": self.survey_flops,
            "plan_time_s": float(np.median([s.plan_time_s for s in self.steps])) if self.steps else 0.0,
            "blocks_trained_mean": float(np.mean([s.blocks_trained for s in self.steps])) if self.steps else 0.0,
            "blocks_trained_per_step": [s.blocks_trained for s in self.steps],
            "block_choice_freq": [u / max(len(self.steps), 1) for u in self.block_updates],
        }


def balanced_softmax_adjustment(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Log class priors of `labels` for the balanced softmax loss (Ren et al. 2020; FedRoD's
    balanced risk): cross-entropy on logits + log p(y) fits logits that stand for the
    class-balanced posterior, so clients with skewed labels train towards the same head. A
    class the client lacks has prior 0 (log -inf): it is left out of the loss (label smoothing
    spreads over the classes the client has), so its head row gets no gradient at all, not even
    Adam's normalized step; only weight decay, where it applies, shrinks it. A client with a
    single class then has a zero loss: it has nothing to say about the balanced posterior."""
    counts = torch.bincount(labels.long(), minlength=num_classes).double()
    return (counts / max(len(labels), 1)).log().float()


def _loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float, log_prior: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy, or balanced softmax over the classes with a finite `log_prior`."""
    if log_prior is None:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    log_prior = log_prior.to(logits.device)
    present = torch.isfinite(log_prior)
    remap = present.long().cumsum(0) - 1  # a present class's column among the present ones
    if not bool(present[labels].all()):
        raise ValueError("balanced softmax: a label of a class whose prior is 0")
    return F.cross_entropy(logits[:, present] + log_prior[present], remap[labels], label_smoothing=label_smoothing)


class Trainer:
    """Fine-tunes `model` on one task under `method`'s plans."""

    def __init__(self, model: FedViT, method: Method, cfg: TrainConfig, task: str | None = None):
        cfg.validate("train.")
        self.model = model
        self.method = method
        self.cfg = cfg
        self.task = model.check_task(task)
        self.head_lr = cfg.head_lr or cfg.lr
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for _, group, p in param_groups(model):  # the same named groups set_trainable reads
            groups.setdefault((group.kind == "head", cfg.decay_all or group.decays), []).append(p)
        order = sorted(groups)  # the backbone before the heads
        self.optimizer = torch.optim.AdamW(
            [{"params": groups[k], "lr": self.head_lr if k[0] else cfg.lr, "weight_decay": cfg.weight_decay if k[1] else 0.0} for k in order]
        )
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.global_step = 0
        self.total_steps = 0
        self.last_survey_flops = 0.0  # FLOPs of the last survey's forward passes
        self.experts: tuple[tuple[int, tuple[int, ...]], ...] = ()  # MoE: the experts that train (the model's experts_to_train)
        self.log_prior: torch.Tensor | None = None  # [classes] the client's log class priors: the loss is balanced softmax (balanced_softmax_adjustment)

    @torch.no_grad()
    def survey(self, data: ImageSet, max_batches: int) -> list[Trace]:
        """What forward passes without autograd observe on up to `max_batches` batches of
        `data` under the method's current plan (class-token deltas, MoE routing); their FLOPs
        go to `last_survey_flops`."""
        self.last_survey_flops = 0.0
        if max_batches < 1 or len(data) == 0:
            return []
        was_training = self.model.training
        self.model.train()  # as training routes (an MoE block's training capacity) ...
        for module in self.model.modules():  # ... but without randomness: no stochastic depth, no dropout
            if isinstance(module, (DropPath, nn.Dropout)):
                module.eval()
        plan = self.method.plan()
        traces = []
        loader = data.loader(self.cfg.batch_size, shuffle=True, seed=self.cfg.seed, task=self.task)
        counter = flop_counter_mode()
        with counter:
            for images, _ in itertools.islice(loader, max_batches):
                traces.append(Trace())
                self.model.forward_features(images, plan, self.task, trace=traces[-1])
        self.last_survey_flops = float(counter.get_total_flops())
        self.model.train(was_training)
        return traces

    def _set_lr(self) -> None:
        mult = lr_at(self.global_step, self.total_steps, self.cfg)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * mult

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, count_flops: bool = False) -> tuple[StepStats, Plan, torch.Tensor]:
        start = time.perf_counter()
        model = self.model
        model.train()
        plan_start = time.perf_counter()
        plan = self.method.plan()
        plan_time = time.perf_counter() - plan_start
        if self.experts:
            plan = replace(plan, experts=self.experts)
        set_trainable(model, plan, self.task)
        self._drop_frozen_state()
        self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        trace = Trace()
        meter = SavedBytesMeter(model)
        counter = flop_counter_mode() if count_flops else None
        if counter is not None:
            counter.__enter__()
        try:
            with meter:
                feats, _ = model.forward_features(images, plan, self.task, trace=trace)
                logits = model.forward_head(feats, self.task)
                loss = _loss(logits, labels, self.cfg.label_smoothing, self.log_prior)
                for extra in (trace.aux_loss, self.extra_loss(feats, labels)):
                    if extra is not None:
                        loss = loss + extra
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss.item()} at step {self.global_step}; lower train.lr")
            loss.backward()
        finally:
            if counter is not None:
                counter.__exit__(None, None, None)
        self.optimizer.step()
        observe_start = time.perf_counter()
        self.method.observe(trace)
        plan_time += time.perf_counter() - observe_start
        self.last_trace = trace
        self.global_step += 1
        if images.is_cuda:  # the GPU's queued backward and optimizer step belong to this step's time
            torch.cuda.synchronize(images.device)
        stats = StepStats(
            step_time_s=time.perf_counter() - start,
            activation_bytes=meter.total,
            train_flops=counter.get_total_flops() if counter is not None else None,
            trainable_params=trainable_params(model),
            trainable_state_bytes=trainable_state_bytes(model),
            batch_size=int(images.shape[0]),
            loss=float(loss.detach()),
            plan_time_s=plan_time,
            blocks_trained=len(plan.trained),
        )
        return stats, plan, logits.detach()

    def _drop_frozen_state(self) -> None:
        """Free the optimizer state (AdamW's moments) of parameters this step does not train:
        the memory a plan is budgeted for holds the state of what it trains, not of every
        block an adaptive method trained before (ALaST's selection moves between steps). A
        block that trains again starts its moments afresh."""
        for p in [p for p in self.optimizer.state if not p.requires_grad]:
            del self.optimizer.state[p]

    def extra_loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """A loss term subclasses add on the pre-logit features (None: none)."""
        return None

    def train(self, data: ImageSet, epochs: int | None = None, progress: Callable[[int, int, StepStats], None] | None = None) -> TrainResult:
        """Train for `epochs` (default cfg.epochs) over `data`; returns measured per-step stats."""
        epochs = self.cfg.epochs if epochs is None else epochs
        steps_per_epoch = math.ceil(len(data) / self.cfg.batch_size)
        planned = epochs * steps_per_epoch
        if self.cfg.max_steps is not None:
            planned = min(planned, self.cfg.max_steps)
        self.total_steps = self.global_step + planned
        traces = self.survey(data, max(self.method.survey_batches, self.model.survey_batches))
        self.method.survey(traces[: self.method.survey_batches])
        self.experts = self.model.experts_to_train(traces[: self.model.survey_batches])
        result = TrainResult(block_updates=[0] * self.model.depth, survey_flops=self.last_survey_flops)
        if self.cfg.head_fit in ("before", "both"):
            self.fit_heads(data, result)
        loader = data.loader(self.cfg.batch_size, shuffle=True, seed=self.cfg.seed, task=self.task)
        correct, seen, loss_sum = 0, 0, 0.0
        done = 0
        for _ in range(epochs):
            for images, labels in loader:
                if done >= planned:
                    break
                count = done == 0 or done % self.cfg.flops_every == 0
                stats, plan, logits = self.train_step(images, labels, count_flops=count)
                for name, p in self.model.named_parameters():
                    if p.requires_grad and p.grad is not None:
                        result.update_counts[name] += 1
                for b in plan.trained:
                    result.block_updates[b] += 1
                for b, counts in self.last_trace.extra.get("expert_counts", {}).items():
                    prev = result.expert_counts.get(b, [0] * len(counts))
                    result.expert_counts[b] = [p + int(c) for p, c in zip(prev, counts.tolist(), strict=True)]
                result.expert_dropped += sum(int(d.sum()) for d in self.last_trace.extra.get("expert_dropped", {}).values())
                result.steps.append(stats)
                correct += int((logits.argmax(-1) == labels).sum())
                seen += len(labels)
                loss_sum += stats.loss * len(labels)
                done += 1
                if progress is not None:
                    progress(done, planned, stats)
        result.num_examples = seen
        if seen:  # no step taken (epochs 0): loss and accuracy stay NaN, not a perfect 0.0 loss
            result.loss = loss_sum / seen
            result.accuracy = correct / seen
        if self.cfg.head_fit in ("after", "both"):
            self.fit_heads(data, result)
        return result

    def heads_to_fit(self) -> list[nn.Linear]:
        """The linear heads `fit_heads` refits (subclasses add their own)."""
        return [self.model.heads[self.task]]

    def fit_heads(self, data: ImageSet, result: TrainResult | None = None) -> None:
        """Refit the task's head(s) on the backbone's features, every block and every token.

        Before training this is LP-FT's linear probe (Kumar et al., 2022): fine-tuning starts
        from a head that fits the frozen features instead of a random one. After training it
        matches the head to the features the model is evaluated and deployed with: a plan
        that drops tokens trains the head on features of fewer tokens. The cost is one
        forward pass without autograd over (up to `head_fit_samples` of) `data`, recorded
        in `result` apart from the training steps.
        """
        if len(data) == 0:
            return
        start = time.perf_counter()
        subset = data
        n = self.cfg.head_fit_samples
        if n is not None and len(data) > n:
            subset = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(self.cfg.seed))[:n])
        counter = flop_counter_mode()
        with counter:
            feats, labels = extract_features(self.model, subset, self.task, self.cfg.eval_batch_size)
        for head in self.heads_to_fit():
            if self.cfg.head_fit_kind == "lda":
                stats = class_stats(feats, labels, head.out_features)
                present = stats["count"] > 0  # data of one class (a client's own, for its personal head): that class is the prediction
                set_head(head, *(lda_head(stats) if present.sum() >= 2 else single_class_head(present, feats.shape[1])))
            else:
                fit_linear_head(head, feats, labels, self.cfg.head_fit_reg)
        if result is not None:
            result.head_fit_s += time.perf_counter() - start
            result.head_fit_flops += float(counter.get_total_flops())

    @torch.no_grad()
    def evaluate(self, data: ImageSet, task: str | None = None) -> dict[str, float]:
        return evaluate(self.model, data, task or self.task, self.cfg.eval_batch_size)
