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

import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError

# Task names and class names of the embedded sets.
DIGITS_CLASSES: dict[str, list[str]] = {
    "digit": [str(d) for d in range(10)],
    "parity": ["even", "odd"],
    "magnitude": ["<5", ">=5"],
}
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
FASHION_CLASSES: dict[str, list[str]] = {
    "garment": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}
FASHION_DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
PARTITION_SCHEMES = ("iid", "dirichlet", "pathological")
CLASS_ASSIGNMENT_MODES = ("deterministic", "random", "first-deterministic")

_NAMES_HELP = (
    "digits, shapes, fashion_mnist, imagefolder, torchvision:<ClassName> (e.g. torchvision:CIFAR10) "
    "or hf:<dataset name or local path>"
)
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5  # pixels in 0..1 become (p - mean) / std: -1..1 (export writes these too)


def normalize_pixels(x: torch.Tensor) -> torch.Tensor:
    """Pixels in 0..1 -> the model's input range."""
    return (x - PIXEL_MEAN) / PIXEL_STD


_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")


@dataclass
class DataConfig:
    name: str = (
        "digits"  # digits | shapes | fashion_mnist | torchvision:<ClassName> | imagefolder | hf:<name or path>
    )
    root: str | None = None  # folder of torchvision / imagefolder / fashion_mnist idx files
    download: bool = False  # torchvision, fashion_mnist: allow downloading (needs internet)
    img_size: int = 32  # images are resized to img_size x img_size
    channels: int = 3  # 1 or 3 (grey images are repeated to 3 channels)
    test_fraction: float = 0.2  # test share for sets without a given test split
    seed: int = 0  # seeds the split, the caps and the generated shapes
    tasks: list[str] | None = None  # label types to keep, in this order; None = all
    max_train: int | None = None  # cap on the train set (seeded subsample), for quick runs
    max_test: int | None = None  # cap on the test set
    num_samples: int = 2000  # size of the generated "shapes" set (train + test)
    shapes_seed_offset: int = 0  # a different offset gives a disjoint "shapes" set
    hf_image_key: str = "image"  # hf: image column
    hf_label_keys: list[str] = field(default_factory=lambda: ["label"])  # hf: one task per column
    hf_train_split: str = "train"
    hf_test_split: str | None = "test"  # None or missing: split train by test_fraction

    @property
    def kind(self) -> str:
        """The source: digits, shapes, imagefolder, torchvision or hf."""
        return self.name.split(":", 1)[0]

    @property
    def source(self) -> str:
        """What follows "torchvision:" or "hf:" in the name ("" for the others)."""
        return self.name.split(":", 1)[1] if ":" in self.name else ""

    def validate(self, prefix: str = "") -> None:
        if self.kind not in _SOURCES or (self.kind in ("torchvision", "hf")) != (":" in self.name):
            raise ConfigError(f"{prefix}name: unknown data set {self.name!r}; use {_NAMES_HELP}")
        if self.kind in ("torchvision", "hf") and not self.source.strip():
            raise ConfigError(f"{prefix}name: {self.name!r} names no data set after the colon")
        if self.kind in ("torchvision", "imagefolder") and not self.root:
            raise ConfigError(
                f"{prefix}root: data set {self.name!r} needs data.root, the folder that holds its files"
            )
        if self.img_size < 4:
            raise ConfigError(f"{prefix}img_size: must be at least 4, got {self.img_size}")
        if self.channels not in (1, 3):
            raise ConfigError(f"{prefix}channels: must be 1 or 3, got {self.channels}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(
                f"{prefix}test_fraction: must be between 0 and 1 (exclusive), got {self.test_fraction}"
            )
        for key in ("max_train", "max_test"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(
                    f"{prefix}{key}: must be positive (or null for no cap), got {value}"
                )
        if self.num_samples < 2:
            raise ConfigError(f"{prefix}num_samples: must be at least 2, got {self.num_samples}")
        for key in ("seed", "shapes_seed_offset"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}{key}: must be >= 0, got {getattr(self, key)}")
        if self.tasks is not None:
            if not self.tasks:
                raise ConfigError(
                    f"{prefix}tasks: must name at least one task (or be null for all)"
                )
            if len(set(self.tasks)) != len(self.tasks):
                raise ConfigError(f"{prefix}tasks: lists a task twice: {self.tasks}")
        if not self.hf_image_key:
            raise ConfigError(f"{prefix}hf_image_key: must not be empty")
        if not self.hf_label_keys or len(set(self.hf_label_keys)) != len(self.hf_label_keys):
            raise ConfigError(
                f"{prefix}hf_label_keys: must list at least one column, each once; got {self.hf_label_keys}"
            )
        if not self.hf_train_split:
            raise ConfigError(f"{prefix}hf_train_split: must not be empty")
        if self.hf_test_split == "":
            raise ConfigError(f"{prefix}hf_test_split: must be a split name or null")


class _Batches:
    """Mini-batches of one ImageSet; a fresh seeded shuffle each time it is iterated."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool, seed: int
    ):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self._generator = torch.Generator().manual_seed(seed) if shuffle else None

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self._generator is not None:
            order = torch.randperm(n, generator=self._generator)
        else:
            order = torch.arange(n)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            # index_select copies, so in-place augmentation cannot alter the set
            yield self.images.index_select(0, index), self.labels.index_select(0, index)


@dataclass
class ImageSet:
    images: torch.Tensor  # float32 [N, C, H, W], normalized with mean 0.5, std 0.5
    labels: dict[str, torch.Tensor]  # task -> int64 [N]
    num_classes: dict[str, int]  # task -> number of classes
    class_names: dict[str, list[str]] = field(default_factory=dict)  # task -> names, when known

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(self.images.shape)}")
        for task, y in self.labels.items():
            if y.shape != (len(self.images),):
                raise ValueError(
                    f"labels of task {task!r} have shape {tuple(y.shape)}, expected ({len(self.images)},)"
                )
            if task not in self.num_classes:
                raise ValueError(f"task {task!r} has labels but no num_classes")

    @property
    def tasks(self) -> list[str]:
        return list(self.labels)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: Sequence[int] | np.ndarray | torch.Tensor) -> ImageSet:
        """The samples at `index` (ints, or a boolean mask), in that order."""
        if isinstance(index, torch.Tensor):
            idx = index if index.dtype == torch.bool else index.long()
        else:
            array = np.asarray(index)
            idx = torch.from_numpy(array if array.dtype == bool else array.astype(np.int64))
        return ImageSet(
            self.images[idx],
            {task: y[idx] for task, y in self.labels.items()},
            dict(self.num_classes),
            {task: list(names) for task, names in self.class_names.items()},
        )

    def with_tasks(self, tasks: Sequence[str]) -> ImageSet:
        """The same samples with only `tasks`, in that order."""
        for task in tasks:
            self._check_task(task)
        return ImageSet(
            self.images,
            {t: self.labels[t] for t in tasks},
            {t: self.num_classes[t] for t in tasks},
            {t: self.class_names[t] for t in tasks if t in self.class_names},
        )

    def loader(
        self, batch_size: int, shuffle: bool, seed: int = 0, task: str | None = None
    ) -> _Batches:
        """Batches of (images, labels of `task`, default the first); the last partial batch is kept.

        With shuffle, each pass over the loader draws a new order from one generator seeded
        here, so epochs differ but the whole sequence is fixed by `seed`.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        task = self.tasks[0] if task is None else task
        self._check_task(task)
        return _Batches(self.images, self.labels[task], batch_size, shuffle, seed)

    def _check_task(self, task: str) -> None:
        if task not in self.labels:
            raise ConfigError(f"no task {task!r} in this data; available: {', '.join(self.tasks)}")


@dataclass
class DataSplit:
    name: str
    train: ImageSet
    test: ImageSet


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


# --- image conversion -------------------------------------------------------------------------


def _pixel_scale(array: np.ndarray) -> float:
    """The value of a white pixel: 255 for uint8, 1 for floats in 0..1."""
    if array.dtype == np.uint8:
        return 255.0
    peak = float(array.max()) if array.size else 1.0
    if np.issubdtype(array.dtype, np.floating):
        return 1.0 if peak <= 1.0 else 255.0
    return 255.0 if peak <= 255 else 65535.0


def _to_model_images(
    array: np.ndarray, channels: int, size: int, scale: float | None = None, chunk: int = 2048
) -> torch.Tensor:
    """[N, C, H, W] pixels (C in 1..4) -> float32 [N, channels, size, size], normalized to -1..1."""
    scale = _pixel_scale(array) if scale is None else scale
    out = torch.empty((array.shape[0], channels, size, size), dtype=torch.float32)
    for start in range(0, array.shape[0], chunk):
        x = torch.from_numpy(np.ascontiguousarray(array[start : start + chunk])).float() / scale
        if x.shape[1] in (2, 4):  # drop alpha
            x = x[:, : x.shape[1] - 1]
        if channels == 1 and x.shape[1] == 3:
            x = (x * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if tuple(x.shape[-2:]) != (size, size):
            shrink = x.shape[-1] > size or x.shape[-2] > size
            x = F.interpolate(
                x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
            )
        out[start : start + len(x)] = normalize_pixels(x.clamp(0.0, 1.0))  # broadcasts 1 -> 3
    return out


def _pil_to_array(image: Any, channels: int) -> np.ndarray:
    """A PIL image as an [H, W] (grey) or [H, W, 3] uint8 array."""
    grey = channels == 1 or image.mode in _GREY_MODES
    return np.asarray(image.convert("L" if grey else "RGB"))


def _item_to_array(item: Any, channels: int) -> np.ndarray:
    """One image (PIL, array, tensor or nested list) as [H, W] or [H, W, C]."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return _pil_to_array(item, channels)
    if isinstance(item, dict) and item.get("bytes") is not None:  # an undecoded hf Image
        import io

        with Image.open(io.BytesIO(item["bytes"])) as image:
            return _pil_to_array(image, channels)
    array = item.numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    if array.ndim == 3 and array.shape[0] in (1, 2, 3, 4) and array.shape[-1] not in (1, 2, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 2, 3, 4)):
        raise ConfigError(f"an image has shape {array.shape}; expected [H, W] or [H, W, C]")
    return array


def _stack_images(arrays: Sequence[np.ndarray], channels: int, size: int) -> torch.Tensor:
    """Images of any sizes ([H, W] or [H, W, C]) -> float32 [N, channels, size, size]."""
    out = torch.empty((len(arrays), channels, size, size), dtype=torch.float32)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, array in enumerate(arrays):
        groups.setdefault((array.shape, array.dtype.str), []).append(i)
    for index in groups.values():
        batch = np.stack([arrays[i] for i in index])
        batch = batch[:, None] if batch.ndim == 3 else batch.transpose(0, 3, 1, 2)
        out[torch.tensor(index)] = _to_model_images(batch, channels, size)
    return out


def _as_nchw(data: np.ndarray | torch.Tensor) -> np.ndarray:
    """A bulk [N, H, W], [N, H, W, C] or [N, C, H, W] pixel array as [N, C, H, W]."""
    array = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if array.ndim == 3:
        return array[:, None]
    if array.ndim == 4:
        if array.shape[-1] in (1, 2, 3, 4) and array.shape[1] not in (1, 2, 3, 4):
            return array.transpose(0, 3, 1, 2)
        if array.shape[1] in (1, 2, 3, 4):
            return array
    raise ConfigError(f"images have shape {array.shape}; expected [N, H, W] or [N, H, W, C]")


# --- splits and caps --------------------------------------------------------------------------


def _split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test indices, stratified by `labels` where every class allows it."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    if len(labels) < 2:
        raise ConfigError(f"cannot split {len(labels)} sample(s) into train and test")
    n_test = math.ceil(test_fraction * len(labels))
    if n_test >= len(labels):
        raise ConfigError(
            f"data.test_fraction: {test_fraction} of {len(labels)} samples leaves none for training"
        )
    n_classes = len(np.unique(labels))
    stratifiable = np.unique(labels, return_counts=True)[1].min() >= 2 and (
        n_classes <= n_test <= len(labels) - n_classes
    )
    train, test = train_test_split(
        index, test_size=test_fraction, random_state=seed, stratify=labels if stratifiable else None
    )
    return np.sort(train), np.sort(test)


def _cap(index: np.ndarray, limit: int | None, seed: int, stream: int) -> np.ndarray:
    """At most `limit` of `index`, a seeded subsample kept in the original order."""
    if limit is None or len(index) <= limit:
        return index
    rng = np.random.default_rng([seed, stream])
    return np.sort(index[rng.choice(len(index), size=limit, replace=False)])


def _caps(cfg: DataConfig, train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _cap(train, cfg.max_train, cfg.seed, 1), _cap(test, cfg.max_test, cfg.seed, 2)


def _labels_to_tensors(labels: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {task: torch.as_tensor(np.asarray(y, dtype=np.int64)) for task, y in labels.items()}


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
    else:
        candidates = [FASHION_DEBIAN_ROOT]
    for folder in candidates:
        if all(_idx_path(folder, s) for s in stems):
            return folder
    if cfg.download:
        import torchvision

        root = Path(cfg.root).expanduser() if cfg.root else Path.home() / ".cache" / "fedtune" / "data"
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
    where = f"data.root {cfg.root!r}" if cfg.root is not None else f"{FASHION_DEBIAN_ROOT} (no data.root given)"
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


# --- torchvision ------------------------------------------------------------------------------


def _open_torchvision(cfg: DataConfig, train: bool) -> Any:
    import torchvision

    name = cfg.source
    cls = getattr(torchvision.datasets, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.utils.data.Dataset)):
        raise ConfigError(
            f"data.name: torchvision.datasets has no data set {name!r} "
            "(e.g. MNIST, FashionMNIST, CIFAR10, CIFAR100, SVHN)"
        )
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    if "train" in params:
        kwargs["train"] = train
    elif "split" in params:
        kwargs["split"] = "train" if train else "test"
    else:
        raise ConfigError(
            f"data.name: torchvision:{name} has neither a train= nor a split= argument; "
            "load it with imagefolder or hf: instead"
        )
    if "download" in params:
        kwargs["download"] = cfg.download
    try:
        return cls(cfg.root, **kwargs)
    except (RuntimeError, OSError) as exc:  # torchvision reports missing files as RuntimeError
        hint = (
            "the download failed; check the connection or point data.root at the files"
            if cfg.download
            else "set data.download=true or point data.root at the files (downloading needs internet)"
        )
        raise ConfigError(
            f"data.root: cannot load torchvision:{name} from {cfg.root!r} ({exc}); {hint}"
        ) from exc


def _torchvision_set(ds: Any, cfg: DataConfig, limit: int | None, stream: int) -> ImageSet:
    index = _cap(np.arange(len(ds)), limit, cfg.seed, stream)
    data = getattr(ds, "data", None)
    targets = getattr(ds, "targets", None)
    targets = getattr(ds, "labels", None) if targets is None else targets
    if (
        isinstance(data, (np.ndarray, torch.Tensor))
        and data.ndim in (3, 4)
        and len(data) == len(ds)
        and targets is not None
        and len(targets) == len(ds)
    ):  # fast path: the whole set is in memory (MNIST, CIFAR, SVHN, ...)
        array = data.numpy() if isinstance(data, torch.Tensor) else data
        images = _to_model_images(_as_nchw(array[index]), cfg.channels, cfg.img_size)
        y = np.asarray(targets)[index]
    else:
        items = [ds[int(i)] for i in index]
        images = _stack_images(
            [_item_to_array(x, cfg.channels) for x, _ in items], cfg.channels, cfg.img_size
        )
        y = np.asarray([t for _, t in items])
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(
            f"data.name: torchvision:{cfg.source} does not have one integer class label per image"
        )
    classes = getattr(ds, "classes", None)
    names = [str(c) for c in classes] if classes else []
    return ImageSet(
        images,
        _labels_to_tensors({"label": y}),
        {"label": len(names)},
        {"label": names} if names else {},
    )


def _load_torchvision(cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    train_ds, test_ds = _open_torchvision(cfg, True), _open_torchvision(cfg, False)
    train = _torchvision_set(train_ds, cfg, cfg.max_train, 1)
    test = _torchvision_set(test_ds, cfg, cfg.max_test, 2)
    if not train.class_names:  # no class list: count the labels seen
        seen = [int(s.labels["label"].max()) + 1 for s in (train, test) if len(s)]
        num = max(seen, default=0)
        train.num_classes["label"] = test.num_classes["label"] = num
    return train, test


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

    def build(all_paths: list[str], all_labels: np.ndarray, index: np.ndarray) -> ImageSet:
        arrays = []
        for i in index:
            with Image.open(all_paths[i]) as image:
                arrays.append(_pil_to_array(image, cfg.channels))
        return ImageSet(
            _stack_images(arrays, cfg.channels, cfg.img_size),
            _labels_to_tensors({"label": all_labels[index]}),
            {"label": len(classes)},
            {"label": list(classes)},
        )

    return build(paths, labels, train), build(test_paths, test_labels, test)


# --- Hugging Face -----------------------------------------------------------------------------


def _open_hf(cfg: DataConfig) -> dict[str, Any]:
    """The splits of the hf: set, by name."""
    import datasets

    name = cfg.source
    path = Path(name).expanduser()
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))  # written by save_to_disk
        else:
            loaded = datasets.load_dataset(name)
    except (OSError, ValueError) as exc:  # missing files, no connection, a malformed name
        raise ConfigError(f"data.name: cannot load Hugging Face data set {name!r}: {exc}") from exc
    if isinstance(loaded, datasets.Dataset):
        return {cfg.hf_train_split: loaded}
    return dict(loaded)


def _encode_labels(
    feature: Any, train: np.ndarray, test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int, list[str]]:
    """Labels as class ids 0..K-1 consistent across train and test, with K and the class names."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return (
            train.astype(np.int64),
            test.astype(np.int64),
            feature.num_classes,
            list(feature.names),
        )
    values = np.concatenate([train, test])
    if np.issubdtype(values.dtype, np.integer) and (len(values) == 0 or values.min() >= 0):
        num = int(values.max()) + 1 if len(values) else 0
        return train.astype(np.int64), test.astype(np.int64), num, [str(i) for i in range(num)]
    names = sorted({str(v) for v in values.tolist()})
    lookup = {n: i for i, n in enumerate(names)}

    def encode(a: np.ndarray) -> np.ndarray:
        return np.array([lookup[str(v)] for v in a.tolist()], dtype=np.int64)

    return encode(train), encode(test), len(names), names


def _load_hf(cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    splits = _open_hf(cfg)
    if cfg.hf_train_split not in splits:
        raise ConfigError(
            f"data.hf_train_split: no split {cfg.hf_train_split!r} in {cfg.source!r}; "
            f"it has: {', '.join(splits)}"
        )
    train_ds = splits[cfg.hf_train_split]
    test_ds = splits.get(cfg.hf_test_split) if cfg.hf_test_split else None
    columns = train_ds.column_names
    for key, value in [("hf_image_key", cfg.hf_image_key)] + [
        ("hf_label_keys", k) for k in cfg.hf_label_keys
    ]:
        if value not in columns or (test_ds is not None and value not in test_ds.column_names):
            raise ConfigError(
                f"data.{key}: no column {value!r} in {cfg.source!r}; columns: {', '.join(columns)}"
            )

    def column(ds: Any, key: str) -> np.ndarray:
        return np.asarray(list(ds[key]))

    raw_train = {k: column(train_ds, k) for k in cfg.hf_label_keys}
    if test_ds is None:
        train, test = _split(raw_train[cfg.hf_label_keys[0]], cfg.test_fraction, cfg.seed)
        test_ds, raw_test = train_ds, raw_train
    else:
        raw_test = {k: column(test_ds, k) for k in cfg.hf_label_keys}
        train, test = np.arange(len(train_ds)), np.arange(len(test_ds))
    train, test = _caps(cfg, train, test)

    labels: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    num_classes: dict[str, int] = {}
    names: dict[str, list[str]] = {}
    for key in cfg.hf_label_keys:
        feature = train_ds.features.get(key)
        y_train, y_test, num_classes[key], names[key] = _encode_labels(
            feature, raw_train[key][train], raw_test[key][test]
        )
        labels[key] = (y_train, y_test)

    def build(ds: Any, index: np.ndarray, part: int) -> ImageSet:
        items = ds.select(index.tolist())[cfg.hf_image_key]
        arrays = [_item_to_array(item, cfg.channels) for item in items]
        return ImageSet(
            _stack_images(arrays, cfg.channels, cfg.img_size),
            _labels_to_tensors({k: pair[part] for k, pair in labels.items()}),
            dict(num_classes),
            {k: list(v) for k, v in names.items()},
        )

    return build(train_ds, train, 0), build(test_ds, test, 1)


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


# --- partitioning -----------------------------------------------------------------------------


def partition_indices(
    labels: np.ndarray | Sequence[int],
    num_partitions: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 0,
    min_partition_size: int = 2,
    class_assignment: str = "deterministic",
) -> list[np.ndarray]:
    """Split sample indices 0..N-1 into `num_partitions` client shards with flwr-datasets.

    Schemes: "iid" (equal random shards), "dirichlet" (per-class shares drawn from
    Dirichlet(alpha); smaller alpha is more skewed; every partition gets at least
    `min_partition_size` samples), "pathological" (`classes_per_partition` classes per
    partition, assigned by `class_assignment`: deterministic, random or first-deterministic).
    Rows are shuffled with `seed` first, so every scheme depends on the seed.
    """
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shape {labels.shape}")
    n = len(labels)
    if scheme not in PARTITION_SCHEMES:
        raise ConfigError(
            f"unknown partition scheme {scheme!r}; use one of {', '.join(PARTITION_SCHEMES)}"
        )
    if not 1 <= num_partitions <= n:
        raise ConfigError(
            f"num_partitions must be between 1 and the number of samples ({n}), got {num_partitions}"
        )
    partitioner: Any
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise ConfigError(f"alpha must be > 0 for Dirichlet partitioning, got {alpha}")
        if min_partition_size < 0:
            raise ConfigError(f"min_partition_size must be >= 0, got {min_partition_size}")
        if num_partitions * min_partition_size > n:
            raise ConfigError(
                f"min_partition_size={min_partition_size} is impossible: {num_partitions} "
                f"partitions x {min_partition_size} > {n} samples"
            )
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        num_classes = len(np.unique(labels))
        if not 1 <= classes_per_partition <= num_classes:
            raise ConfigError(
                f"classes_per_partition must be between 1 and the number of classes "
                f"({num_classes}), got {classes_per_partition}"
            )
        if class_assignment not in CLASS_ASSIGNMENT_MODES:
            raise ConfigError(
                f"unknown class_assignment {class_assignment!r}; use one of "
                f"{', '.join(CLASS_ASSIGNMENT_MODES)}"
            )
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_partition,
            class_assignment_mode=class_assignment,
            shuffle=True,
            seed=seed,
        )
    order = np.random.default_rng(seed).permutation(n)
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels[order], "index": order})
    with warnings.catch_warnings():
        # Dirichlet warns on every resampling; if all attempts fail it raises, handled below.
        warnings.filterwarnings("ignore", message="The specified min_partition_size")
        try:
            return [
                np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64).reshape(-1)
                for i in range(num_partitions)
            ]
        except ValueError as exc:
            if scheme == "dirichlet":
                raise ConfigError(
                    f"Dirichlet partitioning with alpha={alpha} could not give all {num_partitions} "
                    f"partitions at least min_partition_size={min_partition_size} samples "
                    "(flwr-datasets gives up after 10 draws); raise alpha, lower "
                    "min_partition_size or use fewer partitions"
                ) from exc
            raise ConfigError(f"{scheme} partitioning failed: {exc}") from exc
