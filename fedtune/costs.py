"""Estimate a plan's cost before running it, so a planner can fit a device budget.

FLOPs of a block are counted analytically from its token counts (the linear
layers and the attention matmuls, which is what torch's FLOP counter counts);
a trained block costs forward + input gradient + weight gradient (3x), a frozen
block after the first trained one forward + input gradient (2x), a no-grad
block its forward; an MoE block's MLP counts top_k experts per token and its
router. Activation bytes per token and block are calibrated once
per model by measuring saved tensors at batch 1 for each block mode. The
accounting module measures the real numbers; tests check the estimates
against them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .accounting import OPTIMIZER_SLOTS, SavedBytesMeter
from .engine import Plan, forward_plan, param_groups, set_trainable, wants_grad
from .lora import has_lora, is_lora_name
from .model import FedViT


@dataclass
class Cost:
    activation_bytes: int
    trainable_state_bytes: int
    train_flops_per_sample: float

    @property
    def memory_bytes(self) -> int:
        return self.activation_bytes + self.trainable_state_bytes


def mlp_hidden(blocks, dim: int) -> int:
    """The MLP's hidden width: a dense block's fc1, or an MoE block's first expert's (4 * dim
    where neither is found)."""
    for b in blocks:
        mlp = b.mlp
        fc1 = getattr(mlp, "fc1", None)
        if fc1 is None and len(getattr(mlp, "experts", ())):
            fc1 = getattr(mlp.experts[0], "fc1", None)
        if fc1 is not None:
            return fc1.out_features
    return 4 * dim


class CostModel:
    """Per-model cost estimates, calibrated by measurement on a batch of one."""

    def __init__(self, model: FedViT, task: str | None = None):
        self.model = model
        self.task = model.check_task(task)
        vit = model.vit
        self.dim = vit.embed_dim
        blk = vit.blocks[0]
        self.attn_dim = blk.attn.attn_dim
        self.hidden = mlp_hidden(vit.blocks, self.dim)
        # An MoE MLP sends each token through top_k routed experts and its shared experts,
        # and scores it with a router.
        self._mlp_mult = [float(getattr(b.mlp, "top_k", 1) + getattr(b.mlp, "num_shared", 0)) for b in vit.blocks]
        self._router_flops = [2.0 * self.dim * getattr(b.mlp, "num_experts", 0) for b in vit.blocks]
        # LoRA adapters: forward FLOPs per token, attention's and the MLP's (2 per adapter
        # weight; an MoE expert's adapters count for the share of tokens routed to it)
        self._lora_attn = [0.0] * len(vit.blocks)
        self._lora_mlp = [0.0] * len(vit.blocks)
        for i, b in enumerate(vit.blocks):
            for name, p in b.named_parameters():
                if not is_lora_name(name):
                    continue
                if name.startswith("attn."):
                    self._lora_attn[i] += 2.0 * p.numel()
                else:
                    share = getattr(b.mlp, "top_k", 1) / max(getattr(b.mlp, "num_experts", 1), 1) if ".experts." in f".{name}" else 1.0
                    self._lora_mlp[i] += 2.0 * p.numel() * share
        self.prefix = vit.num_prefix_tokens
        self.num_patches = model.num_patches
        self._per_token: dict[tuple[str, bool], list[float]] = {}
        self._head_bytes: dict[bool, float] = {}  # saved bytes of the final norm and head, by whether the norm keeps its input
        self._state_cache: dict[tuple, int] = {}

    # -- FLOPs
    def block_flops(self, n_in: int, n_out: int, block: int = 0) -> float:
        d, a, h = self.dim, self.attn_dim, self.hidden
        attn = 2 * n_in * d * 3 * a + 4 * n_in * n_in * a + 2 * n_in * a * d
        mlp = 4 * n_out * d * h * self._mlp_mult[block] + n_out * self._router_flops[block]
        return float(attn + mlp)

    def _tokens(self, plan: Plan) -> list[tuple[int, int]]:
        """(tokens into the block's attention, tokens through its MLP) per block, class token included."""
        p = self.prefix
        if plan.skip:
            return [(n + p, n + p) for n in plan.tokens(self.num_patches)]
        out, n = [], self.num_patches  # non-class tokens arriving (a fused token included)
        for n_mlp in plan.tokens(self.num_patches):
            out.append((n + p, n_mlp + p))
            n = n_mlp
        return out

    def rank_flops(self, plan: Plan, block: int) -> float:
        """Choosing a skipping block's tokens: every token's key and the class token's query."""
        k = plan.keep[block]
        if not plan.skip or k is None or k >= self.num_patches:
            return 0.0
        n = self.num_patches + self.prefix
        return float(2 * (n + 1) * self.dim * self.attn_dim + 2 * n * self.attn_dim)

    def flops(self, plan: Plan) -> float:
        total = 0.0
        for i, (n_in, n_out) in enumerate(self._tokens(plan)):
            mode = plan.block_mode(i)
            f = self.block_flops(n_in, n_out, i)
            adapters = n_in * self._lora_attn[i] + n_out * self._lora_mlp[i]
            total += adapters * {"train": 3.0, "grad": 2.0}.get(mode, 1.0)  # they train in a trained block of a LoRA plan
            if mode == "train":
                # forward, the gradients of every layer's input inside the block (the weights
                # after the first need them), and the weights' own (not for LoRA's frozen
                # base weights; the adapters' are small)
                mult = 2.0 if plan.lora else 3.0
                if not plan.needs_input_grad(i):  # the block's own input needs none: qkv's input gradient is skipped
                    total -= 2.0 * n_in * self.dim * 3 * self.attn_dim
            elif mode == "grad":
                mult = 2.0
            else:
                mult = 1.0
            if mode in ("train", "grad"):
                # attention's two matmuls (QK^T, AV) have no weights, but both their operands
                # need gradients, and fused attention recomputes the scores: its backward is
                # 5 such matmuls to the forward's 2 (torch's counter books it so), 3.5x in all
                total += 4.0 * n_in * n_in * self.attn_dim * (3.5 - mult)
            total += f * mult + self.rank_flops(plan, i)
        return total + self.consolidator_flops(plan)

    def consolidator_flops(self, plan: Plan) -> float:
        """SHERL's merge: a projection per early output, the score, the cosine matrix, fc_out (x3 when it trains)."""
        cons = self.model.consolidator
        if plan.consolidate_at is None or cons is None:
            return 0.0
        n, m = self.num_patches + self.prefix, plan.consolidate_at + 1
        hidden = cons.score.in_features
        fwd = n * (2 * m * self.dim * hidden + 2 * (m - 1) * hidden + 2 * (m - 1) ** 2 * hidden + 2 * hidden * self.dim)
        return (3.0 if plan.train_consolidator else 1.0) * fwd

    # -- activation bytes
    def _calibrate(self, lora: bool) -> None:
        """Measure saved bytes per token and block, on a copy of the model (the model's own
        requires_grad flags are never touched: set_trainable owns them)."""
        model, depth = copy.deepcopy(self.model), self.model.depth
        model.train()
        device = model.vit.patch_embed.proj.weight.device
        x = torch.zeros(1, model.vit.patch_embed.proj.in_channels, *model.vit.patch_embed.img_size, device=device)
        n = self.num_patches + self.prefix

        def saved(plan: Plan) -> dict[str, int]:  # bytes saved for backward, by scope (block<i>, head)
            set_trainable(model, plan, self.task)
            meter = SavedBytesMeter(model)
            with meter:
                forward_plan(model, x, plan, self.task, scope=meter.scope)
            return meter.by_scope

        for mode in ("train", "grad"):
            trained = frozenset(range(depth)) if mode == "train" else frozenset()
            by_scope = saved(Plan(depth=depth, trained=trained, lora=lora, train_embed=True))
            self._per_token[(mode, lora)] = [by_scope.get(f"block{i}", 0) / n for i in range(depth)]
            self._head_bytes[True] = float(by_scope.get("head", 0))  # the final norm keeps its input
        # the head alone (a linear probe): the final norm frozen keeps nothing, the head its input
        self._head_bytes[False] = float(saved(Plan(depth=depth, trained=frozenset(), lora=lora, train_norm=False)).get("head", 0))

    def per_token_bytes(self, mode: str, lora: bool) -> list[float]:
        if (mode, lora) not in self._per_token:
            self._calibrate(lora)
        return self._per_token[(mode, lora)]

    def activation_bytes(self, plan: Plan, batch_size: int) -> float:
        total = 0.0
        tokens = self._tokens(plan)
        for i in range(plan.depth):
            mode = plan.block_mode(i)
            if mode == "nograd":
                continue
            per_token = self.per_token_bytes(mode, plan.lora)[i]
            n_in, n_out = tokens[i]
            total += per_token * (n_in + n_out) / 2
        if plan.trains_consolidator:  # what the merge saves: per token and early output, its projection (and norm)
            hidden = self.model.consolidator.score.in_features if self.model.consolidator is not None else self.dim // 2
            total += (plan.consolidate_at + 1) * (self.num_patches + self.prefix) * (self.dim + 4 * hidden) * 4
        if plan.train_head and not self._per_token:  # the head's bytes come from the calibration, whatever the blocks' modes
            self._calibrate(plan.lora)
        # the final norm keeps its input when it trains or a block below it needs gradients
        norm_saves = plan.train_norm or plan.block_mode(plan.depth - 1) != "nograd"
        return (total + (self._head_bytes[norm_saves] if plan.train_head else 0.0)) * batch_size

    def state_bytes(self, plan: Plan) -> int:
        """Gradients + AdamW state of what `plan` trains (the same rule as set_trainable, without setting anything)."""
        key = (plan.trained, plan.lora, plan.train_head, plan.train_norm, plan.train_embed, plan.trains_consolidator, plan.experts)
        if key not in self._state_cache:
            lora = has_lora(self.model)
            self._state_cache[key] = sum(p.numel() * p.element_size() * (1 + OPTIMIZER_SLOTS) for _, group, p in param_groups(self.model) if wants_grad(group, plan, self.task, lora))
        return self._state_cache[key]

    def estimate(self, plan: Plan, batch_size: int) -> Cost:
        return Cost(
            activation_bytes=int(self.activation_bytes(plan, batch_size)),
            trainable_state_bytes=self.state_bytes(plan),
            train_flops_per_sample=self.flops(plan),
        )
