"""The outputs of reference preparation, stored once per run (QC, genes, normalisation, encoders, codes).

Preparation streams the whole reference (QC pass, HVG statistics, library sizes): a distributed run does it
once on the driver, keeps it in RUN_DIR/prepared/ and reuses it on every restart and re-run, instead of
every rank repeating it. The per-cell codes are compact int32 arrays, the library sizes float32; the rest is
small JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from loaders.normalize import Normalization
from scpermut_dist.config import DataConfig
from scpermut_dist.errors import UsageError

ARRAYS = ("label_codes", "batch_codes", "cells", "chunks", "joinids", "totals")
# Bumped when what preparation computes changes, so an older RUN_DIR/prepared is refused, not misread.
# 2: per-cell `totals` (library size over all genes) and the normalisation target over all genes.
PREPARATION_VERSION = 2


@dataclass
class PreparedArrays:
    """What workers need besides a counts reader: small metadata and int32 per-cell codes."""

    genes: pd.DataFrame
    normalization: Normalization
    classes: list[str]
    batches: list[str]
    description: dict
    label_codes: np.ndarray
    batch_codes: np.ndarray
    cells: np.ndarray
    chunks: np.ndarray
    joinids: np.ndarray  # storage row of each cell (SOMA soma_joinid): ranks open X without reading obs
    fingerprint: str
    totals: np.ndarray | None = None  # float32 per cell: total counts over all its genes (the library size)

    @classmethod
    def from_prepared(cls, prep, fingerprint: str) -> "PreparedArrays":
        return cls(prep.genes[["feature_id", "feature_name"]].reset_index(drop=True), prep.normalization,
                   list(prep.classes), list(prep.batches), prep.description, _int32(prep.label_codes),
                   _int32(prep.batch_codes), _int32(prep.cells), _int32(prep.source.chunk_ids()),
                   prep.source.obs["soma_joinid"].to_numpy(dtype=np.int64), fingerprint,
                   None if prep.totals is None else np.asarray(prep.totals, dtype=np.float32))

    def meta(self) -> dict:
        return {"genes": self.genes.to_dict(orient="list"), "normalization": self.normalization.to_dict(),
                "classes": self.classes, "batches": self.batches, "description": self.description,
                "fingerprint": self.fingerprint}


def fingerprint(uri: str, data: DataConfig) -> str:
    """What preparation depends on: the source and the data settings (not sampling nor the validation split)."""
    keys = data.model_dump(mode="json", exclude={"sampling", "val_fraction", "val_max_cells", "val_min_per_class",
                                                 "val_split"})
    key = {"uri": str(uri), "data": keys, "version": PREPARATION_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def save_prepared(arrays: PreparedArrays, folder: str | Path) -> Path:
    """Write atomically (`loaders.atomic`): a crash never leaves a half-written preparation."""
    from loaders.atomic import atomic_directory

    dst = Path(folder)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(dst) as tmp:
        tmp.mkdir()
        np.savez(tmp / "codes.npz", **{k: getattr(arrays, k) for k in ARRAYS if getattr(arrays, k) is not None})
        (tmp / "prepared.json").write_text(json.dumps(arrays.meta(), indent=1, default=_json_default))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    return dst


def load_prepared(folder: str | Path, expected_fingerprint: str) -> PreparedArrays | None:
    """The stored preparation, or None if there is none; refuses one made for other data."""
    d = Path(folder)
    if not (d / "prepared.json").is_file():
        return None
    meta = json.loads((d / "prepared.json").read_text())
    if meta["fingerprint"] != expected_fingerprint:
        raise UsageError(f"{d} was prepared for other data or data settings (fingerprint {meta['fingerprint']}, "
                         f"this run {expected_fingerprint}); use a new --out folder, or delete the run folder {d.parent} to "
                         "start over (its checkpoints belong to the old data)")
    with np.load(d / "codes.npz") as z:
        codes = {k: z[k] for k in ARRAYS if k in z}
    return PreparedArrays(pd.DataFrame(meta["genes"]), Normalization.from_dict(meta["normalization"]),
                          meta["classes"], meta["batches"], meta["description"], fingerprint=meta["fingerprint"],
                          **codes)


def _int32(a) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.int32) if len(a) == 0 or int(np.abs(a).max()) < 2**31 else a.astype(np.int64)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)
