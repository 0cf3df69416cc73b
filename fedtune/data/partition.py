"""Federated partitioning of sample indices with flwr-datasets' partitioners."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError

PARTITION_SCHEMES = ("iid", "dirichlet", "pathological")
CLASS_ASSIGNMENT_MODES = ("deterministic", "random", "first-deterministic")


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
    self_balancing: bool = False,
) -> list[np.ndarray]:
    """Split sample indices 0..N-1 into `num_partitions` client shards with flwr-datasets.

    Schemes: "iid" (equal random shards), "dirichlet" (per-class shares drawn from
    Dirichlet(alpha); smaller alpha is more skewed; every partition gets at least
    `min_partition_size` samples; with `self_balancing`, a partition already holding more
    than the average share gets none of the classes drawn after it, the rule of PFLlib's and
    NIID-Bench's generators, which leaves clients with fewer classes), "pathological" (`classes_per_partition` classes per
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
    if self_balancing and scheme != "dirichlet":
        raise ConfigError(f"self_balancing applies to the dirichlet scheme only, not {scheme!r}")
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
            self_balancing=bool(self_balancing),
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
            parts = [
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
    if scheme == "pathological":
        unused = classes_left_out(labels, parts)
        if unused:
            raise ConfigError(
                f"pathological partitioning ({class_assignment}) gives classes {unused} to no client "
                f"({num_partitions} clients x {classes_per_partition} classes, {len(np.unique(labels))} classes in the data): "
                "no client would ever train on them; use more clients or classes_per_partition, or another class_assignment"
            )
    return parts


def classes_left_out(labels: np.ndarray, parts: list[np.ndarray]) -> list[int]:
    """The classes of `labels` that no partition in `parts` holds an example of."""
    held = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return sorted(set(np.unique(labels).tolist()) - set(np.unique(labels[held]).tolist()))
