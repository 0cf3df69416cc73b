"""Fine-tuning methods as planners on one engine.

Each method turns its config, the model and a device profile into a `Plan`
per step: `full` and `head` (baselines), `bsr` (fixed trained blocks, token
dropping at fixed blocks), `alast` (a new plan every step from per-block
importance) and `sherl` (no-grad early blocks, consolidation, tuned late
blocks). LoRA combines with bsr, alast and sherl. A plan must fit the
profile's memory and compute budgets; the planner says why when none does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import numpy as np

from .costs import Cost, CostModel
from .engine import Plan, Trace, check_blocks, keep_count
from .errors import ConfigError, PlanError
from .lora import LORA_TARGETS, apply_lora, has_lora
from .model import FedViT
from .profiles import DeviceProfile, get_profile
from .sherl import Consolidator
from .typedconfig import check_choices

MethodName = Literal["full", "head", "bsr", "alast", "sherl"]
METHOD_NAMES: tuple[str, ...] = get_args(MethodName)
MiB = float(1 << 20)


@dataclass
class LoRAConfig:
    enabled: bool = False  # train LoRA adapters instead of the trained blocks' weights
    rank: int = 8  # adapter rank
    alpha: float = 16.0  # scaling numerator (scale = alpha / rank)
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # qkv, proj, fc1, fc2

    def validate(self, prefix: str = "") -> None:
        if self.rank < 1:
            raise ConfigError(f"{prefix}rank: must be >= 1, got {self.rank}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise ConfigError(f"{prefix}targets: unknown target {bad[0]!r}; choose from {', '.join(LORA_TARGETS)}")
        if not self.targets:
            raise ConfigError(f"{prefix}targets: empty; name at least one of {', '.join(LORA_TARGETS)}")
        if not self.alpha > 0:
            raise ConfigError(f"{prefix}alpha: must be > 0 (the adapters' output is scaled by alpha / rank; 0 trains nothing), got {self.alpha}")


@dataclass
class BSRConfig:
    train_blocks: list[int] | None = None  # None: 3, 7, 11 (scaled to the depth)
    drop_blocks: list[int] | None = None  # None: 3, 6, 9 (scaled to the depth)
    keep_ratio: float = 0.5  # fraction of the arriving patch tokens kept at each drop block
    fuse: bool = True  # fuse dropped tokens into one (EViT): the head sees what was dropped (EViT)


@dataclass
class ALaSTConfig:
    k: int = 3  # blocks trained per step (the top-K budgets that fit the profile and the memory cap)
    mean_budget: float = 0.6  # mean per-block token budget (fraction of patch tokens)
    min_budget: float = 0.3  # lowest budget a block can get
    update: Literal["target", "delta"] = "target"  # target: move budgets towards Δ-proportional ones (mean kept) | delta: b += alpha (Δ_t - Δ_{t-1}), clipped
    rate: float = 0.1  # target: how fast budgets follow the importance (per step)
    alpha: float = 1e-3  # delta: step of the budget update (re-implementations tie it to the learning rate)
    adapt: bool = True  # False: budgets stay at mean_budget (with select: last, the fixed-plan ablation)
    memory_fraction: float | None = 0.2  # cap: memory vs full fine-tuning's (None: the profile alone)
    reselect: Literal["step", "round"] = "step"  # step: new trained blocks every step | round: keep the first plan's blocks while this planner trains
    survey_batches: int = 0  # before training, look at this many batches without autograd and start the budgets from their class-token deltas
    federation_weight: float = 0.5  # weight of the federation's importance against the client's own when budgets start from both
    shared_blocks: bool = False  # with the federation's importance: train only blocks among its top-K (those that fit), so a round's clients update at most K blocks between them
    select: Literal["top", "sample", "last"] = "top"  # top: the K highest budgets that fit | sample: K drawn with probability ~ budget (seeded), as ALaST's layer sampling | last: the K last blocks that fit


@dataclass
class SHERLConfig:
    tuned_blocks: int = 1  # late pre-trained blocks after the consolidation point (the reference: 1)
    keep_ratio: float = 1.0  # tokens kept at the consolidation point (1: no dropping)
    hidden: int | None = None  # width of the consolidation path (None: half the model width, as the reference)
    train_late: bool = False  # also train the late blocks' weights (the reference keeps them frozen; LoRA adapts them)


@dataclass
class MethodConfig:
    name: MethodName = "alast"  # full | head | bsr | alast | sherl
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    bsr: BSRConfig = field(default_factory=BSRConfig)
    alast: ALaSTConfig = field(default_factory=ALaSTConfig)
    sherl: SHERLConfig = field(default_factory=SHERLConfig)
    fit_to_profile: bool = True  # bsr: drop trained blocks (earliest first) until the plan fits (sherl keeps its plan or fails)

    def validate(self, prefix: str = "") -> None:
        check_choices(self, prefix)
        if self.lora.enabled and self.name in ("full", "head"):
            raise ConfigError(f"{prefix}lora.enabled: LoRA combines with bsr, alast and sherl, not {self.name}")
        for key, ratio in (("bsr.keep_ratio", self.bsr.keep_ratio), ("sherl.keep_ratio", self.sherl.keep_ratio)):
            if not 0.0 < ratio <= 1.0:
                raise ConfigError(f"{prefix}{key}: keep ratio must be in (0, 1], got {ratio}")
        a = self.alast
        if a.k < 0:
            raise ConfigError(f"{prefix}alast.k: must be >= 0, got {a.k}")
        if not 0.0 < a.min_budget <= a.mean_budget <= 1.0:
            raise ConfigError(f"{prefix}alast.mean_budget/min_budget: need 0 < min_budget <= mean_budget <= 1, got {a.min_budget}, {a.mean_budget}")
        if not 0.0 < a.rate <= 1.0:
            raise ConfigError(f"{prefix}alast.rate: must be in (0, 1], got {a.rate}")
        if not a.alpha > 0:
            raise ConfigError(f"{prefix}alast.alpha: must be positive, got {a.alpha}")
        if a.survey_batches < 0:
            raise ConfigError(f"{prefix}alast.survey_batches: must be >= 0, got {a.survey_batches}")
        if not 0.0 <= a.federation_weight <= 1.0:
            raise ConfigError(f"{prefix}alast.federation_weight: must be in [0, 1], got {a.federation_weight}")
        if a.memory_fraction is not None and not 0.0 < a.memory_fraction <= 1.0:
            raise ConfigError(f"{prefix}alast.memory_fraction: must be in (0, 1], got {a.memory_fraction}")
        if self.name == "sherl" and self.lora.enabled and self.sherl.train_late:
            raise ConfigError(f"{prefix}sherl.train_late: with lora.enabled the late blocks train LoRA adapters, not their weights; set one of the two")
        if self.sherl.tuned_blocks < 1:
            raise ConfigError(f"{prefix}sherl.tuned_blocks: must be >= 1, got {self.sherl.tuned_blocks}")
        if self.sherl.hidden is not None and self.sherl.hidden < 1:
            raise ConfigError(f"{prefix}sherl.hidden: must be >= 1 or null, got {self.sherl.hidden}")


def scaled_blocks(paper: list[int], depth: int) -> list[int]:
    """Block indices given for a 12-block ViT, mapped onto `depth` blocks."""
    if depth == 12:
        return list(paper)
    return sorted({min(depth - 1, round(b * (depth - 1) / 11)) for b in paper})


def prepare_model(model: FedViT, cfg: MethodConfig) -> FedViT:
    """Add what the method needs to the model (LoRA adapters, SHERL's consolidator), in place."""
    if cfg.lora.enabled and not has_lora(model):
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    if cfg.name == "sherl" and model.consolidator is None:
        merge_at = sherl_merge_at(cfg, model.depth)
        model.consolidator = Consolidator(merge_at + 1, model.vit.embed_dim, cfg.sherl.hidden)
    return model


def sherl_merge_at(cfg: MethodConfig, depth: int) -> int:
    if cfg.sherl.tuned_blocks >= depth:
        raise ConfigError(f"method.sherl.tuned_blocks: {cfg.sherl.tuned_blocks} must be less than the depth {depth}")
    return depth - cfg.sherl.tuned_blocks


def _mb(x: float) -> str:
    return f"{x / MiB:.1f} MiB"


class Method:
    """Base planner: a fixed plan checked against the profile."""

    name = "base"

    def __init__(self, cfg: MethodConfig, model: FedViT, profile: DeviceProfile | str | None = None, batch_size: int = 64, task: str | None = None, seed: int = 0):
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)  # for planners that draw (ALaST's layer sampling)
        self.model = model
        self.depth = model.depth
        self.num_patches = model.num_patches
        self.profile = get_profile(profile)
        self.batch_size = batch_size
        self.task = model.check_task(task)
        self.costs = CostModel(model, self.task)
        self._plan: Plan | None = None

    # -- budgets
    def memory_limit(self) -> float:
        return float(self.profile.memory_bytes)

    def memory_limit_source(self) -> str:
        """What sets `memory_limit()`, as an error message names it."""
        return f"the {self.profile.name} profile"

    def flops_limit(self) -> float:
        return float(self.profile.flops_per_sample)

    def estimate(self, plan: Plan) -> Cost:
        return self.costs.estimate(plan, self.batch_size)

    def fits(self, plan: Plan) -> bool:
        c = self.estimate(plan)
        return c.memory_bytes <= self.memory_limit() and c.train_flops_per_sample <= self.flops_limit()

    def why_not(self, plan: Plan) -> str:
        c = self.estimate(plan)
        parts = []
        if c.memory_bytes > self.memory_limit():
            parts.append(
                f"needs {_mb(c.memory_bytes)} (activations {_mb(c.activation_bytes)} + trainable state "
                f"{_mb(c.trainable_state_bytes)}) at batch {self.batch_size}, {self.memory_limit_source()} allows {_mb(self.memory_limit())}"
            )
        if c.train_flops_per_sample > self.flops_limit():
            parts.append(f"needs {c.train_flops_per_sample / 1e9:.2f} GFLOP per sample, the {self.profile.name} profile allows {self.flops_limit() / 1e9:.2f}")
        return "; ".join(parts)

    def _advice(self, plan: Plan) -> str:
        """What may make `plan` fit: a smaller batch shrinks activations but not FLOPs per sample."""
        c = self.estimate(plan)
        over_memory = c.memory_bytes > self.memory_limit()
        over_flops = c.train_flops_per_sample > self.flops_limit()
        ways = (["a smaller batch"] if over_memory else []) + ["a stronger profile"]
        if self.name != "alast":
            ways.append("the alast method" + (" (fewer trained blocks and dropped tokens cost fewer FLOPs)" if over_flops else ""))
        return "use " + ", ".join(ways[:-1]) + (" or " if len(ways) > 1 else "") + ways[-1]

    def base_plan(self) -> Plan:
        raise NotImplementedError

    def fit(self, plan: Plan) -> Plan:
        """Return `plan`, or a smaller one that fits (fit_to_profile), or raise PlanError."""
        original = plan
        while not self.fits(plan):
            if not self.cfg.fit_to_profile or self.name in ("full", "head") or not plan.trained:
                raise PlanError(f"no {self.name} plan fits device profile {self.profile.name!r}: {self.why_not(plan)}"
                                + ("" if plan is original else f" (even after reducing trained blocks to {sorted(plan.trained)})")
                                + "; " + self._advice(plan))
            trained = sorted(plan.trained)[1:]
            plan = replace(plan, trained=frozenset(trained))
        return plan

    def plan(self) -> Plan:
        if self._plan is None:
            self._plan = self.fit(self.base_plan())
        return self._plan

    def observe(self, trace: Trace) -> None:
        """Take what the last forward pass observed (adaptive methods use it)."""

    @property
    def importance(self) -> list[float] | None:
        return None

    def set_importance(self, importance: list[float]) -> None:
        """Start from importance found elsewhere (the federation's)."""

    @property
    def survey_batches(self) -> int:
        """Batches the trainer shows `survey` before training (0: no survey)."""
        return 0

    def survey(self, traces: list[Trace]) -> None:
        """Take what forward passes without autograd saw on the data before training."""

    def state_dict(self) -> dict:
        """What the planner learnt and a client keeps between rounds (empty: nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict`."""

    def inference_plan(self, drop: bool) -> Plan:
        """The plan a device evaluates with: no training; the method's tokens (`drop`) or every token.

        Methods whose model needs its own path at inference (SHERL's consolidation) keep it either way.
        """
        p = self.plan()
        keep = p.keep if drop else (None,) * self.depth
        return Plan(depth=self.depth, keep=keep, fuse=p.fuse, skip=p.skip, consolidate_at=p.consolidate_at, train_head=False, train_norm=False)

    @property
    def drops_tokens(self) -> bool:
        return any(k is not None and k < self.num_patches for k in self.plan().keep)

    def describe(self) -> dict:
        p = self.plan()
        return {"method": self.name, "trained": sorted(p.trained), "tokens": p.tokens(self.num_patches), "lora": p.lora, "profile": self.profile.name}


class Full(Method):
    name = "full"

    def base_plan(self) -> Plan:
        return Plan(depth=self.depth, trained=frozenset(range(self.depth)), train_embed=True)


class Head(Method):
    name = "head"

    def base_plan(self) -> Plan:
        # on a SHERL model the head sees the features the model is evaluated with: its consolidated path, frozen
        return Plan(depth=self.depth, trained=frozenset(), train_norm=False, consolidate_at=self.model.consolidate_at, train_consolidator=False)


class BSR(Method):
    name = "bsr"

    def base_plan(self) -> Plan:
        c = self.cfg.bsr
        trained = check_blocks(c.train_blocks if c.train_blocks is not None else scaled_blocks([3, 7, 11], self.depth), self.depth, "method.bsr.train_blocks")
        drops = check_blocks(c.drop_blocks if c.drop_blocks is not None else scaled_blocks([3, 6, 9], self.depth), self.depth, "method.bsr.drop_blocks")
        keep: list[int | None] = [None] * self.depth
        n = self.num_patches  # non-class tokens arriving (a fused token included, as in BSR's code)
        for b in drops:
            keep[b] = keep_count(c.keep_ratio, n)
            n = keep[b] + (1 if c.fuse else 0)
        return Plan(depth=self.depth, trained=frozenset(trained), keep=tuple(keep), fuse=c.fuse, lora=self.cfg.lora.enabled)


class SHERL(Method):
    name = "sherl"

    def base_plan(self) -> Plan:
        c = self.cfg.sherl
        merge_at = sherl_merge_at(self.cfg, self.depth)
        if self.model.consolidator is None:
            raise ConfigError("the sherl method needs the model prepared with prepare_model()")
        keep: list[int | None] = [None] * self.depth
        if c.keep_ratio < 1.0:
            keep[merge_at] = keep_count(c.keep_ratio, self.num_patches)
        late = frozenset(range(merge_at, self.depth)) if (self.cfg.lora.enabled or c.train_late) else frozenset()
        return Plan(depth=self.depth, trained=late, keep=tuple(keep), lora=self.cfg.lora.enabled, consolidate_at=merge_at)

    def fit(self, plan: Plan) -> Plan:
        if self.fits(plan):
            return plan
        over_memory = self.estimate(plan).memory_bytes > self.memory_limit()  # a smaller batch shrinks activations, not FLOPs per sample
        raise PlanError(f"no sherl plan fits device profile {self.profile.name!r}: {self.why_not(plan)}; tune fewer late blocks (method.sherl.tuned_blocks)"
                        + (" or use a smaller batch" if over_memory else " or use a stronger profile"))


class ALaST(Method):
    """Adaptive layer selection: per-step budgets from class-token deltas, top-K blocks trained."""

    name = "alast"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.cfg.alast
        self.budgets = np.full(self.depth, c.mean_budget, dtype=np.float64)
        self._importance: np.ndarray | None = None  # running estimate of the class-token deltas
        self._prior: np.ndarray | None = None  # the federation's importance, when given
        self._mem_cap: float | None = None
        self._fixed: frozenset[int] | None = None  # trained blocks kept for the round (reselect: round)
        self._last_delta: np.ndarray | None = None
        self.steps = 0

    def memory_limit(self) -> float:
        limit = float(self.profile.memory_bytes)
        frac = self.cfg.alast.memory_fraction
        if frac is not None:
            if self._mem_cap is None:
                full = Plan(depth=self.depth, trained=frozenset(range(self.depth)), train_embed=True)
                self._mem_cap = frac * self.costs.estimate(full, self.batch_size).memory_bytes
            limit = min(limit, self._mem_cap)
        return limit

    def memory_limit_source(self) -> str:
        frac = self.cfg.alast.memory_fraction
        if frac is not None and self.memory_limit() < self.profile.memory_bytes:
            return f"method.alast.memory_fraction {frac:g} (of full fine-tuning's estimate; the {self.profile.name} profile allows {_mb(self.profile.memory_bytes)})"
        return super().memory_limit_source()

    def _keep(self, budgets: np.ndarray) -> tuple[int, ...]:
        return tuple(keep_count(float(b), self.num_patches) for b in budgets)

    def _make(self, trained, keep: tuple[int, ...]) -> Plan:
        return Plan(depth=self.depth, trained=frozenset(trained), keep=keep, skip=True, lora=self.cfg.lora.enabled)

    def _select(self, keep: tuple[int, ...]) -> Plan:
        c = self.cfg.alast
        if self._fixed is not None:
            return self._make(self._fixed, keep)
        trained: list[int] = []
        if c.select == "sample":  # a weighted draw without replacement (Efraimidis-Spirakis keys u^(1/w))
            order = np.argsort(-(self.rng.random(self.depth) ** (1.0 / np.maximum(self.budgets, 1e-9))), kind="stable")
        elif c.select == "last":
            order = np.arange(self.depth)[::-1]
        else:
            order = np.argsort(-self.budgets, kind="stable")
        if c.shared_blocks and self._prior is not None:
            shared = set(np.argsort(-self._prior, kind="stable")[: c.k].tolist())
            order = np.array([b for b in order if int(b) in shared], dtype=np.int64)
        for b in order:
            if len(trained) == c.k:
                break
            if self.fits(self._make([*trained, int(b)], keep)):
                trained.append(int(b))
        return self._make(trained, keep)

    def plan(self) -> Plan:
        """The top-K blocks by budget that fit, each block keeping its budget's tokens; when no
        block fits at those token counts, fewer tokens everywhere (x0.8 a try) until one does;
        the head alone only when no block fits even then."""
        budgets = self.budgets.copy()
        head_only: Plan | None = None
        for _ in range(30):
            plan = self._select(self._keep(budgets))
            if self.fits(plan):
                if plan.trained or self.cfg.alast.k == 0 or self._fixed is not None:
                    return self._accept(plan)
                head_only = head_only or plan
            budgets = np.maximum(budgets * 0.8, 1.0 / self.num_patches)  # fewer tokens everywhere
        if head_only is not None:
            return self._accept(head_only)
        raise PlanError(f"no alast plan fits device profile {self.profile.name!r}, not even the head alone with one token per block: {self.why_not(plan)}")

    def _accept(self, plan: Plan) -> Plan:
        self._plan = plan
        if self.cfg.alast.reselect == "round":
            self._fixed = plan.trained
        return plan

    def observe(self, trace: Trace) -> None:
        if trace.cls_delta is None:
            return
        delta = trace.cls_delta.double().numpy()
        if not np.all(np.isfinite(delta)) or delta.sum() <= 0:
            return
        previous = self._importance
        self._importance = delta if previous is None else 0.9 * previous + 0.1 * delta
        if self.cfg.alast.adapt:
            self.budgets = self.follow(self.budgets, delta, self._last_delta)
        self._last_delta = delta
        self.steps += 1

    def follow(self, budgets: np.ndarray, delta: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
        """One budget update from this step's class-token deltas (and the previous step's).

        target: move towards importance-proportional budgets with the configured mean.
        delta: b <- clip(b + alpha * (Δ_t - Δ_{t-1}), min_budget, 1), the rule ALaST's
        public re-implementations use (no update on the first step).
        """
        c = self.cfg.alast
        if c.update == "delta":
            if previous is None:
                return budgets
            return np.clip(budgets + c.alpha * (delta - previous), c.min_budget, 1.0)
        target = self._normalize(delta / delta.mean() * c.mean_budget)
        return self._normalize((1.0 - c.rate) * budgets + c.rate * target)

    def _normalize(self, b: np.ndarray) -> np.ndarray:
        c = self.cfg.alast
        for _ in range(20):  # clip to [min, 1] and restore the mean
            b = np.clip(b, c.min_budget, 1.0)
            gap = c.mean_budget * len(b) - b.sum()
            free = b > c.min_budget if gap < 0 else b < 1.0  # lowering: blocks at 1.0 too, or the mean stays above
            if abs(gap) < 1e-9 or not free.any():
                break
            b = b + gap * free / free.sum()
        return np.clip(b, c.min_budget, 1.0)

    @property
    def importance(self) -> list[float] | None:
        return None if self._importance is None else [float(v) for v in self._importance]

    def _valid(self, values) -> np.ndarray | None:
        v = None if values is None else np.asarray(values, dtype=np.float64)
        return v if v is not None and v.shape == (self.depth,) and np.all(np.isfinite(v)) and v.sum() > 0 else None

    def _start(self, own: np.ndarray | None) -> None:
        """Budgets proportional to the importance (mean `mean_budget`): the client's own (`own`)
        and the federation's, weighted by `federation_weight`; blocks are chosen afresh. With
        `adapt: false` the budgets stay at `mean_budget` (the importance is still kept and sent)."""
        if not self.cfg.alast.adapt:
            return
        parts = [(1.0 - self.cfg.alast.federation_weight, own), (self.cfg.alast.federation_weight, self._prior)]
        parts = [(w, v / v.mean()) for w, v in parts if v is not None]
        if not parts:
            return
        if len(parts) == 1:
            mix = parts[0][1]
        else:
            mix = sum(w * v for w, v in parts) / max(sum(w for w, _ in parts), 1e-12)
        self.budgets = self._normalize(mix * self.cfg.alast.mean_budget)
        self._fixed = None

    def set_importance(self, importance: list[float]) -> None:
        """The federation's importance: budgets start from it and the client's own estimate."""
        imp = self._valid(importance)
        if imp is None:
            return
        self._prior = imp
        if self._importance is None:
            self._importance = imp.copy()
            self._start(None)
        else:
            self._start(self._importance)

    @property
    def survey_batches(self) -> int:
        return self.cfg.alast.survey_batches

    def survey(self, traces: list[Trace]) -> None:
        """Start the budgets from the class-token deltas measured now on the client's data
        (and the federation's importance, if given), instead of from the last ones kept."""
        deltas = [t.cls_delta.double().numpy() for t in traces if t.cls_delta is not None]
        observed = self._valid(np.mean(deltas, axis=0)) if deltas else None
        if observed is None:
            return
        self._importance = observed
        self._start(observed)

    def state_dict(self) -> dict:
        return {"budgets": [float(b) for b in self.budgets], "importance": self.importance}

    def load_state_dict(self, state: dict) -> None:
        budgets = state.get("budgets")
        if budgets is not None:
            b = np.asarray(budgets, dtype=np.float64)
            if b.shape == (self.depth,) and np.all(np.isfinite(b)):
                self.budgets = b
                self._fixed = None
        imp = state.get("importance")
        if imp is not None:
            imp = np.asarray(imp, dtype=np.float64)
            if imp.shape == (self.depth,) and np.all(np.isfinite(imp)):
                self._importance = imp

    def describe(self) -> dict:
        d = super().describe()
        d["budgets"] = [round(float(b), 3) for b in self.budgets]
        return d


METHODS: dict[str, type[Method]] = {m.name: m for m in (Full, Head, BSR, ALaST, SHERL)}


def make_method(cfg: MethodConfig, model: FedViT, profile: DeviceProfile | str | None = None, batch_size: int = 64, task: str | None = None, seed: int = 0) -> Method:
    """The planner for `cfg.name`, for a model already passed through `prepare_model`."""
    cfg.validate("method.")
    if batch_size < 1:
        raise ConfigError(f"train.batch_size: must be >= 1, got {batch_size}")
    method = METHODS[cfg.name](cfg, model, profile, batch_size, task, seed)
    method.plan()  # fail early with a clear error when nothing fits
    return method
