"""A generated multitask set of coloured shapes (tasks shape, colour, count)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .core import (
    DataConfig,
    ImageSet,
    _caps,
    _labels_to_tensors,
    _split,
    _to_model_images,
)

SHAPE_KINDS = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
SHAPES_CLASSES: dict[str, list[str]] = {
    "shape": list(SHAPE_KINDS),
    "colour": list(COLOURS),
    "count": ["1", "2", "3", "4"],
}

# --- shapes -----------------------------------------------------------------------------------


def _draw_shape(draw: Any, kind: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        s = 0.85 * r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    else:  # cross
        t = 0.35 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)


def make_shapes(num: int, size: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`num` RGB uint8 images [num, size, size, 3] of 1-4 same-kind, same-colour shapes.

    Objects sit in distinct cells of a 2x2 grid (random size and position inside the cell),
    so they never touch and the count label is exact. Labels: shape, colour, count (0..3
    for 1..4 objects).
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    shape = rng.integers(0, len(SHAPE_KINDS), num)
    colour = rng.integers(0, len(COLOURS), num)
    count = rng.integers(0, 4, num)
    background = rng.uniform(0.0, 0.15, num)
    intensity = rng.uniform(0.7, 1.0, num)
    rgb = np.array(list(COLOURS.values()))
    half = size / 2
    images = np.empty((num, size, size, 3), dtype=np.uint8)
    for i in range(num):
        grey = int(255 * background[i])
        image = Image.new("RGB", (size, size), (grey, grey, grey))
        draw = ImageDraw.Draw(image)
        fill = tuple(int(round(255 * intensity[i] * c)) for c in rgb[colour[i]])
        for cell in rng.permutation(4)[: count[i] + 1]:
            r = rng.uniform(0.12, 0.2) * size
            low, high = r + 1.0, max(half - r - 1.0, r + 1.0)
            cx = (cell % 2) * half + rng.uniform(low, high)
            cy = (cell // 2) * half + rng.uniform(low, high)
            _draw_shape(draw, SHAPE_KINDS[shape[i]], cx, cy, r, fill)
        images[i] = np.asarray(image)
    noise = rng.standard_normal(images.shape, dtype=np.float32) * (0.03 * 255)
    images = np.clip(images + noise, 0, 255).astype(np.uint8)
    return images, {"shape": shape, "colour": colour, "count": count}


def _load_shapes(cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    canvas = max(cfg.img_size, 32)  # shapes drawn below 32 pixels lose their form
    pixels, labels = make_shapes(cfg.num_samples, canvas, cfg.seed + cfg.shapes_seed_offset)
    pixels = pixels.transpose(0, 3, 1, 2)
    train, test = _caps(cfg, *_split(labels["shape"], cfg.test_fraction, cfg.seed))

    def build(index: np.ndarray) -> ImageSet:
        return ImageSet(
            _to_model_images(pixels[index], cfg.channels, cfg.img_size, scale=255.0),
            _labels_to_tensors({task: y[index] for task, y in labels.items()}),
            {task: len(names) for task, names in SHAPES_CLASSES.items()},
            {task: list(names) for task, names in SHAPES_CLASSES.items()},
        )

    return build(train), build(test)


