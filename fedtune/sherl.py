"""SHERL's anti-redundancy consolidation of the early blocks' outputs (arXiv 2407.07523).

The early blocks run without autograd. Their outputs, with the embedding output first,
h_0..h_m, are merged per token into the input of the late (pre-trained) blocks, as the
reference code (github Paranioar/SHERL, its `Guidance` module) does:

- each h_i is projected by its own Linear + LayerNorm to a narrow width: p_i;
- the last one, p_m, is the guide g; the others are the shallow set S;
- a shallow layer's redundancy R_l is the sum over the shallow layers (itself included) of
  relu(cosine(S_l, S_j)), per token;
- its weight is relu(score(S_l * g)) / R_l, normalised to sum 1 (L1) over the layers;
- the aggregate a = sum_l w_l S_l + g goes back to the model width through
  fc_out = ReLU, Linear, LayerNorm, Dropout, and the late blocks get
  fc_out(a) + tanh(gate / 0.1) * h_m, with the scalar gate starting at zero.

Only this module (and the head, and LoRA adapters on the late blocks where configured)
trains; the late blocks are frozen and pass gradients through.
"""

from __future__ import annotations

import torch
from torch import nn

GATE_TEMPERATURE = 0.1


class Consolidator(nn.Module):
    def __init__(self, num_inputs: int, dim: int, hidden: int | None = None, dropout: float = 0.1):
        super().__init__()
        if num_inputs < 2:
            raise ValueError(f"the consolidator needs at least 2 inputs (a shallow layer and the guide), got {num_inputs}")
        hidden = hidden or max(1, dim // 2)
        self.num_inputs = num_inputs
        self.proj = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden)) for _ in range(num_inputs))
        self.score = nn.Linear(hidden, 1)
        self.fc_out = nn.Sequential(nn.ReLU(), nn.Linear(hidden, dim), nn.LayerNorm(dim, eps=1e-12), nn.Dropout(dropout))
        self.gate = nn.Parameter(torch.zeros(1))

    def weights(self, shallow: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """Per-token merge weights [B, N, L, 1] of the projected shallow layers [B, N, L, h]."""
        unit = nn.functional.normalize(shallow, dim=-1, eps=1e-8)
        redundancy = (unit @ unit.transpose(-1, -2)).relu().sum(-1, keepdim=True)  # [B, N, L, 1], >= 1
        w = self.score(shallow * guide.unsqueeze(2)).relu() / redundancy
        return w / w.abs().sum(dim=2, keepdim=True).clamp_min(1e-8)  # not `+ 1e-8`: the ONNX export loses so small a constant, and 0/0 follows

    def forward(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        if len(outputs) != self.num_inputs:
            raise ValueError(f"consolidator expects {self.num_inputs} early outputs, got {len(outputs)}")
        projected = [proj(h) for proj, h in zip(self.proj, outputs, strict=True)]
        shallow, guide = torch.stack(projected[:-1], dim=2), projected[-1]  # [B, N, L, h], [B, N, h]
        merged = (self.weights(shallow, guide) * shallow).sum(dim=2) + guide
        return self.fc_out(merged) + torch.tanh(self.gate / GATE_TEMPERATURE) * outputs[-1]
