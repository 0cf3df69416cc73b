"""Images as tensors: the data config, ImageSet and DataSplit, image conversion, splits and caps."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError

SOURCE_KINDS = ("digits", "shapes", "fashion_mnist", "torchvision", "imagefolder", "hf")
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
    shapes_seed_offset: int = 0  # another "shapes" set: generated from seed + offset (so seed 1, offset 0 is seed 0, offset 1)
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
        if self.kind not in SOURCE_KINDS or (self.kind in ("torchvision", "hf")) != (":" in self.name):
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
        if self.hf_test_split == self.hf_train_split:
            raise ConfigError(f"{prefix}hf_test_split: {self.hf_test_split!r} is the training split too: the test set would be the training images; "
                              "name another split, or null to hold out test_fraction of the training split")


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
        order = order.to(self.images.device)
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

    def to(self, device: str | torch.device) -> ImageSet:
        """The same samples with images and labels on `device`."""
        return ImageSet(
            self.images.to(device),
            {task: y.to(device) for task, y in self.labels.items()},
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
        """Batches of (images, labels of `task`, default the first) over the images labelled for
        `task`; the last partial batch is kept.

        With shuffle, each pass over the loader draws a new order from one generator seeded
        here, so epochs differ but the whole sequence is fixed by `seed`.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        task = self.tasks[0] if task is None else task
        self._check_task(task)
        labels = self.labels[task]
        labelled = labels >= 0  # a multidomain run's images of other tasks' sources are -1 (fedtune.data.multidomain)
        if not bool(labelled.all()):
            return _Batches(self.images[labelled], labels[labelled], batch_size, shuffle, seed)
        return _Batches(self.images, labels, batch_size, shuffle, seed)

    def for_task(self, task: str) -> ImageSet:
        """The images labelled for `task` (the set itself unless a multidomain run joined sources)."""
        self._check_task(task)
        labelled = self.labels[task] >= 0
        return self if bool(labelled.all()) else self.subset(labelled)

    def count(self, task: str) -> int:
        """Images labelled for `task` (all of them, except in multidomain runs)."""
        self._check_task(task)
        return int((self.labels[task] >= 0).sum())

    def _check_task(self, task: str) -> None:
        if task not in self.labels:
            raise ConfigError(f"no task {task!r} in this data; available: {', '.join(self.tasks)}")


@dataclass
class DataSplit:
    name: str
    train: ImageSet
    test: ImageSet


def concat_sets(*sets: ImageSet) -> ImageSet:
    """The samples of `sets` one after another (same tasks and classes in each)."""
    first = sets[0]
    for other in sets[1:]:
        if other.tasks != first.tasks or other.num_classes != first.num_classes:
            raise ValueError(f"cannot join sets with tasks {first.num_classes} and {other.num_classes}")
    return ImageSet(
        torch.cat([s.images for s in sets]),
        {t: torch.cat([s.labels[t] for s in sets]) for t in first.tasks},
        dict(first.num_classes),
        {t: list(n) for t, n in first.class_names.items()},
    )


# --- image conversion -------------------------------------------------------------------------


def _pixel_scale(array: np.ndarray) -> float:
    """The value of a white pixel: 255 for uint8, 65535 for uint16 (16-bit images); otherwise
    from the brightest pixel: 1 for floats in 0..1, 255 up to 255, else 65535."""
    if array.dtype == np.uint8:
        return 255.0
    if array.dtype == np.uint16:
        return 65535.0
    peak = float(array.max()) if array.size else 1.0
    if np.issubdtype(array.dtype, np.floating) and peak <= 1.0:
        return 1.0
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


_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # 16/32-bit integer and float grey images


def _pil_to_array(image: Any, channels: int) -> np.ndarray:
    """A PIL image as an [H, W] (grey) or [H, W, 3] uint8 array; a 16-bit grey image as
    uint16, a 32-bit integer or float one as its values (PIL's convert("L") would clip them, not
    rescale them): _stack_images scales them, once for the whole set."""
    if image.mode in _WIDE_MODES:
        array = np.asarray(image)
        return array.astype(np.uint16) if image.mode.startswith("I;16") else array
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


def _pixel_peaks(*sets: Sequence[np.ndarray]) -> dict[str, float]:
    """The brightest pixel of every image in `sets`, per dtype: what decides a white pixel's
    value (_pixel_scale) for all of them."""
    peaks: dict[str, float] = {}
    for arrays in sets:
        for array in arrays:
            if array.size:
                peaks[array.dtype.str] = max(peaks.get(array.dtype.str, 0.0), float(array.max()))
    return peaks


def _stack_images(arrays: Sequence[np.ndarray], channels: int, size: int, peaks: dict[str, float] | None = None) -> torch.Tensor:
    """Images of any sizes ([H, W] or [H, W, C]) -> float32 [N, channels, size, size]. A white
    pixel's value is decided once per kind of dtype (uint8, integer, float) for the whole set,
    or from `peaks` (_pixel_peaks of the train and test sets together, so a small test set
    whose brightest float pixel is 0.9 is not scaled otherwise than its train set), not per
    group of equal shapes, so every image is scaled alike."""
    out = torch.empty((len(arrays), channels, size, size), dtype=torch.float32)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, array in enumerate(arrays):
        groups.setdefault((array.shape, array.dtype.str), []).append(i)
    peaks = _pixel_peaks(arrays) if peaks is None else peaks
    for index in groups.values():
        batch = np.stack([arrays[i] for i in index])
        batch = batch[:, None] if batch.ndim == 3 else batch.transpose(0, 3, 1, 2)
        scale = _pixel_scale(np.array([peaks.get(batch.dtype.str, 0.0)], dtype=batch.dtype))
        out[torch.tensor(index)] = _to_model_images(batch, channels, size, scale)
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


