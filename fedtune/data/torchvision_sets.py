"""torchvision's data set classes (`torchvision:<ClassName>`), read from data.root."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .core import (
    DataConfig,
    ImageSet,
    _as_nchw,
    _cap,
    _item_to_array,
    _labels_to_tensors,
    _stack_images,
    _to_model_images,
)

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
    except (ValueError, TypeError) as exc:  # e.g. EMNIST's split= names a subset, OxfordIIITPet's is trainval/test
        raise ConfigError(
            f"data.name: torchvision:{name} could not be built with {kwargs}: {exc}; a set whose split= names a "
            "subset (EMNIST) or other splits (OxfordIIITPet) loads with imagefolder or hf: instead"
        ) from exc
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


