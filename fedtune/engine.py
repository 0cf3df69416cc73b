"""The engine: one forward pass of a FedViT under a plan.

A `Plan` says, for one step, which blocks train (fully or through LoRA
adapters), how many patch tokens survive each block, and where SHERL's
consolidation sits. Everything before the first trained block runs under
`torch.no_grad()`, so it saves no activations; frozen blocks after it let
gradients through but get none. Tokens are ranked by the class token's
attention averaged over heads, computed as one extra attention row next to the
fused (scaled_dot_product_attention) kernel, and dropped after the block's
attention (before its MLP), as EViT and BSR do.

`set_trainable` is the single owner of `requires_grad`; the update a client
sends is derived from it (the parameters that trained and received a gradient in a step,
`TrainResult.update_counts`).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, PlanError
from .lora import has_lora, is_lora_name

if TYPE_CHECKING:  # annotations only: the model module imports this one
    from .model import FedViT


@dataclass(frozen=True)
class Plan:
    """What one training step does."""

    depth: int  # blocks in the model
    trained: frozenset[int] = frozenset()  # blocks whose weights (or LoRA adapters) train
    keep: tuple[int | None, ...] = ()  # per block: tokens kept (None: all); see `skip` for which
    fuse: bool = False  # fuse dropped tokens into one token weighted by class-token attention
    skip: bool = False  # keep[i] patch tokens (of all N) go through block i, the rest skip it unchanged (ALaST)
    lora: bool = False  # trained blocks train LoRA adapters only
    train_head: bool = True  # the task head trains
    train_norm: bool = True  # the final norm trains
    train_embed: bool = False  # patch/position embeddings and class token train
    consolidate_at: int | None = None  # SHERL: blocks < this run without autograd and are consolidated
    train_consolidator: bool = True  # SHERL: the consolidator trains (False: the model's path, frozen, e.g. a head-only plan)
    rank_tokens: bool = False  # compute class-token attention at every block (for statistics)
    experts: tuple[tuple[int, tuple[int, ...]], ...] = ()  # MoE: (block, experts that train); blocks not listed train every expert

    def __post_init__(self) -> None:
        keep = tuple(self.keep) or (None,) * self.depth
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "trained", frozenset(self.trained))
        if len(keep) != self.depth:
            raise PlanError(f"plan.keep has {len(keep)} entries for a model of depth {self.depth}")
        bad = sorted(b for b in self.trained if not 0 <= b < self.depth)
        if bad:
            raise PlanError(f"trained block index {bad[0]} out of range for a model of depth {self.depth} (valid: 0..{self.depth - 1})")
        for i, k in enumerate(keep):
            if k is not None and k < 1:
                raise PlanError(f"plan.keep[{i}] = {k}: at least one patch token must survive")
        if self.consolidate_at is not None:
            if not 1 <= self.consolidate_at < self.depth:
                raise PlanError(f"consolidate_at {self.consolidate_at} must be in 1..{self.depth - 1}")
            early = sorted(b for b in self.trained if b < self.consolidate_at)
            if early:
                raise PlanError(f"SHERL: block {early[0]} is before the consolidation point {self.consolidate_at} and cannot train")
            if any(k is not None for k in keep[: self.consolidate_at]):
                raise PlanError("SHERL: tokens cannot be dropped before the consolidation point")

    @property
    def first_grad(self) -> int:
        """Index of the first block that needs autograd (depth: none; -1: the embeddings train)."""
        if self.train_embed:
            return -1
        starts = list(self.trained)
        if self.trains_consolidator:
            starts.append(self.consolidate_at)
        return min(starts) if starts else self.depth

    @property
    def trains_consolidator(self) -> bool:
        """Whether SHERL's consolidator is on the path and trains."""
        return self.consolidate_at is not None and self.train_consolidator

    def trains_expert(self, block: int, expert: int) -> bool:
        """Whether expert `expert` of trained MoE block `block` may train under this plan."""
        for b, allowed in self.experts:
            if b == block:
                return expert in allowed
        return True

    def block_mode(self, block: int) -> str:
        """'train', 'grad' (frozen, gradients pass through) or 'nograd'. A frozen block at
        first_grad is SHERL's at the consolidation point: it runs with autograd, so the
        gradient reaches the consolidator."""
        if block in self.trained:
            return "train"
        return "grad" if block >= self.first_grad else "nograd"

    def needs_input_grad(self, block: int) -> bool:
        """Whether the backward pass computes the gradient of block `block`'s input: something
        before it trains (an earlier block, the embeddings, SHERL's consolidator)."""
        return block > self.first_grad or (self.trains_consolidator and block == self.consolidate_at)

    def tokens(self, num_patches: int) -> list[int]:
        """Non-class tokens each block's MLP processes (a fused token included).

        Dropping (skip False, BSR/EViT): block i keeps keep[i] of the non-class tokens that
        arrive (a token fused earlier among them), after its attention, and adds a fused
        token when `fuse`; dropped tokens are gone for the later blocks. Skipping (ALaST):
        block i processes keep[i] of all N patch tokens and the others pass it unchanged,
        so every block's count is its own.
        """
        out, n = [], num_patches
        for k in self.keep:
            if self.skip:
                out.append(num_patches if k is None else min(k, num_patches))
                continue
            if k is not None and k < n:
                n = k + (1 if self.fuse else 0)
            out.append(n)
        return out


@dataclass
class Trace:
    """What a forward pass observed (all detached)."""

    cls_delta: torch.Tensor | None = None  # [depth] mean ||CLS_l - CLS_{l-1}||^2 over the batch
    tokens_in: list[int] = field(default_factory=list)  # tokens entering each block (incl. class/fused)
    kept_index: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> kept patch indices [B, k]
    cls_attn: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> [B, n] attention (when ranked)
    extra: dict = field(default_factory=dict)  # what model variants add (the MoE ViT: expert counts per block)
    aux_loss: torch.Tensor | None = None  # a loss the forward adds for training (the MoE ViT: load balancing)


def class_token_attention(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the class token over all tokens, averaged over heads: [B, N].

    One extra row of attention beside the fused kernel: O(N) per head instead of O(N^2).
    """
    with torch.no_grad():
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
        return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def _attention(attn: nn.Module, x: torch.Tensor, want_rank: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm Attention's computation, keeping q/k to rank tokens by the class token's attention."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.attn_drop.training else 0.0)
    rank = class_token_attention(attn, q, k) if want_rank else None
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), rank


def take_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b]] for every batch row b: [B, N, C] and [B, K] -> [B, K, C].

    Advanced indexing keeps only the [B, K] index for backward; `gather` with the index
    expanded over the channels saves a [B, K, C] int64 copy of it (3 MiB per block at batch
    64, 40 tokens, width 192: more than the cost model counts for a block)."""
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    return x[rows, index]


def drop_tokens(
    x: torch.Tensor, cls_attn: torch.Tensor, keep: int, fuse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the class token and the `keep` non-class tokens with the highest class-token attention.

    A token fused by an earlier block is ranked like any other. With `fuse`, the
    dropped tokens are merged into one token appended at the end: their sum weighted by
    the (unnormalised) class-token attention, as BSR's and EViT's code do. Returns the
    new tokens and the kept indices (into the non-class tokens).
    """
    B, N, C = x.shape
    scores = cls_attn[:, 1:]
    index = scores.topk(keep, dim=1, sorted=True).indices
    kept = take_tokens(x[:, 1:], index)
    parts = [x[:, :1], kept]
    if fuse and keep < N - 1:
        weights = scores.scatter(1, index, 0.0)  # the dropped tokens' attention, kept ones zeroed
        parts.append((weights.unsqueeze(-1) * x[:, 1:]).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1), index


def block_forward(
    block: nn.Module, x: torch.Tensor, keep: int | None, fuse: bool, want_rank: bool, mlp: Callable | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One timm Block, with optional token dropping between attention and MLP; `mlp` replaces
    the call of `block.mlp` (the MoE ViT passes one that routes with a task)."""
    drop = keep is not None and keep < x.shape[1] - 1
    attn_out, cls_attn = _attention(block.attn, block.norm1(x), want_rank or drop)
    x = x + block.drop_path1(block.ls1(attn_out))
    index = None
    if drop:
        x, index = drop_tokens(x, cls_attn, keep, fuse)
    x = x + block.drop_path2(block.ls2((mlp or block.mlp)(block.norm2(x))))
    return x, cls_attn, index


def qkv_weight(qkv: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias the attention's qkv projection applies: a peft LoRA layer's base
    weight plus its active adapters' delta (unless merged into it already or disabled)."""
    base = qkv.get_base_layer() if hasattr(qkv, "get_base_layer") else qkv
    w = base.weight
    if base is not qkv and not getattr(qkv, "merged", False) and not getattr(qkv, "disable_adapters", False):
        for name in qkv.active_adapters:
            if name in getattr(qkv, "lora_A", {}):
                w = w + qkv.get_delta_weight(name).to(w.dtype)
    return w, base.bias


@torch.no_grad()
def rank_for_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The class token's attention over all tokens as `block` would compute it: [B, N].

    Only the class token's query and every token's key are projected (no values, no
    output): the cost of choosing which tokens go through the block.
    """
    attn = block.attn
    h = block.norm1(x)
    B, N, D = h.shape
    dim = attn.num_heads * attn.head_dim
    w, b = qkv_weight(attn.qkv)
    q = F.linear(h[:, :1], w[:dim], None if b is None else b[:dim])
    k = F.linear(h, w[dim : 2 * dim], None if b is None else b[dim : 2 * dim])
    q = attn.q_norm(q.reshape(B, 1, attn.num_heads, attn.head_dim).transpose(1, 2))
    k = attn.k_norm(k.reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2))
    return class_token_attention(attn, q, k)


def skip_block(run: Callable, block: nn.Module, i: int, x: torch.Tensor, keep: int, want_rank: bool):
    """ALaST's token budget: the `keep` patch tokens the class token attends to most go through
    the block with the class token; the others skip it unchanged and rejoin in place."""
    B, N, C = x.shape
    index = rank_for_block(block, x)[:, 1:].topk(keep, dim=1, sorted=False).indices.sort(dim=1).values
    pos = torch.cat([torch.zeros(B, 1, dtype=index.dtype, device=index.device), index + 1], dim=1)
    sub = take_tokens(x, pos)
    out, cls_attn, _ = run(block, i, sub, None, False, want_rank)
    return x.scatter(1, pos.unsqueeze(-1).expand(-1, -1, C), out), cls_attn, index


ScopeFn = Callable[[str], contextlib.AbstractContextManager]


def no_scope(_: str) -> contextlib.AbstractContextManager:
    """The scope function that wraps nothing (no per-stage accounting)."""
    return contextlib.nullcontext()


def forward_features(
    model: FedViT,
    images: torch.Tensor,
    plan: Plan,
    task: str | None = None,
    trace: Trace | None = None,
    scope: ScopeFn = no_scope,
    block_fn: Callable | None = None,
) -> torch.Tensor:
    """Pre-logit features of `images` (after the final norm and pooling), computed as `plan` says.

    `scope(name)` wraps each stage (for per-block accounting); `block_fn` replaces
    `block_forward` (the MoE ViT passes its task along); what the pass observed goes into
    `trace` when it is given.
    """
    vit = model.vit
    task = model.check_task(task)
    if plan.depth != model.depth:
        raise PlanError(f"plan is for depth {plan.depth}, the model has {model.depth} blocks")
    grad_on = torch.is_grad_enabled()
    first = plan.first_grad
    run_block = block_fn or model.block_fn(task) or (lambda blk, i, x, keep, fuse, rank: block_forward(blk, x, keep, fuse, rank))
    want_rank = trace is not None and plan.rank_tokens

    with torch.set_grad_enabled(grad_on and first < 0), scope("embed"):
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)

    early: list[torch.Tensor] = [x] if plan.consolidate_at is not None else []  # SHERL: the embedding output first
    deltas = []
    for i, blk in enumerate(vit.blocks):
        if plan.consolidate_at is not None and i == plan.consolidate_at:
            with torch.set_grad_enabled(grad_on and plan.trains_consolidator), scope("consolidate"):
                x = model.consolidator(early)
            early = []
        if trace is not None:
            trace.tokens_in.append(x.shape[1])
        prev_cls = x[:, 0].detach()
        with torch.set_grad_enabled(grad_on and i >= first), scope(f"block{i}"):
            keep = plan.keep[i]
            if plan.skip and keep is not None and keep < x.shape[1] - 1:
                x, cls_attn, index = skip_block(run_block, blk, i, x, keep, want_rank)
            else:
                x, cls_attn, index = run_block(blk, i, x, None if plan.skip else keep, plan.fuse, want_rank)
        if plan.consolidate_at is not None and i < plan.consolidate_at:
            early.append(x)
        if trace is not None:
            deltas.append((x[:, 0].detach() - prev_cls).pow(2).sum(-1).mean())
            if index is not None:
                trace.kept_index[i] = index
            if cls_attn is not None and want_rank:
                trace.cls_attn[i] = cls_attn
    if trace is not None:
        trace.cls_delta = torch.stack(deltas).float().cpu()

    with torch.set_grad_enabled(grad_on), scope("head"):
        return vit.forward_head(vit.norm(x), pre_logits=True)


def forward_plan(
    model: FedViT,
    images: torch.Tensor,
    plan: Plan,
    task: str | None = None,
    trace: Trace | None = None,
    scope: ScopeFn = no_scope,
    block_fn: Callable | None = None,
) -> torch.Tensor:
    """Logits of `task` for `images` under `plan`: `forward_features`, then the task's head."""
    task = model.check_task(task)
    feats = forward_features(model, images, plan, task, trace, scope, block_fn)
    with scope("head"):
        return model.heads[task](feats)



# --------------------------------------------------------------------------- trainability


_BLOCK = re.compile(r"^vit\.blocks\.(\d+)\.")
_EXPERT = re.compile(r"\.mlp\.(shared_)?experts\.(\d+)\.")
_EMBED = ("vit.patch_embed", "vit.pos_embed", "vit.cls_token", "vit.reg_token", "vit.norm_pre")


def expert_of(name: str) -> int | None:
    """The expert index in an MoE expert parameter's name (`...mlp.experts.<e>...`), else None."""
    m = _EXPERT.search(name)
    return int(m.group(2)) if m and not m.group(1) else None


def is_router_name(name: str) -> bool:
    """An MoE router or task embedding (`vit.blocks.<i>.mlp.routers.<task>...`, `...mlp.router.`, `...mlp.task_embed.`)."""
    return ".mlp.router" in name or ".mlp.task_embed." in name


@dataclass(frozen=True)
class ParamGroup:
    """Which named group a parameter belongs to: what `set_trainable`, the optimizer and a
    client's update all read."""

    kind: str  # embed | block | norm | head | consolidator | other
    block: int | None = None  # kind block: its index
    task: str | None = None  # kind head: its task
    expert: int | None = None  # a routed MoE expert's index (shared experts: None)
    router: bool = False  # an MoE router or task embedding
    lora: bool = False  # a LoRA adapter
    vector: bool = False  # one-dimensional (a bias or a norm's scale) or a learnt token/position

    @property
    def decays(self) -> bool:
        """Whether weight decay applies when `train.decay_all` is off (timm's rule: not on biases,
        norms, tokens and position embeddings)."""
        return not self.vector


def param_group(name: str, p: nn.Parameter) -> ParamGroup:
    vector = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token"))
    lora, router = is_lora_name(name), is_router_name(name)
    m = _BLOCK.match(name)
    if m:
        return ParamGroup("block", block=int(m.group(1)), expert=expert_of(name), router=router, lora=lora, vector=vector)
    if name.startswith("heads."):
        return ParamGroup("head", task=name.split(".")[1], vector=vector)
    if name.startswith(("vit.norm.", "vit.fc_norm.")):
        return ParamGroup("norm", lora=lora, vector=vector)
    if name.startswith(_EMBED):
        return ParamGroup("embed", lora=lora, vector=vector)
    if name.startswith("consolidator"):
        return ParamGroup("consolidator", vector=vector)
    return ParamGroup("other", lora=lora, router=router, vector=vector)


def param_groups(model: nn.Module) -> Iterator[tuple[str, ParamGroup, nn.Parameter]]:
    """(name, group, parameter) for every parameter of `model`."""
    for name, p in model.named_parameters():
        yield name, param_group(name, p), p


def wants_grad(group: ParamGroup, plan: Plan, task: str, has_lora: bool) -> bool:
    """Whether a parameter of `group` trains under `plan` (the one rule; see set_trainable)."""
    if group.kind == "block":
        if group.block not in plan.trained:
            return False
        if plan.experts and group.expert is not None and not plan.trains_expert(group.block, group.expert):
            return False
        if plan.lora:  # adapters, and the routers of an MoE block (no adapter of their own)
            return group.lora or group.router
        return not group.lora or not has_lora
    if group.lora:
        return False
    if group.kind == "head":
        return plan.train_head and group.task == task
    if group.kind == "norm":
        return plan.train_norm
    if group.kind == "embed":
        return plan.train_embed
    if group.kind == "consolidator":
        return plan.trains_consolidator
    return plan.train_head  # other: router/extra modules of subclasses train with the head


def set_trainable(model: FedViT, plan: Plan, task: str | None = None) -> list[str]:
    """Set requires_grad on every parameter as `plan` says; return the trainable names."""
    task = model.check_task(task)
    lora = has_lora(model)
    if plan.lora and not lora:
        raise ConfigError("the plan trains LoRA adapters but the model has none (apply_lora first)")
    names = []
    for name, group, p in param_groups(model):
        flag = wants_grad(group, plan, task, lora)
        p.requires_grad_(flag)
        if flag:
            names.append(name)
    return names


def full_plan(depth: int, **kw) -> Plan:
    return Plan(depth=depth, trained=frozenset(range(depth)), train_embed=True, **kw)


def dense_plan(model: FedViT) -> Plan:
    """Every block and every token through the model's own path: what evaluation, the head
    fits and export run. A model with SHERL's consolidator runs it (its early blocks feed
    it, the late blocks take its output); any other model is full_plan's."""
    at = model.consolidate_at
    if at is None:
        return full_plan(model.depth)
    return Plan(depth=model.depth, trained=frozenset(range(at, model.depth)), consolidate_at=at)


def check_blocks(blocks: list[int], depth: int, key: str) -> list[int]:
    """`blocks` sorted and unique; a ConfigError naming `key` when one is not a block of a `depth`-block model."""
    for b in blocks:
        if not 0 <= b < depth:
            raise ConfigError(f"{key}: block index {b} out of range for a model of depth {depth} (valid: 0..{depth - 1})")
    return sorted(set(blocks))


def keep_count(ratio: float, n: int) -> int:
    """Patch tokens kept for a keep ratio in (0, 1]: ceil(ratio * n), at least 1."""
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"keep ratio {ratio} must be in (0, 1]")
    return max(1, math.ceil(ratio * n - 1e-9))
