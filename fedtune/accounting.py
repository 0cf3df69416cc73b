"""Measured costs of a training step: FLOPs, activation bytes, parameters, time.

- FLOPs: torch's FlopCounterMode (forward + backward), with the CPU fused
  attention kernels added (torch counts the CUDA ones only).
- Activation bytes: every tensor autograd saves for backward, seen through
  saved-tensor hooks, counted once per storage; parameters and buffers (which
  exist anyway) are not counted.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import flop_counter

aten = torch.ops.aten


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


_EXTRA_FLOP_FORMULAS = {}
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FLOP_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa
    _EXTRA_FLOP_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward


def flop_counter_mode() -> flop_counter.FlopCounterMode:
    """A FlopCounterMode that also counts the CPU fused-attention kernels."""
    return flop_counter.FlopCounterMode(display=False, custom_mapping=dict(_EXTRA_FLOP_FORMULAS))


class SavedBytesMeter:
    """Counts bytes autograd saves for backward, once per storage, per named scope.

    Use `with meter:` around the forward pass and `meter.scope(name)` around parts of it.
    """

    def __init__(self, model: nn.Module | None = None):
        self._exclude: set[int] = set()
        if model is not None:
            for t in list(model.parameters()) + list(model.buffers()):
                self._exclude.add(t.untyped_storage().data_ptr())
        self._seen: set[int] = set()
        self.by_scope: dict[str, int] = defaultdict(int)
        self._scope = "other"
        self._hooks: contextlib.AbstractContextManager | None = None

    @property
    def total(self) -> int:
        return sum(self.by_scope.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        # Hand autograd a detached alias, never the tensor itself: a saved output that holds
        # its own grad_fn makes a C++ reference cycle Python's gc cannot see, and every graph
        # measured would leak with its activations (found as memory growing per client).
        if isinstance(tensor, nn.Parameter):
            return tensor
        if tensor.layout == torch.strided:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in self._exclude and ptr not in self._seen:
                self._seen.add(ptr)
                self.by_scope[self._scope] += storage.nbytes()
        return tensor.detach()

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        prev, self._scope = self._scope, name
        try:
            yield
        finally:
            self._scope = prev

    def __enter__(self) -> SavedBytesMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None


@dataclass
class StepStats:
    """Measured costs of one training step."""

    step_time_s: float
    activation_bytes: int
    train_flops: int | None  # None when this step was not FLOP-counted
    trainable_params: int
    trainable_state_bytes: int  # gradients + optimizer state of the trainable parameters
    batch_size: int
    loss: float
    plan_time_s: float = 0.0  # of step_time_s: the method choosing the plan and taking what the step observed
    blocks_trained: int = 0  # blocks whose weights (or adapters) the plan trained


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


OPTIMIZER_SLOTS = 2  # AdamW keeps two state tensors per parameter


def trainable_state_bytes(model: nn.Module, optimizer_slots: int = OPTIMIZER_SLOTS) -> int:
    """Bytes of gradients plus optimizer state (AdamW keeps two slots per parameter)."""
    return sum(p.numel() * p.element_size() * (1 + optimizer_slots) for p in model.parameters() if p.requires_grad)
