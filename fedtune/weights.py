"""Where pretrained weights come from: the backbone shipped with fedtune, the cache, and
what `model.pretrained: default` means."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from .errors import ConfigError
from .model import ModelConfig

ASSETS = Path(__file__).parent / "assets"
DEFAULT_BACKBONE = ASSETS / "vit_tiny_p4_32_pretrained.safetensors"  # made by `fedtune pretrain` (README)


def default_backbone() -> Path | None:
    """The shipped backbone: next to this module, or, when this module runs from a copy without
    binary files (a Flower app bundle), in the installed fedtune distribution or the cache."""
    name = DEFAULT_BACKBONE.name
    candidates = [DEFAULT_BACKBONE]
    try:
        from importlib import metadata

        dist = metadata.distribution("fedtune")
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
        if direct.get("url", "").startswith("file://"):
            candidates.append(Path(direct["url"][7:]) / "fedtune" / "assets" / name)
        candidates.append(Path(str(dist.locate_file(f"fedtune/assets/{name}"))))
    except (ImportError, metadata.PackageNotFoundError, ValueError):
        pass
    candidates.append(cache_dir() / "pretrained" / name)
    return next((p for p in candidates if p.is_file()), None)


def cache_dir() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def resolve_pretrained(model: ModelConfig) -> ModelConfig:
    """'default' means the shipped backbone (made by `fedtune pretrain`)."""
    if model.pretrained != "default":
        return model
    path = default_backbone()
    if path is None:
        raise ConfigError(f"model.pretrained: the default backbone {DEFAULT_BACKBONE} is missing; run `fedtune pretrain --out {DEFAULT_BACKBONE}`")
    return replace(model, pretrained=str(path))
