"""Federated runs without Flower: each client's data, the models, and state as numpy arrays.

The client's side of a round is `fedtune.client.ClientRuntime`; the run config is
`fedtune.runconfig.RunConfig`.
"""

from __future__ import annotations

import json
import warnings
import zlib

import numpy as np
import torch
from torch import nn

from .data import DataSplit, ImageSet, concat_sets, load_data, partition_indices
from .data.partition import classes_left_out
from .errors import ConfigError
from .methods import prepare_model
from .model import FedViT, build_model
from .runconfig import RunConfig
from .typedconfig import to_dict
from .weights import resolve_pretrained

# --------------------------------------------------------------------------- data per client

_DATA_CACHE: dict[str, tuple[DataSplit, list[np.ndarray]]] = {}


def federated_data(cfg: RunConfig) -> tuple[DataSplit, list[np.ndarray]]:
    """The data split and each client's train indices (cached per process)."""
    key = _data_key(cfg)
    if key not in _DATA_CACHE:
        p = cfg.partition
        if cfg.task_data is not None:
            from .data.multidomain import load_task_sources

            split, origin = load_task_sources(cfg.task_data, cfg.data)
            pooled = split.train
            if p.pool:
                raise ConfigError("partition.pool: not supported with task_data (each source keeps its own test split)")
            parts = _partition_per_source(cfg, split.train, origin)
            _ORIGIN.clear()
            _ORIGIN[key] = origin
        else:
            split = load_data(cfg.data)
            for task in cfg.run_tasks():
                if task not in split.train.tasks:
                    raise ConfigError(f"task: {task!r} is not in the data set {cfg.data.name}; it has {', '.join(split.train.tasks)}")
            task = (cfg.run_tasks() or split.train.tasks)[0]
            pooled = concat_sets(split.train, split.test) if p.pool else split.train
            parts = partition_indices(
                pooled.labels[task].numpy(), cfg.federation.total_clients(), p.scheme, alpha=p.alpha,
                classes_per_partition=p.classes_per_partition, seed=cfg.seed, min_partition_size=p.min_partition_size,
                class_assignment=p.class_assignment, self_balancing=p.self_balancing,
            )
            if p.scheme == "pathological" and cfg.federation.new_clients:  # the new clients never train: their classes must be others' too
                unused = classes_left_out(pooled.labels[task].numpy(), parts[: cfg.federation.num_clients])
                if unused:
                    raise ConfigError(f"partition: the pathological split gives classes {unused} to new clients only (federation.new_clients "
                                      f"{cfg.federation.new_clients}): no training client would train on them; use more clients or another class_assignment")
        if p.pool:
            # the personalized-FL protocol: partition train and test together; each client's
            # 25% (local_test_fraction) is its test split, and the central test set is the union
            # of the training clients' splits, so no test image is ever trained on (new clients,
            # who join after the federation, are reported apart)
            split = DataSplit(split.name, pooled, pooled)
            local_tests = [_local_split(cfg, pid, idx)[1] for pid, idx in enumerate(parts[: cfg.federation.num_clients])]
            split = DataSplit(split.name, pooled, pooled.subset(np.concatenate(local_tests)))
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = (split, parts)
    return _DATA_CACHE[key]


def _data_key(cfg: RunConfig) -> str:
    return json.dumps([to_dict(cfg.data), to_dict(cfg.task_data), to_dict(cfg.partition), cfg.federation.num_clients, cfg.federation.total_clients(), cfg.seed, cfg.run_tasks(),
                       cfg.federation.client_tasks], sort_keys=True)


_ORIGIN: dict[str, np.ndarray] = {}  # multidomain runs: per train image, its source group


def _partition_per_source(cfg: RunConfig, train: ImageSet, origin: np.ndarray) -> list[np.ndarray]:
    """Each source's images partitioned over the clients holding one of its tasks."""
    p = cfg.partition
    parts: list[list[np.ndarray]] = [[] for _ in range(cfg.federation.total_clients())]
    for g, tasks in _source_tasks(cfg, train, origin).items():
        index = np.flatnonzero(origin == g)
        holders = _holders(cfg, tasks)
        if not holders:
            continue  # RunConfig.validate names a task no client holds
        shares = partition_indices(
            train.labels[tasks[0]][index].numpy(), len(holders), p.scheme, alpha=p.alpha,
            classes_per_partition=p.classes_per_partition, seed=cfg.seed + _source_seed(train, index), min_partition_size=p.min_partition_size,
            class_assignment=p.class_assignment, self_balancing=p.self_balancing,
        )
        for pid, share in zip(holders, shares, strict=True):
            parts[pid].append(index[share])
    return [np.concatenate(x) if x else np.zeros(0, dtype=np.int64) for x in parts]


def _source_seed(train: ImageSet, index: np.ndarray) -> int:
    """A seed offset from the source's own images, so a source is partitioned alike in every
    run that holds it (a task's independent federation and the joint run)."""
    return zlib.crc32(train.images[index[:8]].numpy().tobytes()) % 100_003


def training_images(cfg: RunConfig) -> ImageSet:
    """The images the run's training clients train on: their local train splits (in the
    personalized-FL protocol the pooled set also holds every client's local test images)."""
    split, parts = federated_data(cfg)
    train = [_local_split(cfg, pid, idx)[0] for pid, idx in enumerate(parts[: cfg.federation.num_clients])]
    return split.train.subset(np.concatenate(train) if train else np.zeros(0, dtype=np.int64))


def _local_split(cfg: RunConfig, partition_id: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A client's partition split into its local train and test indices (seeded per client; in
    a multidomain run per source, seeded by the source and the client's place among its holders,
    so a task's independent federation splits alike)."""
    if cfg.task_data is None:
        return _split_indices(idx, cfg.partition.local_test_fraction, cfg.seed * 1_000_003 + partition_id)
    split, _ = federated_data(cfg)
    origin = _ORIGIN[_data_key(cfg)]
    trains, tests = [], []
    for g, tasks in _source_tasks(cfg, split.train, origin).items():
        mine = idx[origin[idx] == g]
        if not len(mine):
            continue
        place = _holders(cfg, tasks).index(partition_id)
        seed = cfg.seed * 1_000_003 + _source_seed(split.train, np.flatnonzero(origin == g)) * 1009 + place
        train, test = _split_indices(mine, cfg.partition.local_test_fraction, seed)
        trains.append(train)
        tests.append(test)
    return (np.concatenate(trains) if trains else idx[:0]), (np.concatenate(tests) if tests else idx[:0])


def _split_indices(idx: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.random.default_rng(seed).permutation(idx)
    n_test = int(round(len(idx) * test_fraction))
    n_test = min(n_test, max(len(idx) - 1, 0))
    return idx[n_test:], idx[:n_test]


def _source_tasks(cfg: RunConfig, train: ImageSet, origin: np.ndarray) -> dict[int, list[str]]:
    """Per source group, the run's tasks its images are labelled for."""
    out = {}
    for g in np.unique(origin):
        index = np.flatnonzero(origin == g)
        out[int(g)] = [t for t in cfg.run_tasks() if bool((train.labels[t][index] >= 0).all())]
    return out


def _holders(cfg: RunConfig, tasks: list[str]) -> list[int]:
    return [pid for pid in range(cfg.federation.total_clients()) if set(client_tasks(cfg, pid)) & set(tasks)]


def client_tasks(cfg: RunConfig, partition_id: int) -> list[str]:
    """The tasks client `partition_id` trains on (federation.client_tasks, cycled; default all)."""
    groups = cfg.federation.client_tasks
    if groups:
        return list(groups[partition_id % len(groups)])
    return cfg.run_tasks() or [federated_data(cfg)[0].train.tasks[0]]


def client_data(cfg: RunConfig, partition_id: int) -> tuple[ImageSet, ImageSet]:
    """A client's local train and test sets (its partition, split by local_test_fraction)."""
    split, parts = federated_data(cfg)
    if not 0 <= partition_id < len(parts):
        raise ConfigError(f"partition-id {partition_id} out of range: the run has {len(parts)} clients")
    train, test = _local_split(cfg, partition_id, parts[partition_id])
    if not len(test) and cfg.partition.local_test_fraction > 0:
        warnings.warn(f"client {partition_id}: its partition of {len(parts[partition_id])} image(s) leaves no local test image at "
                      f"partition.local_test_fraction {cfg.partition.local_test_fraction}; its accuracy is not measured "
                      "(raise partition.min_partition_size)", stacklevel=2)
    return split.train.subset(train), split.train.subset(test)


# --------------------------------------------------------------------------- models


def global_model(cfg: RunConfig) -> FedViT:
    """The model every participant starts from: pretrained backbone, method's extras, seeded heads."""
    split, _ = federated_data(cfg)
    tasks = cfg.run_tasks() or [split.train.tasks[0]]
    torch.manual_seed(cfg.seed)
    model = build_model(resolve_pretrained(cfg.model), {t: split.train.num_classes[t] for t in tasks})
    if cfg.moe is not None:
        from moe import build_moe_vit

        model = build_moe_vit(None, cfg.moe, {t: split.train.num_classes[t] for t in tasks}, dense=model)
    prepare_model(model, cfg.method)
    return model


_MODEL_CACHE: dict[str, FedViT] = {}


def shared_model(cfg: RunConfig) -> FedViT:
    """One model per process, reused by every client this process plays (all its
    parameters are overwritten from the global ones and the client's state each round)."""
    key = cfg.key()
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = global_model(cfg)
    return _MODEL_CACHE[key]


def state_to_numpy(model: nn.Module, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Copies of the model's tensors (not views: the process's model trains on for other clients)."""
    state = model.state_dict()
    names = list(state) if names is None else names
    return {n: state[n].detach().cpu().numpy().copy() for n in names}


def load_numpy_state(model: nn.Module, arrays: dict[str, np.ndarray], where: str = "global parameters") -> None:
    """Copy arrays into the model's parameters/buffers; unknown names or wrong shapes are errors."""
    state = model.state_dict()
    for name, value in arrays.items():
        if name not in state:
            raise ConfigError(f"{where}: unknown parameter {name!r} (does the config match the model?)")
        if tuple(value.shape) != tuple(state[name].shape):
            raise ConfigError(f"{where}: {name} has shape {tuple(value.shape)}, the model expects {tuple(state[name].shape)}")
    with torch.no_grad():
        for name, value in arrays.items():
            state[name].copy_(torch.as_tensor(np.asarray(value)))


def is_personal(name: str, prefixes: list[str]) -> bool:
    return any(name.startswith(p) for p in prefixes)
