"""LoRA adapters on the blocks' linear layers, through peft.

Adapters go into every block (B starts at zero, so the model's output is
unchanged), each expert of an MoE block included; the plan decides which blocks'
adapters train in a step, so ALaST can move LoRA training between blocks. A
trained MoE block's routers train in full next to the adapters (they are small). `merge_lora` folds the adapters back
into plain `nn.Linear` layers for export.
"""

from __future__ import annotations

import re

from torch import nn

from .errors import ConfigError

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
# fc1/fc2 also match the experts' MLPs of an MoE block (mlp.experts.<e>.fc1, mlp.shared_experts.<s>.fc1)
_PATHS = {"qkv": r"attn\.qkv", "proj": r"attn\.proj", "fc1": r"mlp\.((shared_)?experts\.\d+\.)?fc1", "fc2": r"mlp\.((shared_)?experts\.\d+\.)?fc2"}


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: list[str] | tuple[str, ...] = LORA_TARGETS, dropout: float = 0.0) -> nn.Module:
    """Inject LoRA adapters into `targets` of every block of `model.vit` (in place)."""
    from peft import LoraConfig, inject_adapter_in_model

    unknown = [t for t in targets if t not in _PATHS]
    if unknown:
        raise ConfigError(f"method.lora.targets: unknown target {unknown[0]!r}; choose from {', '.join(_PATHS)}")
    if rank < 1:
        raise ConfigError(f"method.lora.rank: must be >= 1, got {rank}")
    pattern = r"vit\.blocks\.\d+\.(" + "|".join(_PATHS[t] for t in targets) + r")"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern)
    return inject_adapter_in_model(config, model)


_ADAPTER = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")


def is_lora_name(name: str) -> bool:
    """A LoRA adapter's parameter: peft's module names (lora_A / lora_B ...) as a part of the
    name, not any name with "lora_" in it (a task called flora_type is no adapter)."""
    return _ADAPTER.search(name) is not None


def has_lora(model: nn.Module) -> bool:
    return any(is_lora_name(n) for n, _ in model.named_parameters())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the plain layer back (in place)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model
