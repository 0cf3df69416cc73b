"""Per-task export preview: keep the experts a task's router uses, drop the rest.

`experts_used` runs the task's data through the model and records, per MoE
block, every expert that appears in some token's top-k. `prune_for_task`
copies the model with only that task's router (its rows sliced to the kept
experts), those experts and that task's head. Because the gates depend only on
the top-k logits and the pruned layers keep the original capacity, the pruned
model predicts exactly as the full one on those inputs, unless an evaluation capacity binds
under `priority: gate`: that order is by each token's top probability over all experts,
which the pruned router's softmax over fewer experts does not reproduce.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from fedtune.engine import dense_plan
from fedtune.errors import ConfigError

from .vit import MoEViT, moe_forward


def _batches(data: torch.Tensor | Iterable, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        yield from data.split(batch_size)
        return
    for item in data:  # image batches, or (images, labels) pairs from a loader
        yield item[0] if isinstance(item, (tuple, list)) else item


def experts_used(
    model: MoEViT, data: torch.Tensor | Iterable, task: str, batch_size: int = 64, most: int | None = None
) -> dict[int, list[int]]:
    """Per MoE block, the sorted ids of the experts `task`'s router sends some token of `data`
    to (with `most`, only that many of them, those with the most tokens)."""
    counts = expert_counts(model, data, task, batch_size)
    if counts and not any(int(c.sum()) for c in counts.values()):
        raise ConfigError(f"no token of task {task!r} was routed: the data to count expert use on is empty")
    out = {}
    for b, c in counts.items():
        used = torch.nonzero(c).flatten().tolist()
        if most is not None:
            used = sorted(sorted(used, key=lambda e: (-int(c[e]), e))[:most])
        out[b] = used
    return out


@torch.no_grad()
def expert_counts(
    model: MoEViT, data: torch.Tensor | Iterable, task: str, batch_size: int = 64
) -> dict[int, torch.Tensor]:
    """Per MoE block, how many tokens of `data` `task`'s router sends to each expert.

    Runs in eval mode (the inference capacity applies); the counts are taken
    before capacity, so an expert whose tokens all overflow is still counted.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    task = model.check_task(task)
    counts = {b: torch.zeros(layer.num_experts, dtype=torch.long) for b, layer in model.moe_layers.items()}
    was_training = model.training
    model.eval()
    plan = dense_plan(model)
    try:
        for images in _batches(data, batch_size):
            _, stats = moe_forward(model, images, plan, task)
            for b, s in zip(model.moe_blocks, stats, strict=True):
                counts[b] += s.expert_counts.cpu()
    finally:
        model.train(was_training)
    return counts


def prune_for_task(model: MoEViT, task: str, used: dict[int, list[int]], reduce_top_k: bool = False) -> MoEViT:
    """A copy of `model` for `task` alone: its router, the `used` experts per MoE block, its head
    (with `reduce_top_k`, a block that keeps fewer experts than top_k routes to all it keeps)."""
    task = model.check_task(task)
    missing = [b for b in model.moe_blocks if b not in used]
    if missing:
        raise ConfigError(f"experts to keep: no entry for MoE block {missing[0]} (MoE blocks: {model.moe_blocks})")
    extra = sorted(b for b in used if b not in model.moe_blocks)
    if extra:
        raise ConfigError(f"experts to keep: block {extra[0]} is not an MoE block (MoE blocks: {model.moe_blocks})")
    layers = {}
    for b, layer in model.moe_layers.items():
        try:
            layers[b] = layer.pruned(task, used[b], reduce_top_k=reduce_top_k)
        except ConfigError as exc:
            raise ConfigError(f"experts to keep for block {b}: {exc}") from exc
    out = copy.deepcopy(model)
    out.heads = nn.ModuleDict({task: out.heads[task]})
    for b, layer in layers.items():
        out.vit.blocks[b].mlp = layer
    return out
