"""Image data sets as tensors, and their federated partitioning.

`load_data(cfg)` returns a `DataSplit` of two `ImageSet`s: float32 images [N, C, H, W]
normalized with mean 0.5 and std 0.5, and one int64 label tensor per task. Sources:

- "digits": scikit-learn's bundled 8x8 digits (tasks digit, parity, magnitude);
- "shapes": a generated multitask set of coloured shapes (tasks shape, colour, count);
- "fashion_mnist": Zalando's Fashion-MNIST (task garment; 60,000 train / 10,000 test), read
  from its idx files: data.root, Debian's dataset-fashion-mnist package, or a torchvision
  download (data.download);
- "torchvision:<ClassName>", "imagefolder" and "hf:<name or path>" for users' own data.

`partition_indices` splits sample indices among clients with flwr-datasets' partitioners.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ConfigError
from .core import (
    PIXEL_MEAN,
    PIXEL_STD,
    SOURCE_KINDS,
    DataConfig,
    DataSplit,
    ImageSet,
    _to_model_images,
    concat_sets,
    normalize_pixels,
)
from .digits import DIGITS_CLASSES, _load_digits
from .fashion_mnist import (
    FASHION_CLASSES,
    FASHION_DEBIAN_ROOT,
    FASHION_FILES,
    _load_fashion_mnist,
    fashion_mnist_folder,
    read_idx,
)
from .hf import _load_hf
from .imagefolder import _load_imagefolder
from .partition import CLASS_ASSIGNMENT_MODES, PARTITION_SCHEMES, partition_indices
from .shapes import SHAPES_CLASSES, _load_shapes, make_shapes
from .torchvision_sets import _load_torchvision


def load_data(cfg: DataConfig) -> DataSplit:
    """Load the data set `cfg.name` as train and test ImageSets."""
    cfg.validate("data.")
    available = _available_tasks(cfg)
    for task in cfg.tasks or []:
        if task not in available:
            raise ConfigError(
                f"data.tasks: data set {cfg.name!r} has no task {task!r}; available: {', '.join(available)}"
            )
    train, test = _SOURCES[cfg.kind](cfg)
    if cfg.tasks:
        train, test = train.with_tasks(cfg.tasks), test.with_tasks(cfg.tasks)
    return DataSplit(cfg.name, train, test)


# --- registry ---------------------------------------------------------------------------------

_SOURCES: dict[str, Callable[[DataConfig], tuple[ImageSet, ImageSet]]] = {
    "digits": _load_digits,
    "shapes": _load_shapes,
    "fashion_mnist": _load_fashion_mnist,
    "torchvision": _load_torchvision,
    "imagefolder": _load_imagefolder,
    "hf": _load_hf,
}


def _available_tasks(cfg: DataConfig) -> list[str]:
    if cfg.kind == "digits":
        return list(DIGITS_CLASSES)
    if cfg.kind == "shapes":
        return list(SHAPES_CLASSES)
    if cfg.kind == "fashion_mnist":
        return list(FASHION_CLASSES)
    if cfg.kind == "hf":
        return list(cfg.hf_label_keys)
    return ["label"]



assert set(_SOURCES) == set(SOURCE_KINDS)

__all__ = [
    "CLASS_ASSIGNMENT_MODES",
    "DIGITS_CLASSES",
    "FASHION_CLASSES",
    "FASHION_DEBIAN_ROOT",
    "FASHION_FILES",
    "PARTITION_SCHEMES",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "SHAPES_CLASSES",
    "DataConfig",
    "DataSplit",
    "ImageSet",
    "_to_model_images",
    "concat_sets",
    "fashion_mnist_folder",
    "load_data",
    "make_shapes",
    "normalize_pixels",
    "partition_indices",
    "read_idx",
]
