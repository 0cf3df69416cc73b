"""The engine and the trainer on a CUDA device: timm equality, and every method's training
step against the same step on the CPU. Skipped without a GPU (CI has none)."""

import pytest
import torch

from fedtune.engine import forward_plan, full_plan
from fedtune.methods import make_method, prepare_model
from fedtune.model import ModelConfig, build_model
from fedtune.trainer import TrainConfig, Trainer, _loss, balanced_softmax_adjustment

from .conftest import TINY
from .test_engine import timm_twin
from .test_methods import method_cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_base_patch16_224"])
def test_engine_forward_equals_timm_on_cuda(name):
    model, ref = timm_twin(name, 32)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        on_cpu = forward_plan(model, x, full_plan(model.depth))
        model.cuda(), ref.cuda()
        expected = ref(x.cuda())
        got = forward_plan(model, x.cuda(), full_plan(model.depth))
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.cpu(), on_cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("spec", ["full", "head", "bsr", "alast", "sherl", "alast+lora"])
def test_a_training_step_on_cuda_matches_the_cpu_step(spec):
    """Same weights, batch and plan: the loss, the logits and every gradient agree, and the
    same parameters (only the plan's) get gradients."""
    got = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**TINY), {"digit": 10})
        cfg = method_cfg(spec)
        prepare_model(model, cfg)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # the CPU's and the GPU's random streams differ (SHERL's side path has dropout)
        model.to(device)
        trainer = Trainer(model, make_method(cfg, model, None, batch_size=8), TrainConfig(epochs=1, batch_size=8, lr=1e-2))
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.arange(8) % 10
        stats, plan, logits = trainer.train_step(x.to(device), y.to(device))
        grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
        got[device] = (stats, plan, logits.cpu(), grads)
    (cpu_stats, cpu_plan, cpu_logits, cpu_grads), (stats, plan, logits, grads) = got["cpu"], got["cuda"]
    assert plan == cpu_plan
    assert stats.loss == pytest.approx(cpu_stats.loss, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(logits, cpu_logits, rtol=1e-3, atol=1e-4)
    assert set(grads) == set(cpu_grads) and grads
    for name, grad in grads.items():
        scale = float(cpu_grads[name].abs().max()) + 1e-12
        torch.testing.assert_close(grad, cpu_grads[name], rtol=1e-3, atol=1e-4 * scale, msg=name)
    assert stats.activation_bytes > 0 and stats.trainable_params == cpu_stats.trainable_params


def test_balanced_softmax_on_cuda_with_priors_from_cpu_labels():
    labels = torch.tensor([0, 0, 1, 1, 1])
    prior = balanced_softmax_adjustment(labels, 4)  # made on the CPU, as the client makes it
    logits = torch.randn(5, 4)
    want = _loss(logits, labels, 0.1, prior)
    torch.testing.assert_close(_loss(logits.cuda(), labels.cuda(), 0.1, prior).cpu(), want, rtol=1e-5, atol=1e-6)


def test_bench_trains_and_evaluates_on_cuda(tmp_path):
    """`bench.device: cuda`: data and model on the GPU, the same report as on the CPU."""
    from fedtune.bench import BenchConfig, run_bench
    from fedtune.data import DataConfig

    cfg = BenchConfig(model=ModelConfig(**TINY), data=DataConfig(name="digits", img_size=16, max_train=64, max_test=32),
                      train=TrainConfig(epochs=1, batch_size=16, flops_every=2), methods=["full", "alast"], seeds=[0], device="cuda")
    report = run_bench(cfg, tmp_path, progress=False)
    assert report["device"] != "cpu" and report["methods"]["alast"]["blocks_trained_mean"] > 0
    assert 0.0 <= report["methods"]["full"]["test_accuracy"] <= 1.0
