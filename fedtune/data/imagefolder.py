"""A folder per class (`imagefolder`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .core import (
    DataConfig,
    ImageSet,
    _caps,
    _labels_to_tensors,
    _pil_to_array,
    _pixel_peaks,
    _split,
    _stack_images,
)

# --- imagefolder ------------------------------------------------------------------------------


def _load_imagefolder(cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root = Path(cfg.root or "")
    if not root.is_dir():
        raise ConfigError(f"data.root: folder {str(root)!r} does not exist")
    train_dir, test_dir = root / "train", root / "test"
    if test_dir.is_dir() and not train_dir.is_dir():
        raise ConfigError(f"data.root: {str(root)!r} has a test/ folder but no train/ folder")
    try:
        train_ds = ImageFolder(str(train_dir if train_dir.is_dir() else root))
        test_ds = ImageFolder(str(test_dir)) if test_dir.is_dir() else None
    except FileNotFoundError as exc:
        raise ConfigError(
            f"data.root: {exc}; expected root/train/<class>/*.png and root/test/<class>/..., "
            "or root/<class>/*.png"
        ) from exc
    classes = train_ds.classes
    paths = [p for p, _ in train_ds.samples]
    labels = np.array([y for _, y in train_ds.samples], dtype=np.int64)
    if test_ds is None:
        train, test = _split(labels, cfg.test_fraction, cfg.seed)
        test_paths, test_labels = paths, labels
    else:
        unknown = sorted(set(test_ds.classes) - set(classes))
        if unknown:
            raise ConfigError(
                f"data.root: test/ has classes that train/ lacks: {', '.join(unknown)}"
            )
        test_paths = [p for p, _ in test_ds.samples]
        test_labels = np.array(
            [classes.index(test_ds.classes[y]) for _, y in test_ds.samples], dtype=np.int64
        )
        train, test = np.arange(len(paths)), np.arange(len(test_paths))
    train, test = _caps(cfg, train, test)

    def read(all_paths: list[str], index: np.ndarray) -> list[np.ndarray]:
        arrays = []
        for i in index:
            try:
                with Image.open(all_paths[i]) as image:
                    arrays.append(_pil_to_array(image, cfg.channels))
            except (OSError, ValueError) as exc:  # truncated, undecodable or not an image
                raise ConfigError(f"data.root: cannot read image {all_paths[i]}: {exc}") from exc
        return arrays

    train_arrays, test_arrays = read(paths, train), read(test_paths, test)
    peaks = _pixel_peaks(train_arrays, test_arrays)  # train and test scaled alike

    def build(arrays: list[np.ndarray], y: np.ndarray) -> ImageSet:
        return ImageSet(
            _stack_images(arrays, cfg.channels, cfg.img_size, peaks),
            _labels_to_tensors({"label": y}),
            {"label": len(classes)},
            {"label": list(classes)},
        )

    return build(train_arrays, labels[train]), build(test_arrays, test_labels[test])


