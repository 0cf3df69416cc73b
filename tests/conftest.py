import pytest
import torch

from fedtune.model import ModelConfig, build_model

TINY = dict(name="vit_tiny_patch16_224", img_size=16, patch_size=4, depth=4, embed_dim=32, num_heads=2)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(**TINY)


@pytest.fixture
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return build_model(tiny_cfg, {"digit": 10})


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 16, 16, generator=g)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors run faster on one thread than on two busy ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
