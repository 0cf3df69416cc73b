"""MoE: routing by hand, backends, upcycling equivalence, parameter groups, engine integration, pruning."""

import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from fedtune.engine import Plan, Trace, forward_plan, set_trainable
from fedtune.errors import ConfigError
from fedtune.model import ModelConfig, build_model
from fedtune.typedconfig import from_dict
from moe import (
    BACKENDS,
    MoEConfig,
    MoEMlp,
    build_moe_vit,
    capacity,
    experts_used,
    moe_aux_loss,
    moe_forward,
    prune_for_task,
    route,
    total_aux_loss,
    tutel_available,
)
from moe.layer import tutel_problem

from .conftest import TINY

TASKS = {"a": 3, "b": 5}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread, so a busy machine's thread contention does not slow them 30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_model(tasks=TASKS):
    torch.manual_seed(0)
    return build_model(ModelConfig(**TINY), tasks)


def moe_model(dense=None, tasks=TASKS, perturb: float = 0.0, **moe_kw):
    model = build_moe_vit(None, MoEConfig(**moe_kw), tasks, dense=dense or dense_model(tasks))
    if perturb:  # make the upcycled experts differ, as after training
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for _, p in model.named_expert_parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g))
    return model


def layer(cfg: MoEConfig, tasks=("a",), dim=8, seed=0) -> MoEMlp:
    torch.manual_seed(seed)
    return MoEMlp.fresh(dim, 2 * dim, list(tasks), cfg)


# --------------------------------------------------------------------------- routing by hand


def test_route_top1_capacity_drops_later_tokens():
    logits = torch.tensor([[2.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 5.0]])
    cap = capacity(0.5, tokens=4, top_k=1, num_experts=2)
    assert cap == 1
    r, stats = route(logits, top_k=1, cap=cap)
    assert r.indices[:, 0].tolist() == [0, 0, 1, 1]
    assert r.locations[:, 0].tolist() == [0, 1, 0, 1]
    assert r.kept[:, 0].tolist() == [True, False, True, False]
    assert stats.expert_counts.tolist() == [2, 2]
    assert stats.dropped.tolist() == [1, 1]
    assert torch.equal(r.gates, torch.ones(4, 1))
    # f = [1/2, 1/2], so E * sum f_e P_e = P_0 + P_1 = 1
    torch.testing.assert_close(stats.aux_loss, torch.tensor(1.0))


def test_route_gate_priority_keeps_the_surest_tokens_wherever_they_are():
    """V-MoE's batch-prioritized routing: with the same logits as above, the later, surer token of
    each expert keeps the slot; the slots still fill from 0, and every token's first choice comes
    before any second choice."""
    logits = torch.tensor([[2.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 5.0]])
    r, stats = route(logits, top_k=1, cap=1, priority="gate")
    assert r.locations[:, 0].tolist() == [1, 0, 1, 0]
    assert r.kept[:, 0].tolist() == [False, True, False, True]
    assert stats.dropped.tolist() == [1, 1]
    # no capacity, or token priority: as before
    assert route(logits, top_k=1, cap=None, priority="gate")[0].kept.all()
    assert route(logits, top_k=1, cap=1)[0].kept[:, 0].tolist() == [True, False, True, False]
    r2, _ = route(torch.tensor([[1.0, 0.5, 0.0], [5.0, 0.0, 4.0]]), top_k=2, cap=1, priority="gate")
    assert r2.locations.tolist() == [[1, 0], [0, 0]] and r2.kept.tolist() == [[False, True], [True, True]]
    # the layer's setting reaches its routing: a batch whose later tokens the router is surer of
    # keeps those under gate priority, the first ones under token priority
    token = layer(MoEConfig(num_experts=2, top_k=1, capacity_factor=1.0)).train()  # 2 slots an expert
    gate = layer(MoEConfig(num_experts=2, top_k=1, capacity_factor=1.0, priority="gate")).train()
    with torch.no_grad():
        for m in (token, gate):
            m.routers["a"].weight.zero_()
            m.routers["a"].weight[0, 0] = 1.0  # expert 0's logit is the first feature; expert 1's is 0
    x = torch.zeros(1, 4, 8)
    x[0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # every token to expert 0, the last surest
    out_token, _ = token(x, "a")
    out_gate, _ = gate(x, "a")
    processed = lambda out: out[0].abs().sum(-1) > 0  # noqa: E731 - a dropped token's routed output is 0
    assert processed(out_token).tolist() == [True, True, False, False]
    assert processed(out_gate).tolist() == [False, False, True, True]
    with pytest.raises(ConfigError, match="moe.priority: must be one of 'token', 'gate'"):
        from_dict(MoEConfig, {"priority": "first"}, prefix="moe.")


def test_route_top2_first_choices_get_slots_first():
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 1.0, 2.0]])
    r, stats = route(logits, top_k=2, cap=1)
    assert r.indices.tolist() == [[0, 1], [0, 2]]
    # rank-major: both first choices (expert 0) take slots 0 and 1 before any second choice
    assert r.locations.tolist() == [[0, 0], [1, 0]]
    assert r.kept.tolist() == [[True, True], [False, True]]
    assert stats.dropped.tolist() == [1, 0, 0]
    expected = torch.tensor([3.0, 2.0]).softmax(0)  # renormalised over the top-2
    torch.testing.assert_close(r.gates, expected.expand(2, 2))


def test_aux_loss_is_one_for_uniform_routing_and_has_grad():
    moe = layer(MoEConfig(num_experts=4, top_k=2))
    with torch.no_grad():
        moe.routers["a"].weight.zero_()
    x = torch.randn(2, 10, 8)
    _, stats = moe(x, "a")
    assert stats.aux_loss.requires_grad
    torch.testing.assert_close(stats.aux_loss, torch.tensor(1.0))
    stats.aux_loss.backward()
    assert moe.routers["a"].weight.grad is not None
    # all tokens on one expert: the loss grows towards E
    with torch.no_grad():
        moe.routers["a"].weight.normal_()
        moe.routers["a"].weight[0] = 0.0
    skewed = route(torch.tensor([[9.0, 0, 0, 0]] * 8), top_k=1, cap=None)[1].aux_loss
    assert skewed > 3.5


def test_native_combine_matches_the_definition_with_drops():
    moe = layer(MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5)).train()
    x = torch.randn(2, 6, 8)
    out, stats = moe(x, "a")
    assert int(stats.dropped.sum()) > 0
    flat = x.reshape(-1, 8)
    r, _ = route(moe.routers["a"](flat), 2, capacity(0.5, 12, 2, 4))
    expected = torch.zeros_like(flat)
    for t in range(12):
        for j in range(2):
            if r.kept[t, j]:
                expected[t] += r.gates[t, j] * moe.experts[int(r.indices[t, j])](flat[t])
    torch.testing.assert_close(out.reshape(-1, 8), expected)
    assert (stats.processed <= r.capacity).all()
    assert int(stats.expert_counts.sum()) == 12 * 2


def test_capacity_drops_tokens_only_when_small_and_not_at_eval():
    moe = layer(MoEConfig(num_experts=4, top_k=1, capacity_factor=0.25))
    x = torch.randn(4, 8, 8)
    out, stats = moe.train()(x, "a")
    assert int(stats.dropped.sum()) > 0
    lost = stats.dropped.sum()
    zero_rows = (out.reshape(-1, 8).abs().sum(-1) == 0).sum()
    assert zero_rows == lost  # top-1: a dropped token gets no MoE output (the residual carries it)
    _, stats = moe.eval()(x, "a")  # eval_capacity_factor None: no limit
    assert int(stats.dropped.sum()) == 0
    _, stats = layer(MoEConfig(num_experts=4, top_k=1, capacity_factor=None)).train()(x, "a")
    assert int(stats.dropped.sum()) == 0


# --------------------------------------------------------------------------- backends


def _fake_tutel() -> types.ModuleType:
    """A stand-in following tutel.moe.fast_dispatcher's documented contract (not tutel's code)."""

    class Dispatcher:
        def __init__(self, num_experts, capacity, model_dim, dtype):
            self.num_experts, self.capacity = num_experts, capacity

        def update(self, indices_, locations_, gates_, capacity=None, is_postscore=True):
            self.choices = list(zip(indices_, locations_, gates_, strict=True))
            self.capacity = capacity or self.capacity

        def _slots(self):
            e, cap = self.num_experts, self.capacity
            for i, loc, g in self.choices:
                ok = (loc < cap) & (i >= 0)
                yield ok, (i.long() * cap + loc.long()).clamp(max=e * cap - 1), g

        def encode(self, data):
            out = data.new_zeros(self.num_experts * self.capacity, data.shape[-1])
            for ok, slot, _ in self._slots():
                out = out.index_add(0, slot[ok], data[ok])
            return out

        def decode(self, data):
            flat = data.reshape(-1, data.shape[-1])
            return sum(torch.where(ok[:, None], g[:, None] * flat[slot], 0.0) for ok, slot, g in self._slots())

    pkg, mod = types.ModuleType("tutel"), types.ModuleType("tutel.moe")
    mod.fast_dispatcher = Dispatcher
    pkg.moe = mod
    return pkg


def _compare_backends(moe: MoEMlp, x: torch.Tensor) -> None:
    other = copy.deepcopy(moe)
    other.backend = "tutel"
    out, stats = moe(x, "a")
    out_t, stats_t = other(x, "a")
    torch.testing.assert_close(out_t, out, atol=1e-5, rtol=1e-5)
    assert torch.equal(stats.expert_counts, stats_t.expert_counts)
    out.square().sum().backward()
    out_t.square().sum().backward()
    for (n, p), (_, q) in zip(moe.named_parameters(), other.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), n  # an expert that got no token gets no gradient on either
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_tutel_adapter_against_its_contract(monkeypatch, capacity_factor):
    fake = _fake_tutel()
    monkeypatch.setitem(sys.modules, "tutel", fake)
    monkeypatch.setitem(sys.modules, "tutel.moe", fake.moe)
    moe = layer(MoEConfig(num_experts=4, top_k=2, capacity_factor=capacity_factor)).train()
    _compare_backends(moe, torch.randn(2, 6, 8))


def test_tutel_without_a_capacity_and_skewed_routing_uses_the_native_path(monkeypatch):
    """Every token to one expert and no capacity: tutel's buffer would be E times the tokens;
    the same output comes from the native path, and tutel's dispatcher is not built."""
    fake = _fake_tutel()
    built = []
    real = fake.moe.fast_dispatcher
    fake.moe.fast_dispatcher = lambda *a, **k: built.append(a) or real(*a, **k)
    monkeypatch.setitem(sys.modules, "tutel", fake)
    monkeypatch.setitem(sys.modules, "tutel.moe", fake.moe)
    moe = layer(MoEConfig(num_experts=4, top_k=1, capacity_factor=None)).train()
    with torch.no_grad():
        moe.routers["a"].weight.zero_()
        moe.routers["a"].weight[0, 0] = 1.0
    x = torch.randn(2, 6, 8)
    x[..., 0] = 5.0  # expert 0 for every token
    _compare_backends(moe, x)
    assert built == []
    _compare_backends(layer(MoEConfig(num_experts=8, top_k=1, capacity_factor=None), seed=1).train(), torch.randn(4, 16, 8))
    assert built, "routing spread over the experts still goes through tutel"


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.skipif(not tutel_available(), reason=f"tutel not usable here: {tutel_problem()}")
def test_native_and_tutel_give_the_same_output(capacity_factor):
    moe = layer(MoEConfig(num_experts=4, top_k=2, capacity_factor=capacity_factor)).train()
    _compare_backends(moe, torch.randn(2, 6, 8))
    assert set(BACKENDS) == {"native", "tutel"}


def test_backend_auto_and_missing_tutel(monkeypatch):
    import moe.layer

    # whatever this machine has: 'auto' follows what tutel_problem says, both ways
    monkeypatch.setattr(moe.layer, "tutel_problem", lambda: None)
    assert moe.layer.resolve_backend("auto") == "tutel" and moe.layer.resolve_backend("tutel") == "tutel"
    monkeypatch.setattr(moe.layer, "tutel_problem", lambda: "tutel is not importable (ModuleNotFoundError: test)")
    assert MoEMlp.fresh(8, 16, ["a"], MoEConfig(backend="auto")).backend == "native"
    # a config naming tutel reads anywhere (export, --resume, a node without tutel) and runs on
    # the native backend there, which gives the same outputs
    cfg = from_dict(MoEConfig, {"backend": "tutel"}, prefix="moe.")
    with pytest.warns(UserWarning, match="moe.backend: 'tutel' is not usable here"):
        assert MoEMlp.fresh(8, 16, ["a"], cfg).backend == "native"
    with pytest.raises(ConfigError, match="unknown MoE backend 'cuda'"):
        from_dict(MoEConfig, {"backend": "cuda"}, prefix="moe.")


def test_a_tutel_too_old_to_call_is_not_used(monkeypatch):
    """tutel < 0.2's dispatcher takes no per-call capacity: 'auto' leaves it for the native backend."""

    class OldDispatcher:
        def update(self, indices_, locations_, gates_):
            pass

    pkg, mod = types.ModuleType("tutel"), types.ModuleType("tutel.moe")
    mod.fast_dispatcher, pkg.moe, pkg.__version__ = OldDispatcher, mod, "0.1.0"
    monkeypatch.setitem(sys.modules, "tutel", pkg)
    monkeypatch.setitem(sys.modules, "tutel.moe", mod)
    tutel_problem.cache_clear()
    try:
        assert "older than 0.2" in tutel_problem()
        assert MoEMlp.fresh(8, 16, ["a"], MoEConfig(backend="auto")).backend == "native"
    finally:
        tutel_problem.cache_clear()


def test_top1_routers_get_no_gradient_from_the_task_loss_alone():
    """With top-1 the gate is 1: without the load-balancing loss the router gets no gradient
    at all (None, so it is not counted as updated nor sent), with it a real one."""
    x = torch.randn(2, 6, 8)
    for weight, prior, trained in ((0.0, 3.0, False), (0.01, 0.0, True)):
        moe = layer(MoEConfig(num_experts=4, top_k=1, capacity_factor=None, aux_loss_weight=weight, task_prior=prior)).train()
        out, stats = moe(x, "a")
        aux = total_aux_loss([stats], weight)
        (out.square().sum() + (aux if aux is not None else 0)).backward()
        grad = moe.routers["a"].weight.grad
        assert (grad is not None and grad.abs().sum() > 0) if trained else grad is None
        assert trained or moe.routers["a"].bias.grad is None


def test_bad_moe_settings_are_named():
    for key in ("capacity_factor", "eval_capacity_factor"):
        for bad in (float("inf"), float("nan")):
            with pytest.raises(ConfigError, match=f"moe.{key}: expected a finite number"):
                from_dict(MoEConfig, {key: bad}, prefix="moe.")
        for bad in (0.0, -1.25):  # null is how to say no limit; a sign typo must not turn the limit off
            with pytest.raises(ConfigError, match=f"moe.{key}: must be a finite number > 0 or null"):
                from_dict(MoEConfig, {key: bad}, prefix="moe.")
        with pytest.raises(ConfigError, match=f"moe.{key}: 1.25 with task_prior 3.0"):
            from_dict(MoEConfig, {"router": "per_task", "task_prior": 3.0, "capacity_factor": None, "eval_capacity_factor": None, key: 1.25}, prefix="moe.")
    with pytest.raises(ConfigError, match="3 tasks but 2 experts"):
        MoEMlp.fresh(8, 16, ["a", "b", "c"], MoEConfig(num_experts=2, top_k=1, task_prior=5.0, capacity_factor=None))


# --------------------------------------------------------------------------- the MoE ViT


def test_upcycled_one_expert_equals_dense(images):
    dense = dense_model().eval()
    model = moe_model(dense, num_experts=1, top_k=1, blocks=[0, 1, 2, 3]).eval()
    with torch.no_grad():
        for task in TASKS:
            torch.testing.assert_close(model(images, task), dense(images, task), atol=1e-6, rtol=0)
        plan = Plan(depth=4, keep=(None, 6, None, 3), fuse=True)
        got, stats = moe_forward(model, images, plan, "b")
    torch.testing.assert_close(got, forward_plan(dense, images, plan, "b"), atol=1e-6, rtol=0)
    assert len(stats) == 4


def test_upcycled_experts_equal_dense_when_nothing_is_dropped(images):
    dense = dense_model().eval()
    model = moe_model(dense, num_experts=4, top_k=2).eval()  # every other block: 1, 3
    assert model.moe_blocks == [1, 3]
    with torch.no_grad():
        torch.testing.assert_close(model(images, "a"), dense(images, "a"), atol=1e-5, rtol=0)


def test_shared_experts_upcycle_to_dense_and_add_to_the_routed_mixture(images):
    """shared_experts S: output = (shared experts + routed mixture) / (S + 1); upcycled, the dense MLP."""
    dense = dense_model().eval()
    model = moe_model(dense, num_experts=4, top_k=2, shared_experts=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images, "a"), dense(images, "a"), atol=1e-5, rtol=0)
    moe = layer(MoEConfig(num_experts=4, top_k=2, shared_experts=2, capacity_factor=None))
    assert moe.num_shared == 2 and len(moe.experts) == 4
    x = torch.randn(7, 8)
    with torch.no_grad():
        routing, _ = route(moe.router_logits(x, "a"), 2, None)
        routed = BACKENDS["native"](x, moe.experts, routing)
        want = (routed + moe.shared_experts[0](x) + moe.shared_experts[1](x)) / 3
        torch.testing.assert_close(moe(x, "a")[0], want, atol=1e-6, rtol=0)


def test_parameter_names_and_groups_are_disjoint_and_cover():
    for router in ("per_task", "shared"):
        moe = layer(MoEConfig(num_experts=3, top_k=1, router=router, shared_experts=1), tasks=("a", "b"))
        routers = {n for n, _ in moe.router_parameters()}
        experts = {n for n, _ in moe.expert_parameters()}
        assert routers and experts and not routers & experts
        assert routers | experts == {n for n, _ in moe.named_parameters()}
        assert "shared_experts.0.fc1.weight" in experts
    assert routers == {"router.weight", "task_embed.a", "task_embed.b"}
    model = moe_model(num_experts=2, top_k=1)
    routers = {n for n, _ in model.named_router_parameters()}
    experts = {n for n, _ in model.named_expert_parameters()}
    assert "vit.blocks.1.mlp.routers.b.weight" in routers
    assert "vit.blocks.3.mlp.experts.1.fc2.bias" in experts
    assert not routers & experts
    assert routers | experts == {n for n, _ in model.named_parameters() if ".mlp." in n and n.split(".")[2] in ("1", "3")}


def test_per_task_routers_differ(images):
    model = moe_model(num_experts=4, top_k=1).eval()
    w = model.moe_layers[1].routers
    assert not torch.equal(w["a"].weight, w["b"].weight)
    with torch.no_grad():
        _, sa = moe_forward(model, images, Plan(depth=4), "a")
        _, sb = moe_forward(model, images, Plan(depth=4), "b")
    assert any(not torch.equal(x.expert_counts, y.expert_counts) for x, y in zip(sa, sb, strict=True))


def test_shared_router_conditions_on_the_task(images):
    model = moe_model(num_experts=4, top_k=1, router="shared", perturb=0.05)
    layer3 = model.moe_layers[3]
    assert sorted(layer3.task_embed) == ["a", "b"]
    plan = Plan(depth=4, trained={3}, train_head=False)
    set_trainable(model, plan, "a")
    logits, stats = moe_forward(model, images, plan, "a")
    (logits.sum() + moe_aux_loss(model, stats, plan)).backward()
    assert layer3.task_embed["a"].grad is not None and layer3.task_embed["b"].grad is None
    assert layer3.router.weight.grad is not None
    counts_a = [s.expert_counts for s in stats]
    with torch.no_grad():
        _, stats_b = moe_forward(model, images, plan, "b")
    assert any(not torch.equal(x, y.expert_counts) for x, y in zip(counts_a, stats_b, strict=True))


def test_plan_training_blocks_2_and_3_leaves_other_experts_untouched(images):
    model = moe_model(num_experts=4, top_k=2, capacity_factor=0.5)
    plan = Plan(depth=4, trained={2, 3}, keep=(None, None, 8, None))
    names = set_trainable(model, plan, "a")
    assert "vit.blocks.3.mlp.experts.0.fc1.weight" in names
    assert not any(n.startswith("vit.blocks.1.") for n in names)
    trace = Trace()
    model.train()
    logits, stats = moe_forward(model, images, plan, "a", trace=trace)
    aux = moe_aux_loss(model, stats, plan)
    assert aux.requires_grad and not stats[0].aux_loss.requires_grad  # block 1 ran without autograd
    (F.cross_entropy(logits, torch.arange(6) % 3) + aux).backward()
    params = dict(model.named_parameters())
    assert all(p.grad is None for n, p in params.items() if n.startswith("vit.blocks.1."))
    assert params["vit.blocks.3.mlp.routers.a.weight"].grad.abs().sum() > 0  # from the load-balancing loss (top-1)
    assert params["vit.blocks.3.mlp.routers.b.weight"].grad is None
    used3 = (stats[1].processed > 0).nonzero().flatten().tolist()
    assert used3 and all(params[f"vit.blocks.3.mlp.experts.{e}.fc1.weight"].grad is not None for e in used3)
    assert trace.tokens_in == [17, 17, 17, 9]


def test_lora_reaches_the_experts_and_the_task_router_trains(images):
    from fedtune.lora import apply_lora

    # task a's prior keeps its tokens on its own experts (0 and 1), so experts 2 and 3 go unused
    model = apply_lora(moe_model(num_experts=4, top_k=1, perturb=0.05, shared_experts=1, task_prior=50.0, capacity_factor=None), rank=2, alpha=4.0)
    names = {n for n, _ in model.named_parameters()}
    for e in range(4):  # every expert of an MoE block got adapters, not only dense MLPs
        assert f"vit.blocks.3.mlp.experts.{e}.fc1.lora_A.default.weight" in names
    assert "vit.blocks.3.mlp.shared_experts.0.fc2.lora_B.default.weight" in names
    plan = Plan(depth=4, trained={3}, lora=True)
    trainable = set(set_trainable(model, plan, "a"))
    assert "vit.blocks.3.mlp.routers.a.weight" in trainable  # routers have no adapter: they train in full
    assert not any(n.startswith("vit.blocks.3.") and n.endswith(("fc1.weight", "qkv.weight")) and "lora_" not in n for n in trainable)
    model.train()
    logits, stats = moe_forward(model, images, plan, "a")
    (F.cross_entropy(logits, torch.arange(6) % 3) + moe_aux_loss(model, stats, plan)).backward()
    params = dict(model.named_parameters())
    used = (stats[-1].processed > 0).nonzero().flatten().tolist()
    unused = sorted(set(range(4)) - set(used))
    assert unused == [2, 3], "the check below must see unused experts"
    assert used and all(params[f"vit.blocks.3.mlp.experts.{e}.fc2.lora_B.default.weight"].grad is not None for e in used)
    assert all(params[f"vit.blocks.3.mlp.experts.{e}.fc2.lora_B.default.weight"].grad is None for e in unused)
    assert params["vit.blocks.3.mlp.routers.a.weight"].grad.abs().sum() > 0  # from the load-balancing loss (top-1)
    assert params["vit.blocks.3.mlp.routers.b.weight"].grad is None
    assert params["vit.blocks.3.mlp.shared_experts.0.fc2.lora_B.default.weight"].grad is not None


# --------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("eval_capacity_factor,shared", [(None, 0), (0.5, 0), (None, 1)])
def test_pruned_model_predicts_like_the_full_one(images, eval_capacity_factor, shared):
    model = moe_model(num_experts=16, top_k=2, perturb=0.05, eval_capacity_factor=eval_capacity_factor, shared_experts=shared).eval()
    x = images[:2]
    used = experts_used(model, x, "b", batch_size=2)
    assert set(used) == {1, 3}
    pruned = prune_for_task(model, "b", used).eval()
    assert pruned.tasks == ["b"]
    assert pruned.moe_layers[3].tasks == ["b"]
    assert pruned.expert_ids() == used
    assert pruned.moe_layers[3].num_shared == shared  # shared experts always stay
    assert sum(len(v) for v in used.values()) < 2 * 16  # some experts really are dropped
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        full, stats = moe_forward(model, x, Plan(depth=4), "b")
        small, small_stats = moe_forward(pruned, x, Plan(depth=4), "b")
    torch.testing.assert_close(small, full, atol=1e-6, rtol=0)
    assert torch.equal(small.argmax(-1), full.argmax(-1))
    for s, t, ids in zip(stats, small_stats, used.values(), strict=True):
        assert torch.equal(s.expert_counts[ids], t.expert_counts)
        assert torch.equal(s.dropped[ids], t.dropped)
    with pytest.raises(ConfigError, match="unknown task 'a'"):
        pruned(x, "a")


def test_task_prior_starts_each_task_on_its_own_experts(images):
    model = moe_model(num_experts=6, top_k=2, perturb=0.05, task_prior=50.0, capacity_factor=None).eval()
    layer = model.moe_layers[1]
    assert layer.routers["a"].bias.tolist() == [50.0] * 3 + [0.0] * 3
    assert layer.routers["b"].bias.tolist() == [0.0] * 3 + [50.0] * 3
    assert "vit.blocks.1.mlp.routers.a.bias" in dict(model.named_router_parameters())
    with torch.no_grad():
        for task, group in (("a", [0, 1, 2]), ("b", [3, 4, 5])):
            _, stats = moe_forward(model, images[:2], Plan(depth=4), task)
            for s in stats:
                assert s.expert_counts.sum() > 0
                assert set(torch.nonzero(s.expert_counts).flatten().tolist()) <= set(group)
    # pruning slices the bias with the weight, and predicts the same
    used = experts_used(model, images[:2], "b", batch_size=2)
    pruned = prune_for_task(model, "b", used).eval()
    assert pruned.moe_layers[1].routers["b"].bias.shape == (len(used[1]),)
    with torch.no_grad():
        torch.testing.assert_close(pruned(images[:2], "b"), model(images[:2], "b"), atol=1e-6, rtol=0)
    # no prior: bias-free routers, as before
    assert moe_model(num_experts=6, top_k=2).moe_layers[1].routers["a"].bias is None


def test_prune_bad_input():
    model = moe_model(num_experts=4, top_k=2)
    with pytest.raises(ConfigError, match="no entry for MoE block 3"):
        prune_for_task(model, "a", {1: [0, 1]})
    with pytest.raises(ConfigError, match="block 2 is not an MoE block"):
        prune_for_task(model, "a", {1: [0, 1], 2: [0], 3: [0, 1]})
    with pytest.raises(ConfigError, match="block 3: keeping 1 expert"):
        prune_for_task(model, "a", {1: [0, 1], 3: [2]})
    with pytest.raises(ConfigError, match="out of range"):
        prune_for_task(model, "a", {1: [0, 9], 3: [0, 1]})


# --------------------------------------------------------------------------- bad input


def test_config_errors_name_the_problem():
    assert from_dict(MoEConfig, {"num_experts": 4, "top_k": 2, "blocks": [3, 7, 11]}).blocks == [3, 7, 11]
    cases = [
        ({"num_experts": 2, "top_k": 3}, "moe.top_k: must be in 1..num_experts"),
        ({"router": "global"}, "moe.router: must be one of 'per_task', 'shared', got 'global'"),
        ({"backend": "cuda"}, "moe.backend: unknown MoE backend 'cuda'"),
        ({"num_experts": 0}, "moe.num_experts"),
        ({"aux_loss_weight": -1.0}, "moe.aux_loss_weight"),
        ({"experts": 4}, "unknown key moe.experts"),
        ({"task_prior": -1.0}, "moe.task_prior: must be a finite number >= 0"),
        ({"task_prior": 2.0, "router": "shared"}, "moe.task_prior: needs router: per_task"),
        ({"shared_experts": -1}, "moe.shared_experts: must be >= 0"),
        # the capacity assumes tokens spread over all experts; a task prior sends them to a few
        ({"task_prior": 8.0}, "moe.capacity_factor: 1.25 with task_prior 8.0"),
        ({"task_prior": 8.0, "capacity_factor": 2.0}, "set capacity_factor: null"),
        # top-1 gates are 1: with no balancing loss and no prior nothing would train the routers
        ({"top_k": 1, "aux_loss_weight": 0.0}, "moe.aux_loss_weight: 0 with top_k 1 and no task_prior"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message):
            from_dict(MoEConfig, data, prefix="moe.")
    # the same settings that are refused above, made usable
    from_dict(MoEConfig, {"task_prior": 8.0, "capacity_factor": None})
    from_dict(MoEConfig, {"top_k": 1, "aux_loss_weight": 0.0, "task_prior": 8.0, "capacity_factor": None})
    from_dict(MoEConfig, {"top_k": 2, "aux_loss_weight": 0.0})


def test_task_names_that_cannot_key_heads_or_routers_are_named():
    for bad in ("a.b", "update", "keys", "train", "training", "2d", ""):  # `training`: an instance attribute
        with pytest.raises(ConfigError, match=f"task name {bad!r}"):
            dense_model({"a": 3, bad: 2})
        with pytest.raises(ConfigError, match=f"task name {bad!r}"):
            MoEMlp.fresh(8, 16, ["a", bad], MoEConfig(num_experts=2, top_k=1))
    assert moe_model(tasks={"digit": 3, "garment_2": 5}, num_experts=2, top_k=1).tasks == ["digit", "garment_2"]


def test_model_errors_name_the_problem(images):
    with pytest.raises(ConfigError, match=r"moe.blocks: block index 7 out of range for a model of depth 4"):
        moe_model(blocks=[1, 7])
    with pytest.raises(ConfigError, match="moe.top_k"):
        moe_model(num_experts=2, top_k=3)
    model = moe_model(num_experts=2, top_k=1)
    with pytest.raises(ConfigError, match="unknown task 'c'"):
        model(images, "c")
    with pytest.raises(ConfigError, match="unknown task 'c'"):
        moe_forward(model, images, Plan(depth=4), "c")
    with pytest.raises(ConfigError, match="unknown task 'c' for this MoE layer"):
        model.moe_layers[1](torch.randn(1, 3, 32), "c")
    with pytest.raises(ConfigError, match="routes per task"):
        model.moe_layers[1](torch.randn(1, 3, 32))
    with pytest.raises(ConfigError, match="needs an MoEViT"):
        moe_forward(dense_model(), images, Plan(depth=4), "a")


@pytest.mark.parametrize("shared", [0, 1])
def test_cost_model_counts_top_k_experts_and_the_router(images, shared):
    """The planner's FLOP estimate for an MoE ViT follows torch's FLOP counter: each
    token runs through top_k experts (and the shared ones), so a dense estimate would be far too low."""
    from fedtune.accounting import flop_counter_mode
    from fedtune.costs import CostModel

    dense = dense_model()
    model = moe_model(dense, num_experts=4, top_k=2, capacity_factor=None, blocks=[1, 3], shared_experts=shared)
    plan = Plan(depth=4, trained=frozenset(range(4)), train_embed=True)
    set_trainable(model, plan, "a")
    model.train()
    with flop_counter_mode() as counter:
        logits, _ = moe_forward(model, images, plan, "a")
        logits.sum().backward()
    measured = counter.get_total_flops() / images.shape[0]
    est = CostModel(model, "a").flops(plan)
    assert est == pytest.approx(measured, rel=0.1)
    assert CostModel(dense, "a").flops(plan) < 0.85 * est


def test_train_experts_trains_only_the_most_used_experts(images):
    """moe.train_experts N: a trained MoE block updates only the N experts its task routes
    the most tokens to; the others, though they get tokens, stay bit-identical."""
    from fedtune.data import ImageSet
    from fedtune.methods import BSRConfig, MethodConfig, make_method
    from fedtune.trainer import TrainConfig, Trainer

    model = moe_model(num_experts=4, top_k=2, capacity_factor=None, blocks=[1, 3], train_experts=1)
    g = torch.Generator().manual_seed(3)
    data = ImageSet(torch.randn(24, 3, 16, 16, generator=g), {"a": torch.randint(0, 3, (24,), generator=g)}, {"a": 3})
    method = make_method(MethodConfig(name="bsr", bsr=BSRConfig(train_blocks=[1, 3], drop_blocks=[])), model, None, 8, "a")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, method, TrainConfig(epochs=1, batch_size=8, lr=1e-2), "a")
    result = trainer.train(data)
    chosen = dict(trainer.experts)
    assert set(chosen) == {1, 3} and all(len(e) == 1 for e in chosen.values())
    for b in (1, 3):
        for e in range(4):
            changed = not torch.equal(before[f"vit.blocks.{b}.mlp.experts.{e}.fc1.weight"], model.vit.blocks[b].mlp.experts[e].fc1.weight)
            assert changed == (e in chosen[b]), (b, e)
            assert result.expert_counts[b][e] > 0  # every expert got tokens; only the chosen one trained
    sent_experts = {(int(n.split(".")[2]), int(n.split(".")[5])) for n in result.update_counts if ".mlp.experts." in n}
    assert sent_experts == {(b, chosen[b][0]) for b in (1, 3)}
    # the survey that chose them ran forward passes: their FLOPs are reported apart from the steps'
    assert result.survey_flops > 0 and result.summary()["survey_flops"] == result.survey_flops
    plain = Trainer(moe_model(num_experts=4, top_k=2, capacity_factor=None, blocks=[1, 3]), method, TrainConfig(epochs=1, batch_size=8), "a")
    assert plain.survey(data, 0) == [] and plain.last_survey_flops == 0.0
    with pytest.raises(ConfigError, match="train_experts"):
        MoEConfig(num_experts=4, train_experts=5).validate("moe.")


def test_training_counts_the_assignments_the_capacity_turned_away():
    """Over capacity, tokens lose (part of) their MoE output: the training result counts them
    (what the client reports as expert-dropped), zero where the capacity is unlimited."""
    from fedtune.data import ImageSet
    from fedtune.methods import BSRConfig, MethodConfig, make_method
    from fedtune.trainer import TrainConfig, Trainer

    g = torch.Generator().manual_seed(3)
    data = ImageSet(torch.randn(16, 3, 16, 16, generator=g), {"a": torch.randint(0, 3, (16,), generator=g)}, {"a": 3})
    spec = MethodConfig(name="bsr", bsr=BSRConfig(train_blocks=[1, 3], drop_blocks=[]))
    dropped = {}
    for factor in (None, 0.25):
        model = moe_model(num_experts=4, top_k=2, capacity_factor=factor, blocks=[1, 3], perturb=0.05)
        result = Trainer(model, make_method(spec, model, None, 8, "a"), TrainConfig(epochs=1, batch_size=8, max_steps=2), "a").train(data)
        routed = sum(sum(c) for c in result.expert_counts.values())
        assert routed == 2 * 2 * 2 * 8 * 17  # steps x blocks x top-k x images x tokens
        dropped[factor] = result.expert_dropped
    # a quarter of the even share: at least three quarters of the assignments turned away
    assert dropped[None] == 0 and dropped[0.25] >= 0.75 * 2 * 2 * 2 * 8 * 17 - 2 * 2 * 4


def test_cost_model_reads_the_mlp_width_from_an_moe_first_block():
    from fedtune.costs import CostModel

    torch.manual_seed(0)
    dense = build_model(ModelConfig(**{**TINY, "mlp_ratio": 2.0}), TASKS)
    width = dense.vit.blocks[0].mlp.fc1.out_features
    assert width == 2 * dense.vit.embed_dim
    for blocks in ([1, 3], [0, 1]):
        model = build_moe_vit(None, MoEConfig(num_experts=2, top_k=1, blocks=blocks), TASKS, dense=dense)
        assert CostModel(model, "a").hidden == width
