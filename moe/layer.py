"""The MoE MLP: E experts (timm Mlps), top-k routing with a capacity, per-task routers.

`MoEMlp.forward(x, task)` returns the output and an `MoEStats` (the
load-balancing loss, with grad, and the routing counts): nothing is kept on
the module between calls. Routing is computed once, in plain torch (`route`);
a backend only dispatches tokens to experts and combines their outputs, so
with the same weights and routing every backend gives the same output:

- native: gather each expert's tokens, run it, scatter-add the gated outputs
  (CPU and CUDA);
- tutel: tutel's fast dispatch kernels (`tutel.moe.fast_encode` /
  `fast_decode`) fed with our routing; used when `import tutel` works.

Router and expert parameters are separate groups (`router_parameters`,
`expert_parameters`), named `routers.<task>.weight` (or `router.weight` and
`task_embed.<task>` for the shared router) and `experts.<e>.fc1.weight` ..., so
the server can aggregate expert by expert and pruning can drop experts by index.
Optional shared experts (`shared_experts.<s>.…`, DeepSeekMoE / PLE) see every
token of every task beside the routed ones; pruning always keeps them.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from fedtune.errors import ConfigError
from fedtune.model import check_task_names
from fedtune.typedconfig import check_choices

Router = Literal["per_task", "shared"]
Priority = Literal["token", "gate"]
ROUTERS: tuple[str, ...] = get_args(Router)
BACKEND_NAMES = ("native", "tutel", "auto")


@functools.cache
def tutel_problem() -> str | None:
    """Why tutel cannot serve as a backend here (None when it can): not importable (its
    import may fail in many ways, e.g. an old build asserting CUDA), or older than 0.2 (no
    fast_encode, and a dispatcher that compiles kernels per instance)."""
    try:
        from tutel import moe as tutel_moe
    except Exception as exc:  # noqa: BLE001 - any failure to import means: not usable
        return f"tutel is not importable ({type(exc).__name__}: {exc})"
    update = getattr(getattr(tutel_moe, "fast_dispatcher", None), "update", None)
    try:
        ok = hasattr(tutel_moe, "fast_encode") and update is not None and "capacity" in inspect.signature(update).parameters
    except (TypeError, ValueError):
        ok = False
    if not ok:
        return "this tutel is older than 0.2 (no tutel.moe.fast_encode, or a dispatcher without a per-call capacity)"
    return None


def tutel_available() -> bool:
    """Whether tutel can serve as a backend here (importable, a version fedtune can call)."""
    return tutel_problem() is None


def resolve_backend(name: str, key: str = "backend") -> str:
    """'auto' -> 'tutel' when usable, else 'native'; 'tutel' where it is not usable falls back
    to 'native' with a warning (the same weights and outputs: a run or an export made with
    tutel still loads where tutel is missing); an unknown name is a ConfigError."""
    if name not in BACKEND_NAMES:
        raise ConfigError(f"{key}: unknown MoE backend {name!r}; choose from {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        return "tutel" if tutel_available() else "native"
    if name == "tutel" and not tutel_available():
        warnings.warn(f"{key}: 'tutel' is not usable here ({tutel_problem()}): using 'native', which gives the same outputs", stacklevel=2)
        return "native"
    return name


@dataclass
class MoEConfig:
    num_experts: int = 8  # experts per MoE block
    top_k: int = 2  # experts each token is sent to
    capacity_factor: float | None = 1.25  # training: capacity = ceil(f * tokens * top_k / E) per expert; None: no limit
    eval_capacity_factor: float | None = None  # the same at inference (None: no limit, so no prediction depends on the rest of the batch)
    blocks: list[int] | None = None  # MoE blocks (None: every other block from 1: 1, 3, 5, ...)
    router: Router = "per_task"  # per_task: one router per task | shared: one router over [token, task embedding]
    task_embed_dim: int = 16  # shared router: size of the task embedding
    aux_loss_weight: float = 0.01  # weight of the load-balancing loss in the training loss
    backend: str = "native"  # native | tutel | auto (tutel when importable, else native)
    train_experts: int | None = None  # per trained MoE block, train only the N experts the task routes most tokens to (None: every routed expert)
    shared_experts: int = 0  # experts every token also goes through, trained by every task (DeepSeekMoE's shared experts, PLE's shared tower); output = (shared + routed mixture) / (shared_experts + 1), so an upcycled layer still equals the dense MLP
    priority: Priority = "token"  # which assignments get an expert's slots first when it is over capacity: token: token order (GShard; the batch's last images lose theirs) | gate: the tokens the router is surest of first (V-MoE's batch-prioritized routing)
    task_prior: float = 0.0  # per_task routers: > 0 gives each router a bias, starting at this logit bonus on the task's own group of experts (the experts split evenly over the tasks, in order) and 0 elsewhere, so tasks begin on different experts (use capacity_factor None with it: the capacity assumes tokens spread over all experts); 0: bias-free routers

    def validate(self, prefix: str = "") -> None:
        if self.num_experts < 1:
            raise ConfigError(f"{prefix}num_experts: must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"{prefix}top_k: must be in 1..num_experts ({self.num_experts}), got {self.top_k}")
        check_choices(self, prefix)
        if self.train_experts is not None and not 1 <= self.train_experts <= self.num_experts:
            raise ConfigError(f"{prefix}train_experts: must be in 1..num_experts ({self.num_experts}) or null, got {self.train_experts}")
        if self.shared_experts < 0:
            raise ConfigError(f"{prefix}shared_experts: must be >= 0, got {self.shared_experts}")
        if self.task_embed_dim < 1:
            raise ConfigError(f"{prefix}task_embed_dim: must be >= 1, got {self.task_embed_dim}")
        if self.aux_loss_weight < 0:
            raise ConfigError(f"{prefix}aux_loss_weight: must be >= 0, got {self.aux_loss_weight}")
        if not (math.isfinite(self.task_prior) and self.task_prior >= 0):
            raise ConfigError(f"{prefix}task_prior: must be a finite number >= 0, got {self.task_prior}")
        for key in ("capacity_factor", "eval_capacity_factor"):
            f = getattr(self, key)
            if f is not None and not (math.isfinite(f) and f > 0):
                raise ConfigError(f"{prefix}{key}: must be a finite number > 0 or null (no limit), got {f}")
        if self.task_prior > 0 and self.router != "per_task":
            raise ConfigError(f"{prefix}task_prior: needs router: per_task (got router: {self.router})")
        for key in ("capacity_factor", "eval_capacity_factor"):
            f = getattr(self, key)
            if self.task_prior > 0 and f is not None:
                raise ConfigError(
                    f"{prefix}{key}: {f} with task_prior {self.task_prior}: the capacity assumes tokens "
                    "spread over all experts, but the prior sends each task's tokens to its own group, which would overflow and "
                    f"drop most of them; set {key}: null (no limit) with a task prior"
                )
        if self.top_k == 1 and self.task_prior == 0 and self.aux_loss_weight == 0:
            raise ConfigError(
                f"{prefix}aux_loss_weight: 0 with top_k 1 and no task_prior leaves the routers untrainable: with one expert "
                "per token the gate is exactly 1 (so an upcycled layer equals its dense MLP), and only the load-balancing "
                "loss trains a router; give aux_loss_weight > 0, top_k >= 2, or a task_prior (task-level routing)"
            )
        if self.blocks is not None and any(b < 0 for b in self.blocks):
            raise ConfigError(f"{prefix}blocks: block indices must be >= 0, got {self.blocks}")
        if self.backend not in BACKEND_NAMES:
            raise ConfigError(f"{prefix}backend: unknown MoE backend {self.backend!r}; choose from {', '.join(BACKEND_NAMES)}")


@dataclass
class MoEStats:
    """What one MoE layer's forward pass did (counts are detached)."""

    aux_loss: torch.Tensor  # scalar load-balancing loss E * sum_e f_e * P_e (with grad through P)
    expert_counts: torch.Tensor  # [E] long: token assignments routed to each expert (before capacity)
    dropped: torch.Tensor  # [E] long: of those, the ones over the expert's capacity (not processed)

    @property
    def processed(self) -> torch.Tensor:
        return self.expert_counts - self.dropped


@dataclass
class Routing:
    """Every token's top-k experts, gates and slots; the same for every backend."""

    indices: torch.Tensor  # [T, k] long: chosen experts, best first
    gates: torch.Tensor  # [T, k] float: softmax over the chosen logits (= full softmax renormalised over the top-k)
    locations: torch.Tensor  # [T, k] long: the assignment's slot in its expert's buffer
    kept: torch.Tensor  # [T, k] bool: location < capacity
    capacity: int | None  # slots per expert (None: no limit)
    num_experts: int


def capacity(factor: float | None, tokens: int, top_k: int, num_experts: int) -> int | None:
    """Slots per expert: ceil(factor * tokens * top_k / num_experts); None (no limit) for a factor None or <= 0."""
    if factor is None or factor <= 0:
        return None
    return max(1, math.ceil(factor * tokens * top_k / num_experts))


def route(logits: torch.Tensor, top_k: int, cap: int | None, priority: str = "token") -> tuple[Routing, MoEStats]:
    """Top-k routing of [T, E] router logits with a per-expert capacity, and its statistics.

    Slots are given in a fixed order: every token's first choice before any
    token's second choice, and so on (GShard, tutel), so the assignments over
    capacity are the low-priority ones and the result is deterministic. Within a
    choice, tokens go in token order (`priority` "token") or, "gate", by their
    highest router probability, the surest first (V-MoE's batch-prioritized
    routing: a full expert drops the tokens it matters least to, wherever they
    are in the batch).
    """
    logits = logits.float()
    T, E = logits.shape
    top_logits, indices = logits.topk(top_k, dim=-1)
    order = None
    if priority == "gate" and cap is not None:
        order = torch.argsort(logits.detach().softmax(dim=-1).amax(dim=-1), descending=True, stable=True)
    # top-1: the gate is exactly 1 and carries no gradient; leaving the logits out of it keeps
    # the router's grad None (not a zero tensor), so a router only the task loss would
    # train is neither counted as updated, nor sent, nor decayed by AdamW
    gates = top_logits.softmax(dim=-1) if top_k > 1 else torch.ones_like(top_logits)
    ranked = indices if order is None else indices[order]
    onehot = F.one_hot(ranked.t().reshape(-1), E)  # [k*T, E], rank-major
    slot = onehot.cumsum(dim=0) - 1
    locations = (slot * onehot).sum(dim=-1).view(top_k, T).t()
    if order is not None:  # back to token order
        locations = torch.empty_like(locations).index_copy_(0, order, locations)
    kept = locations < cap if cap is not None else torch.ones_like(locations, dtype=torch.bool)

    counts = onehot.sum(dim=0)
    fraction = counts.float() / (T * top_k)  # f_e: share of the assignments
    mean_prob = logits.softmax(dim=-1).mean(dim=0)  # P_e: mean router probability
    aux = E * (fraction * mean_prob).sum()
    dropped = counts - torch.bincount(indices[kept], minlength=E)
    routing = Routing(indices, gates, locations, kept, cap, E)
    return routing, MoEStats(aux, counts.detach(), dropped.detach())


# --------------------------------------------------------------------------- backends


def native_combine(x: torch.Tensor, experts: nn.ModuleList, r: Routing) -> torch.Tensor:
    """sum_k gate_k * expert_k(x) per token, in plain torch: gather, run each expert, scatter-add."""
    T, k = r.indices.shape
    token = torch.arange(T, device=x.device).unsqueeze(1).expand(T, k)[r.kept]
    expert = r.indices[r.kept]
    gate = r.gates[r.kept]
    order = torch.argsort(expert, stable=True)
    token, gate = token[order], gate[order]
    sizes = torch.bincount(expert, minlength=r.num_experts).tolist()
    out = x.new_zeros(x.shape)
    for e, (t, g) in enumerate(zip(token.split(sizes), gate.split(sizes), strict=True)):
        if t.numel():
            y = experts[e](x[t]) * g.unsqueeze(-1)
            out.index_add_(0, t, y.to(out.dtype))
    return out


def tutel_combine(x: torch.Tensor, experts: nn.ModuleList, r: Routing) -> torch.Tensor:
    """The same as `native_combine`, with tutel's fast dispatch kernels (tutel >= 0.2).

    tutel's dispatcher takes, per choice, every token's expert, its slot in that expert's
    buffer and its gate; its kernels skip an assignment whose slot is >= capacity, which is
    how ours marks the dropped ones. Slots fill from 0, so expert e's tokens are the first
    n_e rows of its buffer: only those rows go through it, and an expert that got no token
    is not run at all (no gradient, as with the native backend).
    """
    from tutel import moe as tutel_moe

    T, k = r.indices.shape
    cap = r.capacity if r.capacity is not None else int(r.locations.max()) + 1
    if r.capacity is None and r.num_experts * cap > 2 * T * k:
        # no capacity and skewed routing: tutel's buffer holds E times the busiest expert's load
        # (kept for the backward pass), over twice the T * k rows the native backend moves; the
        # native backend gives the same output
        return native_combine(x, experts, r)
    dispatcher = tutel_moe.fast_dispatcher(r.num_experts, cap, x.shape[-1], x.dtype)
    dispatcher.update(
        [r.indices[:, j].to(torch.int32).contiguous() for j in range(k)],
        [r.locations[:, j].to(torch.int32).contiguous() for j in range(k)],
        [r.gates[:, j].contiguous() for j in range(k)],
        capacity=cap,
    )
    dispatched = dispatcher.encode(x.contiguous()).view(r.num_experts, cap, -1)
    sizes = torch.bincount(r.indices[r.kept], minlength=r.num_experts).clamp(max=cap).tolist()
    y = torch.stack([F.pad(experts[e](dispatched[e, :n]), (0, 0, 0, cap - n)) if n else dispatched.new_zeros(cap, dispatched.shape[-1]) for e, n in enumerate(sizes)])
    return dispatcher.decode(y.contiguous()).view(x.shape).to(x.dtype)


Combine = Callable[[torch.Tensor, nn.ModuleList, Routing], torch.Tensor]
BACKENDS: dict[str, Combine] = {"native": native_combine, "tutel": tutel_combine}


# --------------------------------------------------------------------------- the layer


class MoEMlp(nn.Module):
    """An MLP of `len(experts)` experts with top-k routing, one router per task (or one shared)."""

    def __init__(
        self,
        experts: Sequence[nn.Module],
        dim: int,
        tasks: Sequence[str],
        cfg: MoEConfig,
        capacity_experts: int | None = None,
        shared: Sequence[nn.Module] = (),
    ):
        super().__init__()
        num_experts = len(experts)
        cfg.validate("moe.")
        if not tasks:
            raise ConfigError("an MoE layer needs at least one task")
        check_task_names(tasks)
        if not 1 <= cfg.top_k <= num_experts:  # a pruned layer has fewer experts than cfg.num_experts
            raise ConfigError(f"moe.top_k: must be in 1..num_experts ({num_experts}), got {cfg.top_k}")
        self.experts = nn.ModuleList(experts)
        self.shared_experts = nn.ModuleList(shared)  # always-on experts (`shared_experts.<s>.…`), outside the routing
        self.num_experts = num_experts
        self.expert_ids = list(range(num_experts))  # each expert's index in the layer it was pruned from
        self.top_k = cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.eval_capacity_factor = cfg.eval_capacity_factor
        self.priority = cfg.priority
        # The expert count the capacity formula divides by: a pruned layer keeps its
        # parent's, so it drops exactly the same assignments.
        self.capacity_experts = capacity_experts or num_experts
        self.backend = resolve_backend(cfg.backend, "moe.backend")
        self.router_kind = cfg.router
        if cfg.router == "per_task":
            prior = cfg.task_prior > 0
            self.routers = nn.ModuleDict({t: nn.Linear(dim, num_experts, bias=prior) for t in tasks})
            if prior:
                if len(tasks) > num_experts:
                    raise ConfigError(f"moe.task_prior: {len(tasks)} tasks but {num_experts} experts: every task needs an expert of its own to start on")
                with torch.no_grad():
                    groups = torch.arange(num_experts).tensor_split(len(tasks))
                    for t, group in zip(tasks, groups, strict=True):
                        self.routers[t].bias.zero_()
                        self.routers[t].bias[group] = cfg.task_prior
        else:
            self.router = nn.Linear(dim + cfg.task_embed_dim, num_experts, bias=False)
            self.task_embed = nn.ParameterDict({t: nn.Parameter(torch.randn(cfg.task_embed_dim)) for t in tasks})

    @classmethod
    def upcycle(cls, mlp: nn.Module, dim: int, tasks: Sequence[str], cfg: MoEConfig) -> MoEMlp:
        """An MoE layer whose experts all start as copies of the dense `mlp` (sparse upcycling)."""
        copies = [copy.deepcopy(mlp) for _ in range(cfg.num_experts + cfg.shared_experts)]
        return cls(copies[: cfg.num_experts], dim, tasks, cfg, shared=copies[cfg.num_experts :])

    @classmethod
    def fresh(cls, dim: int, hidden: int, tasks: Sequence[str], cfg: MoEConfig) -> MoEMlp:
        """An MoE layer of newly initialised timm Mlps."""
        mlps = [Mlp(dim, hidden) for _ in range(cfg.num_experts + cfg.shared_experts)]
        return cls(mlps[: cfg.num_experts], dim, tasks, cfg, shared=mlps[cfg.num_experts :])

    @property
    def num_shared(self) -> int:
        return len(self.shared_experts)

    @property
    def tasks(self) -> list[str]:
        return list(self.routers if self.router_kind == "per_task" else self.task_embed)

    def check_task(self, task: str | None) -> str:
        if task is None:
            raise ConfigError(
                "an MoE MLP routes per task: call it as mlp(x, task) (MoEViT.forward / moe.vit.moe_forward do)"
            )
        if task not in self.tasks:
            raise ConfigError(f"unknown task {task!r} for this MoE layer; it has routers for: {', '.join(self.tasks)}")
        return task

    def router_logits(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """[T, E] router logits for tokens x [T, D]."""
        if self.router_kind == "per_task":
            return self.routers[task](x)
        emb = self.task_embed[task].to(x.dtype).expand(x.shape[0], -1)
        return self.router(torch.cat([x, emb], dim=-1))

    def forward(self, x: torch.Tensor, task: str | None = None) -> tuple[torch.Tensor, MoEStats]:
        """x [..., D] -> (output [..., D], routing statistics) for `task`'s router."""
        task = self.check_task(task)
        flat = x.reshape(-1, x.shape[-1])
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        cap = capacity(factor, flat.shape[0], self.top_k, self.capacity_experts)
        routing, stats = route(self.router_logits(flat, task), self.top_k, cap, self.priority)
        out = BACKENDS[self.backend](flat, self.experts, routing)
        if self.num_shared:
            out = (out + sum(expert(flat) for expert in self.shared_experts)) / (self.num_shared + 1)
        return out.view(x.shape), stats

    def router_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the router(s) and task embeddings."""
        return ((n, p) for n, p in self.named_parameters() if not n.startswith(("experts.", "shared_experts.")))

    def expert_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the routed experts (`experts.<e>.…`) and the shared ones (`shared_experts.<s>.…`)."""
        return ((n, p) for n, p in self.named_parameters() if n.startswith(("experts.", "shared_experts.")))

    def pruned(self, task: str, experts: Sequence[int], reduce_top_k: bool = False) -> MoEMlp:
        """A copy with only `task`'s router and the given experts (router rows sliced to match);
        shared experts are kept.

        Softmax-then-renormalise over the top-k depends on the top-k logits
        only, so as long as every token's top-k experts are kept the copy
        routes and gates exactly as the original.
        """
        task = self.check_task(task)
        ids = sorted(set(experts))
        if not ids or ids[0] < 0 or ids[-1] >= self.num_experts:
            raise ConfigError(f"expert ids {list(experts)} out of range for {self.num_experts} experts")
        if len(ids) < self.top_k and not reduce_top_k:
            raise ConfigError(f"keeping {len(ids)} expert(s), fewer than top_k {self.top_k}")
        out = copy.deepcopy(self)
        out.top_k = min(self.top_k, len(ids))
        out.experts = nn.ModuleList(out.experts[e] for e in ids)
        out.num_experts = len(ids)
        out.expert_ids = [self.expert_ids[e] for e in ids]
        router = out.routers[task] if self.router_kind == "per_task" else out.router
        rows = torch.tensor(ids, device=router.weight.device)
        router.weight = nn.Parameter(router.weight.detach()[rows].clone())
        if router.bias is not None:
            router.bias = nn.Parameter(router.bias.detach()[rows].clone())
        router.out_features = len(ids)
        if self.router_kind == "per_task":
            out.routers = nn.ModuleDict({task: router})
        else:
            out.task_embed = nn.ParameterDict({task: out.task_embed[task]})
        return out

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, shared={self.num_shared}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
            f"router={self.router_kind}, backend={self.backend}"
        )


def total_aux_loss(stats: Sequence[MoEStats], weight: float) -> torch.Tensor | None:
    """weight * the sum of the layers' load-balancing losses (None when there are none)."""
    if not stats or weight == 0:  # none: the routers get no gradient from it, not a zero one
        return None
    return weight * torch.stack([s.aux_loss for s in stats]).sum()
