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
    """The shipped backbone (see `shipped_asset`)."""
    return shipped_asset(DEFAULT_BACKBONE.name)


def shipped_asset(name: str) -> Path | None:
    """A file fedtune ships in `fedtune/assets/`: next to this module, or, when this module runs
    from a copy without binary files (a Flower app bundle), in the installed fedtune
    distribution or the cache."""
    candidates = [ASSETS / name]
    try:
        from importlib import metadata

        dist = metadata.distribution("fedtune")
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
        if direct.get("url", "").startswith("file://"):  # percent-encoded (a path with spaces)
            from urllib.parse import urlparse
            from urllib.request import url2pathname

            candidates.append(Path(url2pathname(urlparse(direct["url"]).path)) / "fedtune" / "assets" / name)
        candidates.append(Path(str(dist.locate_file(f"fedtune/assets/{name}"))))
    except (ImportError, metadata.PackageNotFoundError, ValueError):
        pass
    candidates.append(cache_dir() / "pretrained" / name)
    return next((p for p in candidates if p.is_file()), None)


def cache_dir() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def resolve_pretrained(model: ModelConfig) -> ModelConfig:
    """'default' means the shipped backbone (made by `fedtune pretrain`); 'asset:NAME' another
    file shipped in fedtune/assets/ (found wherever fedtune is installed)."""
    if isinstance(model.pretrained, str) and model.pretrained.startswith("asset:"):
        name = model.pretrained[len("asset:") :]
        path = shipped_asset(name) if name and Path(name).name == name else None
        if path is None:
            shipped = sorted(p.name for p in ASSETS.glob("*.safetensors"))
            raise ConfigError(f"model.pretrained: no shipped asset {name!r}; fedtune/assets/ has {', '.join(shipped) or 'none'}")
        return replace(model, pretrained=str(path))
    if model.pretrained != "default":
        return model
    path = default_backbone()
    if path is None:
        raise ConfigError(f"model.pretrained: the default backbone {DEFAULT_BACKBONE} is missing (a damaged install?); reinstall fedtune, "
                          "or rebuild it with README's two pretrain commands (section 'Pretrained backbone'), or give another file")
    return replace(model, pretrained=str(path))
