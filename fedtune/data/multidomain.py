"""Tasks from different data sets in one run (`task_data` in a run config).

Each task names its own data source (a DataConfig; its `tasks: [label]` picks which of the
source's label types the task is, default the source's first). Tasks that name the same
source share its images. Every source's images are brought to the run's `data.img_size`
and `data.channels` and joined into one ImageSet whose label of a task is -1 on the images
of other sources; `ImageSet.loader` and everything built on it (training, features, the
head fits) only see the images labelled for the task asked for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import ConfigError
from ..typedconfig import to_dict
from .core import DataConfig, DataSplit, ImageSet, concat_sets

UNLABELLED = -1  # a task's label on an image of another task's data source


@dataclass
class SourceGroup:
    """One data source and the tasks that read it."""

    data: DataConfig  # the source, at the run's image size and channels, all its label types
    tasks: dict[str, str]  # task -> the source's label type


def source_groups(task_data: dict[str, DataConfig], base: DataConfig) -> list[SourceGroup]:
    """The run's data sources, each once, with the tasks that read it (in task order)."""
    groups: dict[str, SourceGroup] = {}
    for task, src in task_data.items():
        if src.tasks is not None and len(src.tasks) != 1:
            raise ConfigError(f"task_data.{task}.tasks: name the one label type of {src.name!r} that task {task!r} is, e.g. [label]; got {src.tasks}")
        data = replace(src, img_size=base.img_size, channels=base.channels, tasks=None)
        key = json.dumps(to_dict(data), sort_keys=True)
        group = groups.setdefault(key, SourceGroup(data, {}))
        group.tasks[task] = src.tasks[0] if src.tasks else ""
    _same_source_same_split(list(groups.values()))
    return list(groups.values())


def _images_of(data: DataConfig) -> tuple:
    """What decides a source's images: two configs with the same key read the same images
    (generated shapes by their generator's seed; a folder by its real path)."""
    if data.kind == "shapes":
        return (data.name, data.num_samples, data.seed + data.shapes_seed_offset)
    root = os.path.realpath(os.path.expanduser(data.root)) if data.root else None
    return (data.name, root, data.hf_image_key if data.kind == "hf" else None)


# how a source's images are split into train and test (caps aside; an hf set's held-out test
# split is stratified by a column the set decides, whatever the label keys)
_SPLIT = ("seed", "test_fraction", "hf_train_split", "hf_test_split")


def _same_source_same_split(groups: list[SourceGroup]) -> None:
    """Tasks that read the same images must split them alike: with another seed or test
    fraction one task's test images would be among another's training images, and the shared
    backbone would be scored on what it trained on. (Caps, label columns and the like may differ.)"""
    seen: dict[tuple, SourceGroup] = {}
    for group in groups:
        other = seen.setdefault(_images_of(group.data), group)
        if other is group:
            continue
        differ = [k for k in _SPLIT if getattr(other.data, k) != getattr(group.data, k)]
        if differ:
            raise ConfigError(f"task_data: tasks {', '.join(map(repr, other.tasks))} and {', '.join(map(repr, group.tasks))} read {group.data.name!r} "
                              f"with different {', '.join(differ)}; tasks of one source must split it alike (their test images could be in "
                              "each other's training data): give them the same settings")


def load_task_sources(task_data: dict[str, DataConfig], base: DataConfig) -> tuple[DataSplit, np.ndarray]:
    """Every task's data joined into one split, and per train image the index of its source
    group (partitioning is per source: a client gets its own share of each of its tasks' data)."""
    from . import load_data

    groups = source_groups(task_data, base)
    splits = []
    for group in groups:
        names = ", ".join(repr(t) for t in group.tasks)
        try:
            split = load_data(group.data)
        except ConfigError as exc:
            raise ConfigError(f"task(s) {names}: data source {group.data.name!r} cannot be loaded: {exc}") from exc
        except (OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"task(s) {names}: data source {group.data.name!r} cannot be loaded: {type(exc).__name__}: {exc}") from exc
        for task, label in list(group.tasks.items()):
            label = label or split.train.tasks[0]
            if label not in split.train.tasks:
                raise ConfigError(f"task_data.{task}: data source {group.data.name!r} has no label type {label!r}; it has {', '.join(split.train.tasks)}")
            group.tasks[task] = label
        splits.append(split)
    num_classes = {t: s.train.num_classes[g.tasks[t]] for g, s in zip(groups, splits, strict=True) for t in g.tasks}
    names = {t: s.train.class_names[g.tasks[t]] for g, s in zip(groups, splits, strict=True) for t in g.tasks if g.tasks[t] in s.train.class_names}
    order = list(task_data)
    trains = [_relabel(s.train, g.tasks, order, num_classes, names) for g, s in zip(groups, splits, strict=True)]
    tests = [_relabel(s.test, g.tasks, order, num_classes, names) for g, s in zip(groups, splits, strict=True)]
    origin = np.concatenate([np.full(len(s.train), g) for g, s in enumerate(splits)])
    return DataSplit("+".join(g.data.name for g in groups), concat_sets(*trains), concat_sets(*tests)), origin


def _relabel(images: ImageSet, labels: dict[str, str], order: list[str], num_classes: dict[str, int], names: dict[str, list[str]]) -> ImageSet:
    """`images` with one label per run task: the source's label type for the tasks it serves, -1 for the others."""
    n = len(images)
    return ImageSet(
        images.images,
        {t: images.labels[labels[t]] if t in labels else torch.full((n,), UNLABELLED, dtype=torch.int64) for t in order},
        {t: num_classes[t] for t in order},
        {t: list(names[t]) for t in order if t in names},
    )
