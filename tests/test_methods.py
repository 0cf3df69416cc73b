"""Methods, planners, device budgets, LoRA, SHERL, cost estimates and bad input."""

import math

import numpy as np
import pytest
import torch

from fedtune.costs import CostModel
from fedtune.data import ImageSet
from fedtune.engine import Plan, forward_plan, set_trainable
from fedtune.errors import CheckpointError, ConfigError, PlanError
from fedtune.lora import merge_lora
from fedtune.methods import MethodConfig, make_method, prepare_model
from fedtune.model import (
    ModelConfig,
    build_model,
    load_backbone,
    model_from_checkpoint,
    model_meta,
    save_checkpoint,
)
from fedtune.profiles import DeviceProfile, get_profile
from fedtune.trainer import TrainConfig, Trainer
from fedtune.typedconfig import from_dict, to_dict

from .conftest import TINY

SPECS = ["full", "head", "bsr", "alast", "sherl", "alast+lora", "bsr+lora", "sherl+lora"]


def method_cfg(spec: str, **extra) -> MethodConfig:
    name = spec.removesuffix("+lora")
    return from_dict(MethodConfig, {"name": name, "lora": {"enabled": spec.endswith("+lora"), "rank": 2}, **extra})


def tiny_data(n=24, seed=0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(images=torch.randn(n, 3, 16, 16, generator=g), labels={"digit": torch.arange(n) % 10}, num_classes={"digit": 10})


@pytest.mark.parametrize("spec", SPECS)
def test_every_method_trains_only_its_plan(spec, tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg, {"digit": 10})
    cfg = method_cfg(spec)
    prepare_model(model, cfg)
    method = make_method(cfg, model, None, batch_size=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, method, TrainConfig(epochs=1, batch_size=8, lr=1e-2, flops_every=1))
    result = trainer.train(tiny_data())
    assert len(result.steps) == 3
    s = result.summary()
    assert s["train_flops_per_step"] > 0 and s["activation_bytes"] > 0 and s["trainable_params"] > 0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(result.update_counts), "only parameters the plans trained may change"
    if spec.endswith("+lora"):
        assert all("lora_" in n or n.startswith(("heads.", "vit.norm.", "consolidator")) for n in changed)
    if spec == "head":
        assert all(n.startswith("heads.") for n in changed)


def test_bsr_paper_setting_on_12_blocks():
    model = build_model(ModelConfig(**{**TINY, "depth": 12}), {"digit": 10})
    method = make_method(MethodConfig(name="bsr"), model, None, 4)
    plan = method.plan()
    assert sorted(plan.trained) == [3, 7, 11]
    assert plan.keep[3] == 8 and plan.keep[6] == 5 and plan.keep[9] == 3  # 16 patches, keep 0.5 of the arriving tokens, a fused one included


def test_alast_budgets_follow_importance_and_keep_their_mean(tiny_model):
    cfg = from_dict(MethodConfig, {"name": "alast", "alast": {"k": 2, "mean_budget": 0.5, "rate": 0.5, "memory_fraction": None}})
    method = make_method(cfg, tiny_model, None, 4)
    delta = np.array([0.1, 0.1, 2.0, 4.0])
    for _ in range(10):
        method.budgets = method.follow(method.budgets, delta)
    assert method.budgets[3] > method.budgets[2] > method.budgets[0]
    assert method.budgets.mean() == pytest.approx(0.5, abs=1e-6)
    # budgets clipped to [min_budget, 1] keep the mean, blocks at 1.0 lowered too when needed
    low = from_dict(MethodConfig, {"name": "alast", "alast": {"k": 2, "mean_budget": 0.6, "min_budget": 0.3, "memory_fraction": None}})
    squeezed = make_method(low, tiny_model, None, 4)._normalize(np.array([0.0, 0.0, 1.2, 1.2]))
    assert squeezed.mean() == pytest.approx(0.6, abs=1e-9) and squeezed.min() >= 0.3 and squeezed.max() <= 1.0
    plan = method.plan()
    assert plan.trained == frozenset({2, 3})  # the top-K budgets
    tokens = plan.tokens(tiny_model.num_patches)
    assert tokens[0] < tiny_model.num_patches  # low-budget blocks keep fewer tokens


def test_alast_round_selection_follows_restored_and_federation_importance(tiny_model):
    """With reselect: round the blocks are fixed by the first training plan, not by the check
    make_method does before the client restores its budgets or gets the federation's importance."""
    cfg = from_dict(MethodConfig, {"name": "alast", "alast": {"k": 2, "reselect": "round", "memory_fraction": None, "federation_weight": 0.5}})
    method = make_method(cfg, tiny_model, None, 4)
    assert method.plan().trained == frozenset({0, 1})  # uniform budgets: ties go to the first blocks
    method.load_state_dict({"budgets": [0.3, 0.3, 0.9, 0.9], "importance": [1.0, 1.0, 3.0, 3.0]})
    assert method.plan().trained == frozenset({2, 3})
    # the federation sees blocks 0 and 1 as most important: the blend of both moves the choice
    method.set_importance([10.0, 9.0, 0.1, 0.1])
    assert method.plan().trained == frozenset({0, 1})
    own, fed = np.array([1.0, 1.0, 3.0, 3.0]), np.array([10.0, 9.0, 0.1, 0.1])
    mix = 0.5 * own / own.mean() + 0.5 * fed / fed.mean()
    np.testing.assert_allclose(method.budgets, method._normalize(mix * cfg.alast.mean_budget))
    state = method.state_dict()
    assert state["budgets"] == [float(b) for b in method.budgets] and state["importance"] == [1.0, 1.0, 3.0, 3.0]


def test_alast_shared_blocks_stay_within_the_federations_top_k(tiny_model):
    """shared_blocks: a client trains only blocks among the federation's top-K, those that fit
    it, whatever its own budgets prefer; so a round's clients update at most K blocks between
    them. Before the federation's importance arrives, the client's own choice stands."""
    cfg = from_dict(MethodConfig, {"name": "alast", "alast": {"k": 2, "reselect": "round", "memory_fraction": None, "federation_weight": 0.0, "shared_blocks": True}})
    method = make_method(cfg, tiny_model, None, 4)
    method.load_state_dict({"budgets": [0.3, 0.3, 0.9, 0.9], "importance": [1.0, 1.0, 3.0, 3.0]})
    assert method.plan().trained == frozenset({2, 3})  # no federation importance yet: its own
    method.set_importance([10.0, 9.0, 0.1, 0.1])  # weight 0: the budgets still follow its own
    assert method.budgets[2] > method.budgets[0]
    assert method.plan().trained == frozenset({0, 1})
    small = make_method(cfg, tiny_model, None, 4)
    small.set_importance([10.0, 9.0, 0.1, 0.1])
    small.fits = lambda plan: 0 not in plan.trained  # a device that cannot train block 0
    assert small.plan().trained == frozenset({1})  # not {1, 2}: block 2 is outside the shared two
    free = make_method(from_dict(MethodConfig, {"name": "alast", "alast": {**to_dict(cfg.alast), "shared_blocks": False}}), tiny_model, None, 4)
    free.set_importance([10.0, 9.0, 0.1, 0.1])
    free.fits = lambda plan: 0 not in plan.trained
    assert free.plan().trained == frozenset({1, 2})  # without shared_blocks it fills K from the rest


def test_alast_survey_starts_budgets_from_the_data(tiny_model):
    """survey_batches: the trainer looks at batches without autograd first; the budgets start
    from their class-token deltas, and the round's blocks follow them."""
    cfg = from_dict(MethodConfig, {"name": "alast", "alast": {"k": 1, "reselect": "round", "memory_fraction": None, "survey_batches": 2}})
    method = make_method(cfg, tiny_model, None, 8)
    trainer = Trainer(tiny_model, method, TrainConfig(epochs=1, batch_size=8, max_steps=1))
    traces = trainer.survey(tiny_data(), method.survey_batches)
    assert len(traces) == 2 and all(not p.grad_fn for t in traces for p in [t.cls_delta])
    observed = np.mean([t.cls_delta.double().numpy() for t in traces], axis=0)
    method.survey(traces)
    np.testing.assert_allclose(method.importance, observed)
    np.testing.assert_allclose(method.budgets, method._normalize(observed / observed.mean() * cfg.alast.mean_budget))
    assert method.plan().trained == frozenset({int(np.argmax(method.budgets))})
    result = Trainer(tiny_model, make_method(cfg, tiny_model, None, 8), TrainConfig(epochs=1, batch_size=8)).train(tiny_data())
    chosen = [b for b, n in enumerate(result.block_updates) if n]
    assert chosen == [int(np.argmax(observed))] and result.block_updates[chosen[0]] == len(result.steps)
    with pytest.raises(ConfigError, match="survey_batches"):
        make_method(from_dict(MethodConfig, {"name": "alast", "alast": {"survey_batches": -1}}), tiny_model, None, 4)
    # stochastic depth does not reach the survey: the same batches give the same deltas
    deep = build_model(ModelConfig(**{**TINY, "drop_path_rate": 0.5}), {"digit": 10})
    again = [Trainer(deep, make_method(cfg, deep, None, 8), TrainConfig(epochs=1, batch_size=8)).survey(tiny_data(), 2) for _ in range(2)]
    torch.testing.assert_close(again[0][0].cls_delta, again[1][0].cls_delta)
    with pytest.raises(ConfigError, match="federation_weight"):
        make_method(from_dict(MethodConfig, {"name": "alast", "alast": {"federation_weight": 1.5}}), tiny_model, None, 4)


def test_alast_layer_sampling_is_seeded_and_follows_the_budgets(tiny_model):
    cfg = from_dict(MethodConfig, {"name": "alast", "alast": {"k": 1, "select": "sample", "memory_fraction": None}})

    def draws(seed: int) -> list[int]:
        method = make_method(cfg, tiny_model, None, 4, seed=seed)
        method.budgets = np.array([0.1, 0.1, 0.3, 1.0])
        return [next(iter(method.plan().trained)) for _ in range(200)]

    first = draws(0)
    assert first == draws(0) and first != draws(1)
    counts = np.bincount(first, minlength=4)
    assert counts[3] > counts[2] > counts[0] and counts.min() > 0  # every block gets a turn, the important ones more
    with pytest.raises(ConfigError, match="alast.select"):
        make_method(from_dict(MethodConfig, {"name": "alast", "alast": {"select": "best"}}), tiny_model, None, 4)


def test_optimizer_state_is_held_only_for_what_the_step_trains(tiny_model):
    """ALaST moves between blocks from step to step: the optimizer keeps moments only for the
    parameters the current plan trains, so the memory is what the plan is budgeted for."""
    from fedtune.accounting import OPTIMIZER_SLOTS

    cfg = from_dict(MethodConfig, {"name": "alast", "alast": {"k": 1, "select": "sample", "mean_budget": 1.0, "memory_fraction": None}})
    method = make_method(cfg, tiny_model, None, 8, seed=0)
    method.budgets = np.ones(4)
    trainer = Trainer(tiny_model, method, TrainConfig(epochs=1, batch_size=8, lr=1e-2))
    blocks, data = set(), tiny_data(n=64)
    for images, labels in data.loader(8, shuffle=False, task="digit"):
        stats, plan, _ = trainer.train_step(images, labels)
        blocks |= plan.trained
        held = {id(p) for p in trainer.optimizer.state}
        assert held == {id(p) for p in tiny_model.parameters() if p.requires_grad}
        slot_bytes = sum(t.numel() * t.element_size() for st in trainer.optimizer.state.values() for k, t in st.items() if k != "step")
        grad_bytes = sum(p.numel() * p.element_size() for p in tiny_model.parameters() if p.requires_grad)
        assert slot_bytes + grad_bytes == stats.trainable_state_bytes and OPTIMIZER_SLOTS == 2
    assert len(blocks) > 1, "the sampled selection moved between blocks"


def test_alast_fits_a_small_profile_by_training_later_blocks(tiny_model):
    cm = CostModel(tiny_model)
    full = cm.estimate(Plan(depth=4, trained=frozenset(range(4)), train_embed=True), 8)
    profile = DeviceProfile("small", memory_bytes=int(full.memory_bytes * 0.25), flops_per_sample=1e12)
    cfg = from_dict(MethodConfig, {"name": "alast", "alast": {"k": 4, "memory_fraction": None}})
    method = make_method(cfg, tiny_model, profile, 8)
    plan = method.plan()
    assert cm.estimate(plan, 8).memory_bytes <= profile.memory_bytes
    assert len(plan.trained) < 4


def test_alast_trains_a_block_with_fewer_tokens_before_falling_back_to_the_head(tiny_model):
    """A device where the most important block does not fit at its budget's token count but
    does with fewer tokens trains that block (seen in the federated quickstart: Raspberry Pi
    clients whose top block was at budget 1.0 trained the head alone)."""
    cm = CostModel(tiny_model)
    n = tiny_model.num_patches

    def need(tokens: int) -> int:
        keep = tuple([tokens] * 4)
        return cm.estimate(Plan(depth=4, trained=frozenset({3}), keep=keep, skip=True), 8).memory_bytes

    profile = DeviceProfile("tight", memory_bytes=(need(n) + need(n // 2)) // 2, flops_per_sample=1e12)
    cfg = from_dict(MethodConfig, {"name": "alast", "alast": {"k": 1, "memory_fraction": None, "min_budget": 0.1, "mean_budget": 0.5}})
    method = make_method(cfg, tiny_model, profile, 8)
    method.budgets = np.array([0.99, 0.99, 0.99, 1.0])  # block 3 first; no block fits with every token
    plan = method.plan()
    assert plan.trained == frozenset({3}) and plan.tokens(n)[3] < n
    assert cm.estimate(plan, 8).memory_bytes <= profile.memory_bytes


@pytest.mark.parametrize("spec", ["plain", "lora", "sherl"])
def test_cost_estimates_track_measurements(spec, tiny_cfg, images):
    """The planner's FLOPs within 10% of torch's counter and its saved bytes within 35% of
    the meter's, for the plans the methods make: the first trained block (whose input needs
    no gradient, its weights do), LoRA's, SHERL's frozen block at the consolidation point
    (its input gradient reaches the consolidator), the head alone costed first."""
    from fedtune.accounting import SavedBytesMeter, flop_counter_mode

    torch.manual_seed(0)
    model = build_model(tiny_cfg, {"digit": 10})
    if spec == "plain":
        plans = [Plan(depth=4, trained=frozenset()), Plan(depth=4, trained=frozenset(range(4)), train_embed=True), Plan(depth=4, trained={3}),
                 Plan(depth=4, trained={2, 3}, keep=(None, 6, None, 3))]
    elif spec == "lora":
        prepare_model(model, method_cfg("alast+lora"))
        plans = [Plan(depth=4, trained={3}, lora=True), Plan(depth=4, trained={1, 2, 3}, lora=True)]
    else:
        prepare_model(model, method_cfg("sherl"))
        at = model.consolidate_at
        plans = [Plan(depth=4, consolidate_at=at), Plan(depth=4, trained=frozenset(range(at, 4)), consolidate_at=at)]
    cm = CostModel(model)
    for plan in plans:
        set_trainable(model, plan)
        meter = SavedBytesMeter(model)
        with flop_counter_mode() as counter, meter:
            forward_plan(model, images, plan).sum().backward()
        est = cm.estimate(plan, images.shape[0])
        assert est.train_flops_per_sample * images.shape[0] == pytest.approx(counter.get_total_flops(), rel=0.1), plan
        assert est.activation_bytes == pytest.approx(meter.total, rel=0.35), plan


def test_flop_estimates_hold_on_long_sequences():
    """257 tokens (32x32, patch 2): attention's matmuls weigh more than at 17, and their
    backward (5 matmuls to the forward's 2) is counted as torch counts it."""
    from fedtune.accounting import flop_counter_mode

    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY, "img_size": 32, "patch_size": 2}), {"digit": 10})
    x = torch.randn(2, 3, 32, 32)
    cm = CostModel(model)
    for plan in (Plan(depth=4, trained={0}), Plan(depth=4, trained=frozenset(range(4)), train_embed=True), Plan(depth=4, trained={3}),
                 Plan(depth=4, trained={2, 3}, keep=(None, 100, None, 50))):
        set_trainable(model, plan)
        with flop_counter_mode() as counter:
            forward_plan(model, x, plan).sum().backward()
        assert cm.estimate(plan, 2).train_flops_per_sample * 2 == pytest.approx(counter.get_total_flops(), rel=0.05), plan


def test_skipping_plans_save_what_the_cost_model_counts(tiny_model, images):
    """ALaST's token skipping saves no per-channel copy of its token index: the saved bytes
    match the estimate the planner caps (a gather with an expanded index overshot it)."""
    from fedtune.accounting import SavedBytesMeter

    cm = CostModel(tiny_model)
    for plan in [Plan(depth=4, trained=frozenset({2, 3}), keep=(None, 10, 8, 6), skip=True), Plan(depth=4, trained=frozenset({1, 2, 3}), keep=(None, 5, 12, 9), skip=True),
                 Plan(depth=4, trained=frozenset(), train_norm=False),  # the head method (a linear probe): the frozen norm keeps nothing
                 Plan(depth=4, trained=frozenset({3}), train_norm=False)]:  # a frozen norm over a trained block keeps its input
        set_trainable(tiny_model, plan)
        meter = SavedBytesMeter(tiny_model)
        with meter:
            forward_plan(tiny_model, images, plan).sum().backward()
        assert meter.total == pytest.approx(cm.estimate(plan, images.shape[0]).activation_bytes, rel=0.02)


def test_impossible_budget_is_a_clear_error(tiny_model):
    with pytest.raises(PlanError, match="no full plan fits device profile 'mcu'"):
        make_method(MethodConfig(name="full"), tiny_model, "mcu", batch_size=4096)
    tiny = DeviceProfile("nothing", memory_bytes=16, flops_per_sample=1.0)
    with pytest.raises(PlanError, match="no alast plan fits"):
        make_method(MethodConfig(name="alast"), tiny_model, tiny, 8)
    with pytest.raises(PlanError, match="GFLOP per sample"):
        make_method(MethodConfig(name="head"), tiny_model, tiny, 8)


def test_plan_errors_name_what_binds(tiny_model):
    """A smaller batch is advised only where memory binds (FLOPs per sample do not depend on it);
    ALaST's memory cap is named as the limit when it, not the profile, binds."""
    flops_bound = DeviceProfile("slow", memory_bytes=1 << 40, flops_per_sample=1.0)
    with pytest.raises(PlanError, match="stronger profile") as err:
        make_method(MethodConfig(name="bsr"), tiny_model, flops_bound, 8)
    assert "GFLOP per sample" in str(err.value) and "smaller batch" not in str(err.value)
    with pytest.raises(PlanError, match="use a smaller batch, a stronger profile or the alast method"):
        make_method(MethodConfig(name="full"), tiny_model, "mcu", batch_size=4096)
    capped = from_dict(MethodConfig, {"name": "alast", "alast": {"memory_fraction": 1e-9}})
    with pytest.raises(PlanError, match=r"method\.alast\.memory_fraction 1e-09 \(of full fine-tuning's estimate; the workstation profile allows"):
        make_method(capped, tiny_model, "workstation", 8)


def test_unknown_profile():
    with pytest.raises(ConfigError, match="unknown device profile 'toaster'"):
        get_profile("toaster")


@pytest.mark.parametrize(
    "data, match",
    [
        ({"name": "magic"}, "name: must be one of 'full', 'head', 'bsr', 'alast', 'sherl', got 'magic'"),
        ({"bsr": {"keep_ratio": 0.0}}, "keep_ratio: keep ratio must be in"),
        ({"bsr": {"keep_ratio": 1.5}}, "keep_ratio"),
        ({"sherl": {"keep_ratio": -0.1}}, "sherl.keep_ratio"),
        ({"alast": {"rate": 0}}, "alast.rate"),
        ({"bogus": 1}, "unknown key bogus"),
        ({"lora": {"rank": "big"}}, "lora.rank: expected an integer"),
        ({"name": "full", "lora": {"enabled": True}}, "LoRA combines with"),
        ({"lora": {"targets": []}}, "lora.targets: empty"),
        ({"lora": {"alpha": 0}}, "lora.alpha: must be > 0"),
        ({"name": "sherl", "lora": {"enabled": True}, "sherl": {"train_late": True}}, "sherl.train_late: with lora.enabled"),
    ],
)
def test_bad_method_config(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(MethodConfig, data)


def test_trained_block_out_of_range(tiny_model):
    cfg = from_dict(MethodConfig, {"name": "bsr", "bsr": {"train_blocks": [1, 9]}})
    with pytest.raises(ConfigError, match="block index 9 out of range for a model of depth 4"):
        make_method(cfg, tiny_model, None, 4)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"name": "vit_nonexistent_patch16_224"}, "unknown timm model 'vit_nonexistent_patch16_224'"),
        ({"name": "resnet50"}, "not a ViT/DeiT model name"),
        ({"img_size": 32, "patch_size": 5}, "patch_size: 5 does not divide img_size 32"),
        ({"mlp_ratio": 0}, "mlp_ratio: must be a number > 0 or null"),
        ({"mlp_ratio": -2.0}, "mlp_ratio: must be a number > 0 or null"),
    ],
)
def test_bad_model_config(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(ModelConfig, data)


def test_backbones_whose_token_0_is_not_the_only_prefix_token_are_refused():
    small = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    with pytest.raises(ConfigError, match="has 4 prefix token.*and no class token"):
        build_model(ModelConfig(name="vit_base_patch16_reg4_gap_256", **small), {"a": 2})
    with pytest.raises(ConfigError, match="has 2 prefix token.*one of them a class token"):
        build_model(ModelConfig(name="deit_tiny_distilled_patch16_224", **small), {"a": 2})
    assert build_model(ModelConfig(name="vit_tiny_patch16_224.augreg_in21k", **small), {"a": 2}).depth == 1, "a pretrained tag is a timm name"


def test_checkpoint_round_trip_and_errors(tmp_path, tiny_cfg, tiny_model):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model.state_dict(), model_meta(tiny_cfg, {"digit": 10}))
    again, meta = model_from_checkpoint(path)
    for (n, a), (_, b) in zip(tiny_model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or unreadable checkpoint"):
        model_from_checkpoint(corrupt)
    other = build_model(ModelConfig(**{**TINY, "embed_dim": 48}), {"digit": 10})
    with pytest.raises(CheckpointError, match="shape mismatch for .*model has"):
        load_backbone(other, path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_backbone(other, tmp_path / "missing.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="no key matches"):
        load_backbone(other, tmp_path / "foreign.pt")
    # a shallower backbone's file: its blocks load, the rest keep their initialization, said aloud
    deeper = build_model(ModelConfig(**{**TINY, "depth": 6}), {"digit": 10})
    with pytest.warns(UserWarning, match=r"loaded \d+ of the backbone's \d+ tensors; \d+ keep their random initialization \(blocks.4"):
        missing = load_backbone(deeper, path)
    assert missing and all(m.startswith(("blocks.4.", "blocks.5.")) for m in missing)
    with pytest.raises(CheckpointError, match="missing backbone keys: blocks.4"):
        load_backbone(deeper, path, strict=True)


def _rewrite_checkpoints(path: str, seconds: float) -> None:  # a run writing its rounds (in another process)
    import time

    from fedtune.model import save_checkpoint

    end, i = time.time() + seconds, 0
    while time.time() < end:
        save_checkpoint(path, {f"w{j}": torch.full((64, 64), float(i + j)) for j in range(16)}, {"round": i})
        i += 1


def test_a_checkpoint_read_while_it_is_replaced_is_one_whole_file(tmp_path):
    """Checkpoints are replaced atomically; a reader (export, a test watching a run) must get
    one of them whole, never the tensors of one file under the header of another (safetensors'
    lazy reader reopened the path per tensor: a few reads in a thousand failed their checksum)."""
    import multiprocessing as mp
    import time

    from fedtune.model import read_state, save_checkpoint

    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, {f"w{j}": torch.full((64, 64), float(j - 1)) for j in range(16)}, {"round": -1})
    writer = mp.get_context("spawn").Process(target=_rewrite_checkpoints, args=(str(path), 4.0))
    writer.start()
    reads, end = 0, time.time() + 4.0
    try:
        while time.time() < end:
            state, meta = read_state(path)  # a mixed file fails its checksum: CheckpointError
            assert len({float(t[0, 0]) - j for j, t in enumerate(state[f"w{j}"] for j in range(16))}) == 1
            reads += 1
    finally:
        writer.join()
    assert reads > 100


def test_backbone_loads_from_torch_file_and_resamples_pos_embed(tmp_path, tiny_model):
    torch.save({k.removeprefix("vit."): v for k, v in tiny_model.state_dict().items()}, tmp_path / "w.pth")
    bigger = build_model(ModelConfig(**{**TINY, "img_size": 32, "pretrained": str(tmp_path / "w.pth")}), {"digit": 10})
    assert torch.equal(bigger.vit.blocks[0].attn.qkv.weight, tiny_model.vit.blocks[0].attn.qkv.weight)
    assert bigger.vit.pos_embed.shape[1] == 65


def test_lora_starts_equal_and_merges_exactly(tiny_model, images):
    tiny_model.eval()
    with torch.no_grad():
        base = tiny_model(images)
    prepare_model(tiny_model, method_cfg("alast+lora"))
    with torch.no_grad():
        assert torch.equal(tiny_model(images), base)
        for n, p in tiny_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
        adapted = tiny_model(images)
    merge_lora(tiny_model)
    assert not any("lora_" in n for n, _ in tiny_model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(images), adapted, rtol=1e-3, atol=1e-4)


def test_lora_names_are_peft_adapters_not_any_name_with_lora_in_it(tiny_model):
    from fedtune.lora import has_lora, is_lora_name

    assert not has_lora(tiny_model)
    prepare_model(tiny_model, method_cfg("alast+lora"))
    adapters = [n for n, _ in tiny_model.named_parameters() if is_lora_name(n)]
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters) and has_lora(tiny_model)
    # a task or parameter whose name merely contains "lora_" (a task called flora_type) is no adapter
    assert not is_lora_name("heads.flora_type.weight") and not is_lora_name("vit.blocks.0.mlp.routers.flora_type.weight")


def test_sherl_late_blocks_train_only_when_asked(tiny_model):
    for extra, trained, lora in (({}, set(), False), ({"sherl": {"train_late": True, "tuned_blocks": 2}}, {2, 3}, False), ({"lora": {"enabled": True}}, {3}, True)):
        cfg = from_dict(MethodConfig, {"name": "sherl", **extra})
        model = build_model(ModelConfig(**TINY), {"digit": 10})
        prepare_model(model, cfg)
        plan = make_method(cfg, model, None, 4).plan()
        assert plan.trained == frozenset(trained) and plan.lora == lora
        assert model.consolidator.num_inputs == plan.consolidate_at + 1


def test_a_head_only_plan_on_a_sherl_model_trains_on_the_features_it_is_evaluated_with(tiny_model, images):
    """FedRep's head phase on a SHERL model: the head trains on the model's own (consolidated)
    path, with the consolidator and every block frozen, not on the plain backbone's."""
    prepare_model(tiny_model, method_cfg("sherl"))
    with torch.no_grad():
        tiny_model.consolidator.gate.fill_(0.3)
    head = make_method(MethodConfig(name="head"), tiny_model, None, 8, "digit")
    plan = head.plan()
    assert plan.consolidate_at == tiny_model.consolidate_at and not plan.trains_consolidator
    assert plan.first_grad == tiny_model.depth, "nothing before the head needs autograd"
    assert sorted(set_trainable(tiny_model, plan, "digit")) == ["heads.digit.bias", "heads.digit.weight"]
    tiny_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.forward_features(images, plan, "digit")[0], tiny_model.forward_features(images, None, "digit")[0])
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    Trainer(tiny_model, head, TrainConfig(epochs=1, batch_size=8, max_steps=2), "digit").train(tiny_data())
    changed = sorted(n for n, p in tiny_model.named_parameters() if not torch.equal(p, before[n]))
    assert changed == ["heads.digit.bias", "heads.digit.weight"]
    from fedtune.costs import OPTIMIZER_SLOTS

    head_params = sum(p.numel() * p.element_size() for p in tiny_model.heads["digit"].parameters())
    assert head.estimate(plan).trainable_state_bytes == head_params * (1 + OPTIMIZER_SLOTS), "the head's state alone, not the consolidator's"


def test_alast_without_adapt_keeps_its_budgets_at_the_mean(tiny_model):
    """adapt: false (the fixed ablation) keeps every budget at mean_budget, also when a survey or
    the federation's importance would start them elsewhere; the importance is still kept."""
    cfg = from_dict(MethodConfig, {"name": "alast", "alast": {"adapt": False, "memory_fraction": None, "survey_batches": 2}})
    method = make_method(cfg, tiny_model, None, 8)
    method.set_importance([1.0, 5.0, 1.0, 1.0])
    method.survey(Trainer(tiny_model, method, TrainConfig(epochs=1, batch_size=8)).survey(tiny_data(), 2))
    np.testing.assert_allclose(method.budgets, cfg.alast.mean_budget)
    assert method.importance is not None


def test_a_training_without_steps_reports_no_loss():
    model = build_model(ModelConfig(**TINY), {"digit": 10})
    result = Trainer(model, make_method(MethodConfig(name="head"), model, None, 8), TrainConfig(epochs=0, batch_size=8)).train(tiny_data())
    assert result.num_examples == 0 and math.isnan(result.loss) and math.isnan(result.accuracy)


def test_sherl_models_are_evaluated_and_head_fit_through_their_consolidator(tiny_model, images):
    """What SHERL trains (the consolidator) is in every dense path: the model's plain forward,
    extract_features (the evaluations and head fits) and the device's inference plan agree,
    and differ from the backbone without the consolidator."""
    from fedtune.engine import dense_plan
    from fedtune.heads import extract_features

    cfg = method_cfg("sherl")
    prepare_model(tiny_model, cfg)
    with torch.no_grad():
        tiny_model.consolidator.gate.fill_(0.3)
        for p in tiny_model.consolidator.fc_out.parameters():
            p.add_(0.5)
    tiny_model.eval()
    method = make_method(cfg, tiny_model, None, 4)
    assert dense_plan(tiny_model).consolidate_at == method.plan().consolidate_at == tiny_model.consolidate_at
    with torch.no_grad():
        device = tiny_model.forward_features(images, method.inference_plan(False), "digit")[0]
        plain = tiny_model.forward_features(images, None, "digit")[0]
        without = tiny_model.vit.forward_head(tiny_model.vit.forward_features(images), pre_logits=True)
    torch.testing.assert_close(plain, device)
    data = ImageSet(images, {"digit": torch.arange(len(images)) % 10}, {"digit": 10})
    torch.testing.assert_close(extract_features(tiny_model, data, "digit")[0], device)
    assert (without - device).abs().max() > 1e-3, "the consolidator changes the features"


def test_fit_linear_head_matches_scikit_learn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    from fedtune.heads import fit_linear_head

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 6, generator=g) * 2
    labels = torch.arange(120) % 4
    feats = centers[labels] + torch.randn(120, 6, generator=g)
    reg = 0.05
    head = torch.nn.Linear(6, 4)
    fit_linear_head(head, feats, labels, reg)
    # scikit-learn minimises 1/2 |W|^2 + C * sum(loss): the same optimum for C = 1 / (reg * n)
    ref = LogisticRegression(C=1.0 / (reg * len(labels)), tol=1e-10, max_iter=10_000).fit(feats.numpy(), labels.numpy())
    ours = torch.softmax(head(feats), -1).detach().numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(feats.numpy()), atol=2e-3)


@pytest.mark.parametrize("when,kind", [("before", "logistic"), ("after", "logistic"), ("after", "lda")])
def test_head_fit_refits_only_the_head_on_every_token_features(tiny_cfg, when, kind):
    from fedtune.heads import extract_features

    torch.manual_seed(0)
    model = build_model(tiny_cfg, {"digit": 10})
    cfg = method_cfg("bsr", bsr={"train_blocks": [3], "drop_blocks": [1], "keep_ratio": 0.5})
    method = make_method(cfg, model, None, batch_size=8)
    data = tiny_data(40)
    trainer = Trainer(model, method, TrainConfig(epochs=1, batch_size=8, lr=1e-3, head_fit=when, head_fit_reg=1e-3, head_fit_kind=kind))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = trainer.train(data)
    assert result.head_fit_s > 0 and result.head_fit_flops > 0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= set(result.update_counts) | {"heads.digit.weight", "heads.digit.bias"}
    feats, labels = extract_features(model, data, "digit")
    train_acc = float((model.heads["digit"](feats).argmax(-1) == labels).float().mean())
    assert train_acc > 0.5, "a head fitted to these features (before the epoch, too) is far above chance (0.1)"
    if when == "after":
        # a nearly unpenalised fit separates 40 points in 32 dimensions
        assert train_acc == 1.0
        assert trainer.evaluate(data)["accuracy"] == 1.0, "the head fits the dense, every-token model that is evaluated"
    with pytest.raises(ConfigError, match="head_fit"):
        TrainConfig(head_fit="sometimes").validate("train.")
    with pytest.raises(ConfigError, match="head_fit_kind"):
        TrainConfig(head_fit_kind="svm").validate("train.")
    with pytest.raises(ConfigError, match="head_fit_reg"):
        TrainConfig(head_fit_reg=-1.0).validate("train.")
    from fedtune.runconfig import FederationConfig

    with pytest.raises(ConfigError, match="federation.head_fit"):
        FederationConfig(head_fit="ridge").validate("federation.")



@pytest.mark.parametrize("lora", [False, True])
def test_cost_model_leaves_the_model_as_it_found_it(tiny_model, lora):
    """Calibrating activations and counting trainable state go through set_trainable; the
    model's requires_grad flags and train/eval mode must come back unchanged."""
    if lora:
        prepare_model(tiny_model, method_cfg("bsr+lora"))
    tiny_model.eval()
    flags = {n: i % 3 == 0 for i, (n, _) in enumerate(tiny_model.named_parameters())}
    for n, p in tiny_model.named_parameters():
        p.requires_grad_(flags[n])
    cm = CostModel(tiny_model)
    for plan in (Plan(depth=4, trained=frozenset(range(4)), train_embed=True, lora=lora), Plan(depth=4, trained=frozenset({2}), lora=lora), Plan(depth=4)):
        assert cm.estimate(plan, 8).activation_bytes >= 0
    assert {n: p.requires_grad for n, p in tiny_model.named_parameters()} == flags
    assert not tiny_model.training


def test_named_parameter_groups_drive_trainability_and_the_optimizer(tiny_model):
    from fedtune.engine import param_group

    p = {n: q for n, q in tiny_model.named_parameters()}
    assert param_group("vit.blocks.2.attn.qkv.weight", p["vit.blocks.2.attn.qkv.weight"]).block == 2
    assert param_group("vit.pos_embed", p["vit.pos_embed"]).kind == "embed" and not param_group("vit.pos_embed", p["vit.pos_embed"]).decays
    assert param_group("heads.digit.weight", p["heads.digit.weight"]).task == "digit"
    assert param_group("vit.norm.weight", p["vit.norm.weight"]).kind == "norm"
    bias = param_group("vit.blocks.0.mlp.fc1.bias", p["vit.blocks.0.mlp.fc1.bias"])
    assert bias.kind == "block" and not bias.decays
    w = torch.nn.Parameter(torch.zeros(2, 2))
    assert param_group("vit.blocks.1.mlp.experts.3.fc1.weight", w).expert == 3
    assert param_group("vit.blocks.1.mlp.shared_experts.0.fc1.weight", w).expert is None
    assert param_group("vit.blocks.1.mlp.routers.a.weight", w).router
    assert param_group("vit.blocks.1.attn.qkv.lora_A.default.weight", w).lora
    assert param_group("consolidator.score.weight", w).kind == "consolidator"

    method = make_method(MethodConfig(name="full"), tiny_model, None, 4)
    decay = {id(q) for g in Trainer(tiny_model, method, TrainConfig()).optimizer.param_groups if g["weight_decay"] > 0 for q in g["params"]}
    assert len(decay) == len(p)  # decay_all (the default): every parameter decays
    groups = Trainer(tiny_model, method, TrainConfig(decay_all=False, head_lr=0.1)).optimizer.param_groups
    no_decay = {id(q) for g in groups if g["weight_decay"] == 0.0 for q in g["params"]}
    assert no_decay == {id(q) for n, q in p.items() if q.ndim <= 1 or n in ("vit.pos_embed", "vit.cls_token")}
    assert {id(q) for g in groups if g["lr"] == 0.1 for q in g["params"]} == {id(p["heads.digit.weight"]), id(p["heads.digit.bias"])}


def test_learning_rate_warms_up_then_follows_a_cosine_to_zero():
    from fedtune.trainer import lr_at

    cfg = TrainConfig(warmup_steps=3)
    got = [lr_at(s, 11, cfg) for s in range(11)]
    assert got[:3] == pytest.approx([0.25, 0.5, 0.75])  # (s + 1) / (warmup + 1): never 0, never a jump to 1
    assert got[3] == pytest.approx(1.0) and got[7] == pytest.approx(0.5)  # the cosine starts at 1, half-way at 0.5
    assert all(a > b for a, b in zip(got[3:-1], got[4:], strict=True)) and got[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lr_at(50, 11, cfg) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    assert [lr_at(s, 11, TrainConfig(warmup_steps=3, schedule="constant")) for s in (3, 10)] == [1.0, 1.0]
    assert lr_at(2, 2, TrainConfig(warmup_steps=0)) == pytest.approx(0.0, abs=1e-12) and lr_at(0, 2, TrainConfig(warmup_steps=0)) == 1.0


def test_proc_fields_are_read_in_bytes(tmp_path):
    from fedtune.profiles import proc_kib_field

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24576000 kB\nMemAvailable:   12288000 kB\nBroken: x kB\n")
    assert proc_kib_field(str(meminfo), "MemAvailable") == 12288000 * 1024
    assert proc_kib_field(str(meminfo), "MemFree") is None and proc_kib_field(str(meminfo), "Broken") is None
    assert proc_kib_field(str(tmp_path / "missing"), "MemAvailable") is None


def test_a_containers_memory_limit_bounds_the_measured_profile(tmp_path, monkeypatch):
    from fedtune import profiles

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("2147483648\n")
    (v2 / "memory.current").write_text("536870912\n")
    assert profiles.cgroup_available_bytes(v2) == 1536 << 20
    # the inactive file cache (a data set just read) is reclaimable: it does not count as used
    (v2 / "memory.stat").write_text("anon 100\nfile 400\ninactive_file 268435456\nactive_file 5\n")
    assert profiles.cgroup_available_bytes(v2) == 1792 << 20
    (v2 / "memory.max").write_text("max\n")
    assert profiles.cgroup_available_bytes(v2) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    (v1 / "memory.usage_in_bytes").write_text("100\n")
    assert profiles.cgroup_available_bytes(tmp_path / "v1") is None
    (v1 / "memory.limit_in_bytes").write_text("1073741824\n")
    assert profiles.cgroup_available_bytes(tmp_path / "v1") == (1 << 30) - 100
    (v1 / "memory.stat").write_text("cache 80\ntotal_inactive_file 60\n")
    assert profiles.cgroup_available_bytes(tmp_path / "v1") == (1 << 30) - 40
    assert profiles.cgroup_available_bytes(tmp_path / "none") is None
    # no cgroup namespace: /proc/self/cgroup names the process's own folder below the root;
    # its limit and its parents' count, the smallest left wins
    host = tmp_path / "host"
    own = host / "system.slice" / "job.scope"
    own.mkdir(parents=True)
    (host / "memory.max").write_text("max\n")
    (own / "memory.max").write_text("1073741824\n")
    (own / "memory.current").write_text("100\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/job.scope\n")
    assert profiles.cgroup_available_bytes(host, proc) == (1 << 30) - 100
    (host / "system.slice" / "memory.max").write_text("536870912\n")
    (host / "system.slice" / "memory.current").write_text("0\n")
    assert profiles.cgroup_available_bytes(host, proc) == 1 << 29
    proc.write_text("4:memory:/docker/abc\n1:cpu:/\n")  # v1: the memory controller's line
    (host / "memory" / "docker" / "abc").mkdir(parents=True)
    (host / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("2097152\n")
    (host / "memory" / "docker" / "abc" / "memory.usage_in_bytes").write_text("1048576\n")
    assert profiles.cgroup_available_bytes(host, proc) == 1 << 20
    # a 2 GiB container on a host with 64 GiB available: the container's figure
    monkeypatch.setattr(profiles, "proc_kib_field", lambda path, key: 64 << 30)
    monkeypatch.setattr(profiles, "cgroup_available_bytes", lambda: 2 << 30)
    assert profiles.available_memory_bytes() == 2 << 30
    assert profiles.measured_profile().memory_bytes == 512 << 20


def test_lda_head_fit_on_a_client_with_one_class(tiny_model):
    """train.head_fit_kind lda fits a personal head on the client's own data: with one class it
    predicts that class (a discriminant needs two), with a few it refits without failing."""
    method = make_method(from_dict(MethodConfig, {"name": "full"}), tiny_model, None, 8)
    trainer = Trainer(tiny_model, method, TrainConfig(epochs=1, batch_size=8, head_fit="before", head_fit_kind="lda"))
    data = tiny_data()
    one = ImageSet(images=data.images, labels={"digit": torch.full((len(data),), 3)}, num_classes={"digit": 10})
    trainer.fit_heads(one)
    assert trainer.evaluate(one)["accuracy"] == 1.0
    trainer.fit_heads(data)  # 24 examples of 10 classes in 192 dimensions
    assert trainer.evaluate(data)["accuracy"] > 0.5
