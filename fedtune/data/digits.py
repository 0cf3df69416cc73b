"""scikit-learn's bundled 8x8 digits (tasks digit, parity, magnitude)."""

from __future__ import annotations

import numpy as np

from .core import (
    DataConfig,
    ImageSet,
    _caps,
    _labels_to_tensors,
    _split,
    _to_model_images,
)

DIGITS_CLASSES: dict[str, list[str]] = {
    "digit": [str(d) for d in range(10)],
    "parity": ["even", "odd"],
    "magnitude": ["<5", ">=5"],
}

# --- digits -----------------------------------------------------------------------------------


def _load_digits(cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (bunch.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in 0..1
    digit = bunch.target.astype(np.int64)
    train, test = _caps(cfg, *_split(digit, cfg.test_fraction, cfg.seed))

    def build(index: np.ndarray) -> ImageSet:
        y = digit[index]
        labels = {"digit": y, "parity": y % 2, "magnitude": (y >= 5).astype(np.int64)}
        return ImageSet(
            _to_model_images(pixels[index], cfg.channels, cfg.img_size, scale=1.0),
            _labels_to_tensors(labels),
            {task: len(names) for task, names in DIGITS_CLASSES.items()},
            {task: list(names) for task, names in DIGITS_CLASSES.items()},
        )

    return build(train), build(test)


