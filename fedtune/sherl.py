"""SHERL's anti-redundancy consolidation of the early blocks' outputs.

The early blocks run without autograd. Their outputs h_1..h_m are merged
into one sequence for the late blocks: each output is scored by how redundant
it is (its mean cosine similarity to the other outputs, on the mean token),
less redundant outputs get more weight (softmax of -redundancy / tau plus a
learned bias per layer), and the weighted sum enters the late blocks mixed
with the last early output through a learned per-channel gate that starts at
zero, so the untrained consolidator changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn


class Consolidator(nn.Module):
    def __init__(self, num_layers: int, dim: int, tau: float = 0.1):
        super().__init__()
        self.num_layers = num_layers
        self.tau = tau
        self.layer_bias = nn.Parameter(torch.zeros(num_layers))
        self.gate = nn.Parameter(torch.zeros(dim))

    def weights(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Per-sample merge weights [B, m] from the outputs' redundancy."""
        desc = torch.stack([h.mean(dim=1) for h in outputs], dim=1)  # [B, m, D]
        desc = nn.functional.normalize(desc, dim=-1)
        sim = desc @ desc.transpose(1, 2)  # [B, m, m]
        m = sim.shape[-1]
        redundancy = (sim.sum(-1) - 1.0) / max(m - 1, 1)
        return torch.softmax(-redundancy / self.tau + self.layer_bias, dim=-1)

    def forward(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        if len(outputs) != self.num_layers:
            raise ValueError(f"consolidator expects {self.num_layers} early outputs, got {len(outputs)}")
        w = self.weights(outputs)
        merged = torch.einsum("bm,bmnd->bnd", w, torch.stack(outputs, dim=1))
        last = outputs[-1]
        return last + self.gate * (merged - last)
