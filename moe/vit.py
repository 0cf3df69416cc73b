"""The MoE ViT: a FedViT whose chosen blocks carry an MoE MLP, upcycled from a dense ViT.

Built by composition: timm's VisionTransformer is kept and `vit.blocks[i].mlp`
is replaced by an `MoEMlp` whose experts start as copies of that block's MLP
(sparse upcycling), so parameter names stay FedViT's
(`vit.blocks.<i>.mlp.experts.<e>.fc1.weight`, `vit.blocks.<i>.mlp.routers.<task>.weight`).

The engine runs it unchanged: `moe_features` calls `fedtune.engine.forward_features`
with a block function that hands each MoE MLP the task and collects its
routing statistics, which come back explicitly next to the features.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from fedtune.engine import (
    Plan,
    ScopeFn,
    Trace,
    block_forward,
    check_blocks,
    dense_plan,
    forward_features,
    no_scope,
)
from fedtune.errors import ConfigError
from fedtune.model import FedViT, ModelConfig, build_model

from .layer import MoEConfig, MoEMlp, MoEStats, total_aux_loss

EXPERT_SURVEY_BATCHES = 8  # train_experts: batches whose routing decides which experts a client trains
BlockFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


def moe_block_indices(cfg: MoEConfig, depth: int) -> list[int]:
    """The MoE blocks of a `depth`-block ViT: cfg.blocks, or every other block from 1."""
    blocks = cfg.blocks if cfg.blocks is not None else list(range(1, depth, 2))
    blocks = check_blocks(blocks, depth, "moe.blocks")
    if not blocks:
        raise ConfigError(f"moe.blocks: no MoE block in a model of depth {depth}; name at least one block")
    return blocks


class MoEViT(FedViT):
    """A FedViT with MoE MLPs in `moe.blocks`, upcycled from the MLPs `vit` has."""

    def __init__(self, vit: nn.Module, num_classes: dict[str, int], moe: MoEConfig):
        super().__init__(vit, num_classes)
        self.moe_cfg = moe
        self.moe_blocks = moe_block_indices(moe, self.depth)
        for b in self.moe_blocks:
            blk = vit.blocks[b]
            blk.mlp = MoEMlp.upcycle(blk.mlp, vit.embed_dim, self.tasks, moe)

    @property
    def moe_layers(self) -> dict[int, MoEMlp]:
        return {b: self.vit.blocks[b].mlp for b in self.moe_blocks}

    def block_fn(self, task: str | None, stats: list[MoEStats] | None = None) -> BlockFn:
        """The engine's per-block function for `task`; each MoE layer's statistics are appended to `stats`."""
        task = self.check_task(task)

        def run(blk: nn.Module, i: int, x: torch.Tensor, keep: int | None, fuse: bool, want_rank: bool):
            if not isinstance(blk.mlp, MoEMlp):
                return block_forward(blk, x, keep, fuse, want_rank)

            def routed(h: torch.Tensor) -> torch.Tensor:  # the MoE MLP with this task's router; its statistics come back explicitly
                out, layer_stats = blk.mlp(h, task)
                if stats is not None:
                    stats.append(layer_stats)
                return out

            return block_forward(blk, x, keep, fuse, want_rank, mlp=routed)

        return run

    def forward_features(self, images: torch.Tensor, plan: Plan | None = None, task: str | None = None, trace: Trace | None = None) -> tuple[torch.Tensor, Trace]:
        """Pre-logit features under `plan` (None: every block, every token) with `task`'s routers,
        and what the forward observed: besides the engine's observations, each MoE block's
        expert counts before capacity (`extra["expert_counts"]`), the assignments over an expert's
        capacity (`extra["expert_dropped"]`) and the weighted load-balancing loss of the
        MoE blocks that train (`aux_loss`)."""
        trace = Trace() if trace is None else trace
        feats, stats = moe_features(self, images, dense_plan(self) if plan is None else plan, task, trace=trace)
        trace.extra["expert_counts"] = {b: s.expert_counts for b, s in zip(self.moe_blocks, stats, strict=True)}
        trace.extra["expert_dropped"] = {b: s.dropped for b, s in zip(self.moe_blocks, stats, strict=True)}
        trace.aux_loss = moe_aux_loss(self, stats, plan)
        return feats, trace

    @property
    def survey_batches(self) -> int:
        """With `train_experts`: batches whose routing decides which experts train."""
        return EXPERT_SURVEY_BATCHES if self.moe_cfg.train_experts is not None else 0

    def experts_to_train(self, traces: list[Trace]) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """With `train_experts` N: per MoE block, the N experts this task's tokens were routed to
        most in the survey's `traces` (ties to the lower index); the others stay frozen while the
        trainer trains, so a client updates (and sends) only the experts its task uses most."""
        n = self.moe_cfg.train_experts
        if n is None:
            return ()
        totals: dict[int, torch.Tensor] = {}
        for trace in traces:
            for b, counts in trace.extra.get("expert_counts", {}).items():
                totals[b] = totals.get(b, 0) + counts.long()
        return tuple((b, tuple(sorted(int(e) for e in torch.sort(-c, stable=True).indices[:n]))) for b, c in sorted(totals.items()))

    def named_router_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(full name, parameter) of every router and task embedding."""
        for b, layer in self.moe_layers.items():
            for n, p in layer.router_parameters():
                yield f"vit.blocks.{b}.mlp.{n}", p

    def named_expert_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(full name, parameter) of every expert."""
        for b, layer in self.moe_layers.items():
            for n, p in layer.expert_parameters():
                yield f"vit.blocks.{b}.mlp.{n}", p

    def expert_ids(self) -> dict[int, list[int]]:
        """Per MoE block, the original index of each expert it has (all of them until pruned)."""
        return {b: list(layer.expert_ids) for b, layer in self.moe_layers.items()}


def build_moe_vit(
    model_cfg: ModelConfig | None,
    moe_cfg: MoEConfig,
    num_classes: dict[str, int],
    dense: FedViT | None = None,
) -> MoEViT:
    """An MoE ViT upcycled from `dense` (copied, not changed), or from the dense model `model_cfg` builds.

    Heads of tasks that `dense` has with the same number of classes are copied too.
    """
    if dense is None:
        if model_cfg is None:
            raise ConfigError("build_moe_vit needs a model config or a dense model to upcycle")
        dense = build_model(model_cfg, num_classes)
    model = MoEViT(copy.deepcopy(dense.vit), num_classes, moe_cfg)
    for task, head in model.heads.items():
        if task in dense.heads and dense.heads[task].weight.shape == head.weight.shape:
            head.load_state_dict(dense.heads[task].state_dict())
    return model


def moe_features(
    model: MoEViT,
    images: torch.Tensor,
    plan: Plan,
    task: str | None = None,
    trace: Trace | None = None,
    scope: ScopeFn | None = None,
) -> tuple[torch.Tensor, list[MoEStats]]:
    """`engine.forward_features` for an MoE ViT: features and one MoEStats per MoE block (in `model.moe_blocks` order)."""
    if not isinstance(model, MoEViT):
        raise ConfigError(f"moe_features needs an MoEViT, got {type(model).__name__}")
    stats: list[MoEStats] = []
    feats = forward_features(model, images, plan, task, trace=trace, scope=scope or no_scope, block_fn=model.block_fn(task, stats))
    return feats, stats


def moe_forward(model: MoEViT, images: torch.Tensor, plan: Plan, task: str | None = None, trace: Trace | None = None) -> tuple[torch.Tensor, list[MoEStats]]:
    """Logits of `task` under `plan` and the MoE blocks' statistics."""
    feats, stats = moe_features(model, images, plan, task, trace=trace)
    return model.forward_head(feats, task), stats


def moe_aux_loss(model: MoEViT, stats: Sequence[MoEStats], plan: Plan | None = None) -> torch.Tensor | None:
    """aux_loss_weight * the load-balancing losses of the MoE blocks that train under `plan` (all without one)."""
    chosen = [s for b, s in zip(model.moe_blocks, stats, strict=True) if plan is None or b in plan.trained]
    return total_aux_loss(chosen, model.moe_cfg.aux_loss_weight)
