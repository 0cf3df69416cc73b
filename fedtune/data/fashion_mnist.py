"""Zalando's Fashion-MNIST from its idx files: data.root, Debian's dataset-fashion-mnist, or a torchvision download."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .core import (
    DataConfig,
    ImageSet,
    _cap,
    _labels_to_tensors,
    _to_model_images,
)

FASHION_CLASSES: dict[str, list[str]] = {
    "garment": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}
FASHION_DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# --- Fashion-MNIST ----------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not) as a numpy array; a malformed file is a ConfigError naming it."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # gzip raises EOFError on a truncated stream
        raise ConfigError(f"cannot read idx file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"{path} is not an idx file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(raw) < header:
        raise ConfigError(f"{path}: truncated idx header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ConfigError(
            f"{path}: idx file is truncated or corrupt: {len(raw)} bytes for shape {shape} "
            f"(expected {expected})"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


DOWNLOAD_ROOT = Path.home() / ".cache" / "fedtune" / "data"  # data.download: true without data.root


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_folder(cfg: DataConfig) -> Path:
    """The folder holding the four Fashion-MNIST idx files (downloading them if allowed)."""
    stems = [s for pair in FASHION_FILES.values() for s in pair]
    if cfg.root is not None:
        root = Path(cfg.root).expanduser()
        candidates = [root, root / "FashionMNIST" / "raw", root / "raw"]  # the last two: torchvision's layout
    else:  # Debian's package, then where data.download: true without a root puts it
        candidates = [FASHION_DEBIAN_ROOT, DOWNLOAD_ROOT / "FashionMNIST" / "raw"]
    for folder in candidates:
        if all(_idx_path(folder, s) for s in stems):
            return folder
    if cfg.download:
        import torchvision

        root = Path(cfg.root).expanduser() if cfg.root else DOWNLOAD_ROOT
        try:
            torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
            torchvision.datasets.FashionMNIST(str(root), train=False, download=True)
        except (RuntimeError, OSError) as exc:
            raise ConfigError(f"data.download: torchvision could not download Fashion-MNIST into {root}: {exc}") from exc
        return root / "FashionMNIST" / "raw"
    for folder in candidates:  # name the first file missing from a folder that has some of them
        present = [s for s in stems if _idx_path(folder, s)]
        if present:
            missing = next(s for s in stems if not _idx_path(folder, s))
            raise ConfigError(f"data.root: {folder} has no {missing} (or {missing}.gz), one of Fashion-MNIST's four idx files")
    where = f"data.root {cfg.root!r}" if cfg.root is not None else f"{FASHION_DEBIAN_ROOT} or {DOWNLOAD_ROOT} (no data.root given)"
    raise ConfigError(
        f"Fashion-MNIST not found in {where}. Get it one of three ways: point data.root at a folder "
        f"with the idx files ({', '.join(stems)}, gzipped or not); `apt-get install "
        "dataset-fashion-mnist` (Debian/Ubuntu) and leave data.root unset; or set data.download=true "
        "to let torchvision download it (needs internet)"
    )


def _load_fashion_mnist(cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    folder = fashion_mnist_folder(cfg)
    parts = []
    for stream, (image_stem, label_stem) in enumerate(FASHION_FILES.values(), start=1):
        images = read_idx(_idx_path(folder, image_stem))
        labels = read_idx(_idx_path(folder, label_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ConfigError(
                f"{folder}: {image_stem} has shape {images.shape} and {label_stem} {labels.shape}; "
                "expected [N, 28, 28] images and N labels"
            )
        if labels.size and labels.max() >= 10:
            raise ConfigError(f"{folder / label_stem}: label {int(labels.max())} is not a Fashion-MNIST class (0-9)")
        index = _cap(np.arange(len(labels)), cfg.max_train if stream == 1 else cfg.max_test, cfg.seed, stream)
        parts.append(
            ImageSet(
                _to_model_images(images[index][:, None], cfg.channels, cfg.img_size, scale=255.0),
                _labels_to_tensors({"garment": labels[index]}),
                {task: len(names) for task, names in FASHION_CLASSES.items()},
                {task: list(names) for task, names in FASHION_CLASSES.items()},
            )
        )
    return parts[0], parts[1]


