"""Conversions between fedtune's numpy/dict values and Flower's records, for both apps."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict


def tensor_bytes(content: RecordDict) -> int:
    """The tensor bytes of a message's arrays (each array's .numpy().nbytes, without decoding it),
    as the server counts what it sends and a client what it receives (Flower's count_bytes adds
    each array's serialization header and its name)."""
    return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for rec in content.array_records.values() for a in rec.values()))


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _number(x: Any) -> int | float | None:
    """A plain Python number for a metric: bools as ints, NumPy scalars as their Python value
    (None for anything else)."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, bool):
        return int(x)
    return x if isinstance(x, (int, float)) else None


def metric_record(metrics: dict[str, Any]) -> MetricRecord:
    """The numbers and number lists of `metrics` as a MetricRecord (bools as ints, NumPy
    scalars as Python numbers; other values, None or text, left out)."""
    clean: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, np.ndarray) and v.ndim == 0:
            v = v.item()
        if isinstance(v, (list, tuple, np.ndarray)):
            items = [_number(x) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
            if all(x is not None for x in items):
                clean[k] = [float(x) for x in items] if any(isinstance(x, float) for x in items) else items
        elif (number := _number(v)) is not None:
            clean[k] = number
    return MetricRecord(clean)
