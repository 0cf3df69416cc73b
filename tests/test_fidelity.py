"""Each method against a small re-implementation of its reference's rule, on random inputs.

BSR (github sreetamasarkar/BSR, EViT's token dropping), SHERL (github Paranioar/SHERL, its
`Guidance` consolidation) and ALaST (arXiv 2408.08670: a layer with budget b processes the
top ceil(b N) tokens by class-token attention; the budget update of its public
re-implementations). The references below are written the way those papers' code is, with
explicit attention matrices and loops, independently of the engine's kernels.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedtune.costs import CostModel
from fedtune.engine import Plan, Trace, drop_tokens, forward_plan, set_trainable
from fedtune.methods import MethodConfig, make_method, prepare_model
from fedtune.model import ModelConfig, build_model
from fedtune.sherl import Consolidator
from fedtune.typedconfig import from_dict
from tests.conftest import TINY


def ref_attention(blk, x):
    """timm Attention with the full softmax matrix: (output, class-token attention averaged over heads)."""
    a = blk.attn
    B, N, C = x.shape
    qkv = a.qkv(x).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)
    out = a.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
    return out, attn[:, :, 0].mean(1)


def ref_bsr_block(blk, x, keep_rate, fuse):
    """BSR's MainBlock: attention, then keep ceil(r (N-1)) non-class tokens by class attention; EViT fusion."""
    out, cls_attn = ref_attention(blk, blk.norm1(x))
    x = x + out
    if keep_rate < 1:
        n = x.shape[1] - 1
        left = math.ceil(keep_rate * n)
        scores = cls_attn[:, 1:]
        idx = scores.topk(left, dim=1, largest=True, sorted=True).indices
        kept = torch.stack([x[b, 1:][idx[b]] for b in range(len(x))])
        parts = [x[:, :1], kept]
        if fuse:
            fused = []
            for b in range(len(x)):
                rest = [j for j in range(n) if j not in set(idx[b].tolist())]
                fused.append(sum(scores[b, j] * x[b, 1 + j] for j in rest))
            parts.append(torch.stack(fused)[:, None])
        x = torch.cat(parts, 1)
    return x + blk.mlp(blk.norm2(x))


def test_drop_tokens_matches_evit_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 4, generator=g)  # class token, 8 patches and a token fused earlier
    attn = torch.rand(3, 10, generator=g).softmax(-1)
    out, index = drop_tokens(x, attn, keep=math.ceil(0.5 * 9), fuse=True)
    for b in range(3):
        order = attn[b, 1:].argsort(descending=True)[:5]
        assert index[b].tolist() == order.tolist()
        rest = [j for j in range(9) if j not in order.tolist()]
        torch.testing.assert_close(out[b, -1], sum(attn[b, 1 + j] * x[b, 1 + j] for j in rest))
        torch.testing.assert_close(out[b, 1:-1], x[b, 1 + order])


@pytest.mark.parametrize("fuse", [True, False])
def test_bsr_forward_matches_the_reference(fuse):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY, "depth": 12}), {"digit": 10}).eval()
    cfg = from_dict(MethodConfig, {"name": "bsr", "bsr": {"fuse": fuse}})
    plan = make_method(cfg, model, None, 4).plan()
    # 16 patches, keep 0.5 at 3, 6, 9; N-1 counts the fused token: 8, then ceil(9/2) = 5, ceil(6/2) = 3
    expected = [8, 5, 3] if fuse else [8, 4, 2]
    assert [plan.keep[b] for b in (3, 6, 9)] == expected
    x = torch.randn(2, 3, 16, 16)
    vit = model.vit
    with torch.no_grad():
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for i, blk in enumerate(vit.blocks):
            h = ref_bsr_block(blk, h, 0.5 if i in (3, 6, 9) else 1.0, fuse)
        want = model.heads["digit"](vit.forward_head(vit.norm(h), pre_logits=True))
        trace = Trace()
        got = forward_plan(model, x, plan, trace=trace)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    tokens = CostModel(model)._tokens(plan)
    assert [n_in for n_in, _ in tokens] == trace.tokens_in  # the cost model counts what runs


class RefGuidance(nn.Module):
    """SHERL's consolidation written per token and per layer, with loops (the reference's rule)."""

    def __init__(self, cons: Consolidator):
        super().__init__()
        self.c = cons

    def forward(self, outputs):
        c = self.c
        p = [proj(h) for proj, h in zip(c.proj, outputs, strict=True)]
        shallow, g = p[:-1], p[-1]
        B, N, _ = g.shape
        out = torch.empty_like(outputs[-1])
        for b in range(B):
            for t in range(N):
                s = [v[b, t] for v in shallow]
                red = [sum(torch.relu(torch.dot(si / si.norm(), sj / sj.norm())) for sj in s) for si in s]
                w = [torch.relu(c.score(si * g[b, t]))[0] / r for si, r in zip(s, red, strict=True)]
                total = sum(abs(wi) for wi in w) + 1e-8
                agg = sum((wi / total) * si for wi, si in zip(w, s, strict=True)) + g[b, t]
                out[b, t] = c.fc_out(agg) + torch.tanh(c.gate / 0.1) * outputs[-1][b, t]
        return out


def test_sherl_consolidation_matches_the_reference():
    torch.manual_seed(0)
    cons = Consolidator(num_inputs=4, dim=8, hidden=6).eval()
    with torch.no_grad():
        cons.gate.fill_(0.03)
        for lin in [cons.score, *(s[0] for s in cons.proj)]:
            lin.bias.uniform_(0.0, 0.5)  # so that some scores pass the relu
    outputs = [torch.randn(2, 3, 8) for _ in range(4)]
    with torch.no_grad():
        torch.testing.assert_close(cons(outputs), RefGuidance(cons)(outputs), rtol=1e-4, atol=1e-5)


def test_sherl_plan_feeds_the_embedding_and_early_outputs_to_the_last_block(tiny_model, images):
    cfg = from_dict(MethodConfig, {"name": "sherl"})
    prepare_model(tiny_model, cfg)
    plan = make_method(cfg, tiny_model, None, 4).plan()
    assert plan.consolidate_at == 3 and plan.trained == frozenset()  # the late block is frozen (the reference)
    set_trainable(tiny_model, plan)
    seen = []
    tiny_model.consolidator.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    forward_plan(tiny_model, images, plan).sum().backward()
    assert seen == [4]  # the embedding output and blocks 0-2
    assert tiny_model.consolidator.gate.grad is not None and tiny_model.consolidator.score.weight.grad is not None
    assert all(p.grad is None for p in tiny_model.vit.blocks[3].parameters())


def ref_alast_block(blk, x, keep):
    """A layer with budget b processes the top ceil(b N) patch tokens by class-token attention; the others pass."""
    _, cls_attn = ref_attention(blk, blk.norm1(x))
    order = cls_attn[:, 1:].argsort(dim=1, descending=True)[:, :keep]
    out = x.clone()
    for b in range(len(x)):
        pos = torch.cat([torch.zeros(1, dtype=torch.long), order[b].sort().values + 1])
        sub = x[b : b + 1, pos]
        a, _ = ref_attention(blk, blk.norm1(sub))
        sub = sub + a
        sub = sub + blk.mlp(blk.norm2(sub))
        out[b, pos] = sub[0]
    return out


def test_alast_skipping_matches_the_reference_and_counts_are_per_block(tiny_model, images):
    tiny_model.eval()
    keep = (4, 12, 2, 16)  # a later block may process more tokens than an earlier one
    plan = Plan(depth=4, keep=keep, skip=True)
    assert plan.tokens(16) == list(keep)
    vit = tiny_model.vit
    with torch.no_grad():
        h = vit._pos_embed(vit.patch_embed(images))
        for blk, k in zip(vit.blocks, keep, strict=True):
            h = ref_alast_block(blk, h, k)
        want = tiny_model.heads["digit"](vit.forward_head(vit.norm(h), pre_logits=True))
        trace = Trace()
        got = forward_plan(tiny_model, images, plan, trace=trace)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert trace.tokens_in == [17, 17, 17, 17]  # every token stays in the sequence


def test_alast_delta_rule_matches_the_reference(tiny_model):
    cfg = from_dict(MethodConfig, {"name": "alast", "alast": {"update": "delta", "alpha": 0.05, "min_budget": 0.3, "memory_fraction": None}})
    method = make_method(cfg, tiny_model, None, 4)
    rng = np.random.default_rng(0)
    deltas = [rng.uniform(0, 5, 4) for _ in range(6)]
    b, prev = np.full(4, 0.6), None
    for d in deltas:
        trace = Trace(cls_delta=torch.tensor(d))
        method.observe(trace)
        if prev is not None:
            b = np.clip(b + 0.05 * (d - prev), 0.3, 1.0)
        prev = d
    np.testing.assert_allclose(method.budgets, b)


def test_alast_fixed_ablation_keeps_uniform_budgets_and_the_last_blocks(tiny_model):
    cfg = from_dict(MethodConfig, {"name": "alast", "alast": {"adapt": False, "select": "last", "k": 2, "memory_fraction": None}})
    method = make_method(cfg, tiny_model, None, 4)
    method.observe(Trace(cls_delta=torch.tensor([5.0, 0.1, 0.1, 0.1])))
    plan = method.plan()
    assert plan.trained == frozenset({2, 3})
    assert len(set(plan.keep)) == 1 and plan.keep[0] == math.ceil(0.6 * 16)
