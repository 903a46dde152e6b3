"""Reports are valid JSON (no NaN, no NumPy reprs) and replace the previous file whole or not at all."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from scpermut_dist.json_report import jsonable, write_json


def test_numpy_values_become_plain_json():
    obj = {"f": np.float32(0.5), "i": np.int64(3), "b": np.bool_(True), "a": np.arange(3), "nan": float("nan"),
           "inf": np.float64(np.inf), 7: ("x", Path("/tmp/p")), "nested": [{"v": np.array([[1.5]])}]}
    out = jsonable(obj)
    assert out == {"f": 0.5, "i": 3, "b": True, "a": [0, 1, 2], "nan": None, "inf": None, "7": ["x", "/tmp/p"],
                   "nested": [{"v": [[1.5]]}]}
    assert type(out["b"]) is bool and type(out["i"]) is int
    json.dumps(out, allow_nan=False)  # strict readers accept it


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "deep" / "report.json"
    write_json(path, {"run": 1, "score": np.float64(0.25)})
    assert json.loads(path.read_text()) == {"run": 1, "score": 0.25}

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"run": 2})
    assert json.loads(path.read_text()) == {"run": 1, "score": 0.25}  # the previous report is intact
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # and no temporary file is left
