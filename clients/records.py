"""Conversions between fedtune's numpy/dict values and Flower's records, for both apps."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def metric_record(metrics: dict[str, Any]) -> MetricRecord:
    """The numbers and number lists of `metrics` as a MetricRecord (bools as ints; other values left out)."""
    clean: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            clean[k] = int(v)
        elif isinstance(v, (int, float)):
            clean[k] = v
        elif isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
            clean[k] = [float(x) for x in v] if any(isinstance(x, float) for x in v) else v
    return MetricRecord(clean)
