"""Engine equivalence and behaviour: timm equality, frozen blocks, token ranking, no-grad prefix."""

import pytest
import timm
import torch
import torch.nn.functional as F

from fedtune.accounting import SavedBytesMeter, flop_counter_mode
from fedtune.engine import (
    Plan,
    Trace,
    class_token_attention,
    drop_tokens,
    forward_plan,
    full_plan,
    set_trainable,
)
from fedtune.errors import PlanError
from fedtune.model import ModelConfig, build_model


def timm_twin(name: str, img_size: int):
    """A 2-block engine model and the timm model with the same weights, both in eval mode."""
    cfg = ModelConfig(name=name, img_size=img_size, patch_size=4, depth=2)
    torch.manual_seed(0)
    model = build_model(cfg, {"digit": 7}).eval()
    ref = timm.create_model(name, pretrained=False, img_size=img_size, patch_size=4, depth=2, num_classes=7).eval()
    state = {k.removeprefix("vit."): v for k, v in model.state_dict().items() if k.startswith("vit.")}
    state["head.weight"], state["head.bias"] = model.heads["digit"].weight, model.heads["digit"].bias
    ref.load_state_dict(state)
    return model, ref


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"])
def test_engine_forward_equals_timm(name):
    model, ref = timm_twin(name, 16)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = ref(x)
        got = forward_plan(model, x, full_plan(model.depth))
    assert torch.equal(got, expected)
    assert torch.isfinite(got).all()


def test_frozen_block_bit_identical_after_step(tiny_model, images):
    plan = Plan(depth=4, trained={2}, keep=(None, 8, None, None))
    set_trainable(tiny_model, plan)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2, weight_decay=0.1)
    loss = F.cross_entropy(forward_plan(tiny_model, images, plan), torch.arange(6) % 10)
    loss.backward()
    opt.step()
    changed = {n for n, p in tiny_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the trained block should change"
    assert all(n.startswith(("vit.blocks.2.", "heads.digit", "vit.norm.")) for n in changed)
    for n in before:
        if n.startswith(("vit.blocks.0.", "vit.blocks.1.", "vit.blocks.3.", "vit.patch_embed", "vit.pos_embed", "vit.cls_token")):
            assert torch.equal(dict(tiny_model.named_parameters())[n], before[n]), n


def test_class_token_attention_matches_manual_attention(tiny_model, images):
    blk = tiny_model.vit.blocks[0]
    x = tiny_model.vit._pos_embed(tiny_model.vit.patch_embed(images))
    h = blk.norm1(x)
    B, N, _ = h.shape
    qkv = blk.attn.qkv(h).reshape(B, N, 3, blk.attn.num_heads, blk.attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    full = ((q @ k.transpose(-2, -1)) * blk.attn.scale).softmax(-1)  # [B, H, N, N]
    torch.testing.assert_close(class_token_attention(blk.attn, q, k), full[:, :, 0].mean(1))


def test_skipping_ranks_tokens_with_the_blocks_own_attention_lora_adapters_included(tiny_model, images):
    """ALaST's token skipping chooses tokens with the block's own query and keys: with LoRA,
    the base weights plus the trained adapters, as the block's attention computes them."""
    from fedtune.engine import _attention, rank_for_block
    from fedtune.lora import apply_lora

    apply_lora(tiny_model, rank=4)
    with torch.no_grad():
        for n, p in tiny_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    blk = tiny_model.vit.blocks[1]
    x = tiny_model.vit._pos_embed(tiny_model.vit.patch_embed(images))
    with torch.no_grad():
        _, own = _attention(blk.attn, blk.norm1(x), True)
        torch.testing.assert_close(rank_for_block(blk, x), own, atol=1e-5, rtol=1e-4)


def test_dropped_tokens_are_the_lowest_attention_ones(tiny_model, images):
    plan = Plan(depth=4, keep=(5, None, None, None), rank_tokens=True)
    trace = Trace()
    with torch.no_grad():
        forward_plan(tiny_model, images, plan, trace=trace)
    attn = trace.cls_attn[0][:, 1:]  # patch tokens
    kept = trace.kept_index[0]
    for b in range(images.shape[0]):
        kept_scores = attn[b, kept[b]]
        dropped = torch.ones(attn.shape[1], dtype=torch.bool)
        dropped[kept[b]] = False
        assert kept_scores.min() >= attn[b, dropped].max()
    assert trace.tokens_in == [17, 6, 6, 6]


def test_fused_token_is_the_attention_weighted_sum():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    attn = torch.tensor([[0.2, 0.4, 0.1, 0.2, 0.1], [0.2, 0.1, 0.1, 0.5, 0.1]])
    out, index = drop_tokens(x, attn, keep=2, fuse=True)
    assert out.shape == (2, 4, 3)
    # sample 0 keeps patches 0 and 2 (scores .4, .2); drops 1 and 3 (scores .1, .1), summed with those weights
    assert index[0].tolist() == [0, 2]
    torch.testing.assert_close(out[0, -1], 0.1 * x[0, 2] + 0.1 * x[0, 4])


def test_blocks_before_first_trained_save_no_activations(tiny_model, images):
    plan = Plan(depth=4, trained={2})
    set_trainable(tiny_model, plan)
    meter = SavedBytesMeter(tiny_model)
    with meter:
        forward_plan(tiny_model, images, plan, scope=meter.scope).sum().backward()
    assert meter.by_scope.get("embed", 0) == 0
    assert meter.by_scope.get("block0", 0) == 0 and meter.by_scope.get("block1", 0) == 0
    assert meter.by_scope["block2"] > 0 and meter.by_scope["block3"] > 0


def test_flop_counter_counts_cpu_fused_attention():
    q = torch.randn(2, 3, 17, 8, requires_grad=True)
    with flop_counter_mode() as counter:
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    assert counter.get_total_flops() > 0


def test_full_training_flops_are_about_three_forwards(tiny_model, images):
    plan = full_plan(4)
    set_trainable(tiny_model, plan)
    with flop_counter_mode() as fwd, torch.no_grad():
        forward_plan(tiny_model, images, plan)
    with flop_counter_mode() as train:
        forward_plan(tiny_model, images, plan).sum().backward()
    assert 2.6 < train.get_total_flops() / fwd.get_total_flops() < 3.1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(trained={4}), "trained block index 4 out of range"),
        (dict(trained={-1}), "out of range"),
        (dict(keep=(0, None, None, None)), "at least one patch token"),
        (dict(keep=(None, None)), "2 entries for a model of depth 4"),
        (dict(consolidate_at=2, trained={1}), "before the consolidation point"),
    ],
)
def test_bad_plans(kwargs, match):
    with pytest.raises(PlanError, match=match):
        Plan(depth=4, **kwargs)


def test_saved_bytes_meter_frees_graphs_and_keeps_gradients():
    """A measured forward must not keep its graph alive (sigmoid saves its own output) and
    backward through it gives the same gradients as an unmeasured one."""
    import gc
    import weakref

    from fedtune.accounting import SavedBytesMeter

    torch.manual_seed(0)
    lin, x = torch.nn.Linear(8, 8), torch.randn(4, 8)
    plain = torch.autograd.grad(torch.sigmoid(lin(x)).sum(), lin.weight)[0]
    meter = SavedBytesMeter(lin)
    with meter:
        y = torch.sigmoid(lin(x))
    assert meter.total == 2 * 4 * 8 * 4  # the input to the linear and the sigmoid's output
    torch.testing.assert_close(torch.autograd.grad(y.sum(), lin.weight, retain_graph=True)[0], plain)
    ref = weakref.ref(y)
    del y
    gc.collect()
    assert ref() is None


def test_hub_weights_offline_and_uncached_are_a_config_error_that_says_what_to_do(tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE when imported: a fresh interpreter with an empty cache
    import os
    import subprocess
    import sys

    code = ("from fedtune.errors import ConfigError\n"
            "from fedtune.model import ModelConfig, build_model\n"
            "try:\n"
            "    build_model(ModelConfig(name='vit_tiny_patch16_224', img_size=32, patch_size=4, pretrained='hub'), {'x': 10})\n"
            "except ConfigError as exc:\n"
            "    print('ConfigError:', exc)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ConfigError: model.pretrained: hub" in out.stdout and "vit_tiny_patch16_224" in out.stdout and "local file" in out.stdout
