"""Mixture-of-Experts for fedtune: the MoE MLP layer, the MoE ViT and per-task pruning."""

from .layer import (
    BACKENDS,
    MoEConfig,
    MoEMlp,
    MoEStats,
    Routing,
    capacity,
    resolve_backend,
    route,
    total_aux_loss,
    tutel_available,
)
from .prune import experts_used, prune_for_task
from .vit import MoEViT, build_moe_vit, moe_aux_loss, moe_block_indices, moe_forward

__all__ = [
    "BACKENDS",
    "MoEConfig",
    "MoEMlp",
    "MoEStats",
    "MoEViT",
    "Routing",
    "build_moe_vit",
    "capacity",
    "experts_used",
    "moe_aux_loss",
    "moe_block_indices",
    "moe_forward",
    "prune_for_task",
    "resolve_backend",
    "route",
    "total_aux_loss",
    "tutel_available",
]
