"""JSON reports (benchmarks, evaluations, demo metrics) written whole or not at all.

A run killed mid-write must not leave a truncated file that a later script reads as a result, and NumPy values
must not leak into the file as strings or as `NaN` (not JSON: strict readers reject it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(x: Any) -> Any:
    """Plain JSON values: NumPy scalars and arrays as numbers and lists, non-finite floats as null, keys as str,
    anything else by its str()."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, (str, int)) or x is None:
        return x
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return str(x)


def write_json(path: str | Path, obj: Any, indent: int = 1) -> Path:
    """Write `jsonable(obj)` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(jsonable(obj), indent=indent, allow_nan=False))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


__all__ = ["jsonable", "write_json"]
