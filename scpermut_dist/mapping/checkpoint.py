"""Self-describing checkpoint folders, written atomically, loadable without Ray or the training data.

Layout (FORMAT_VERSION 1):
    manifest.json  format version, package versions, model dims, classes, batches, normalisation,
                   training-data description, validation metrics, summary
    weights.pt     torch state_dict of `ScPermutModule` (loaded with weights_only=True); an ensemble's further
                   members follow in the same file under keys "member{k}.<key>", k = 1..ensemble_size-1
    config.yaml    the resolved `RunConfig`
    genes.tsv      the model's input genes in order: feature_id, feature_name
    history.json   per-epoch training history
    <name>.npz     optional extras (`Checkpoint.extras[name]`, e.g. "neighbors", "replay"): named numeric
                   arrays written with np.savez and read with allow_pickle=False; listed in manifest "extras"
A save writes a temporary sibling folder, fsyncs it, then swaps it in with one rename (an atomic
exchange on Linux), so a crash mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from loaders.normalize import Normalization
from scpermut_dist.config import RunConfig
from scpermut_dist.errors import UsageError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MEMBER_PREFIX = "member"  # weights.pt keys of ensemble members 1..K-1
_EXTRA_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_PACKAGES = ("scpermut-dist", "torch", "numpy", "anndata", "scanpy", "pydantic")


@dataclass
class Checkpoint:
    """Everything needed to rebuild the model and map a query."""

    state_dict: dict[str, torch.Tensor]
    config: RunConfig
    genes: pd.DataFrame  # feature_id, feature_name (model input order)
    classes: list[str]
    batches: list[str]
    normalization: Normalization
    dims: dict  # ScPermutModule constructor arguments
    training_data: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    manifest: dict = field(default_factory=dict)  # filled on load
    extra_state_dicts: list[dict[str, torch.Tensor]] = field(default_factory=list)  # ensemble members 1..K-1
    extras: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # name -> arrays, one <name>.npz each


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write `ckpt` to folder `path` atomically (replacing an older checkpoint there)."""
    dst = Path(path).absolute()
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not (dst / MANIFEST).exists())):
        raise UsageError(f"{dst} exists and is not a scpermut checkpoint folder; choose another --out path")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _write_files(ckpt, tmp)
        _fsync_dir(tmp)
        swap_in(tmp, dst)
    finally:
        if tmp.exists():  # a failed write, or the previous checkpoint after a swap
            shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(dst.parent)
    return dst


def _write_files(ckpt: Checkpoint, d: Path) -> None:
    manifest = {
        "format": "scpermut-checkpoint",
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "packages": package_versions(),
        "dims": ckpt.dims,
        "n_genes": len(ckpt.genes),
        "ensemble_size": 1 + len(ckpt.extra_state_dicts),
        "classes": list(ckpt.classes),
        "batches": list(ckpt.batches),
        "normalization": ckpt.normalization.to_dict(),
        "training_data": ckpt.training_data,
        "metrics": ckpt.metrics,
        "summary": ckpt.summary,
    }
    manifest["extras"] = sorted(ckpt.extras)
    for name, arrays in ckpt.extras.items():
        _write_extra(d, name, arrays)
    with open(d / "weights.pt", "wb") as f:
        weights = {k: v.detach().cpu() for k, v in ckpt.state_dict.items()}
        for i, sd in enumerate(ckpt.extra_state_dicts, start=1):
            weights.update({f"{MEMBER_PREFIX}{i}.{k}": v.detach().cpu() for k, v in sd.items()})
        torch.save(weights, f)
        _sync(f)
    _write_text(d / "config.yaml", ckpt.config.to_yaml())
    _write_text(d / "genes.tsv", ckpt.genes[["feature_id", "feature_name"]].to_csv(sep="\t", index=False))
    _write_text(d / "history.json", json.dumps(ckpt.history, indent=1, default=_json_default))
    _write_text(d / MANIFEST, json.dumps(manifest, indent=1, default=_json_default))  # last: marks completeness


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder; raises UsageError when it is missing, incomplete or from a newer format."""
    d = Path(path)
    if not (d / MANIFEST).is_file():
        if (d / "model" / MANIFEST).is_file():  # a Ray run folder (`train --workers`): its model is one level down
            raise UsageError(f"{d} is a training run folder; its model is {d / 'model'}: pass that")
        raise UsageError(f"{d} is not a scpermut checkpoint (no {MANIFEST}); pass the folder written by `scpermut train`")
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise UsageError(f"{d}: checkpoint format {manifest['format_version']} is newer than this package "
                             f"supports ({FORMAT_VERSION}); upgrade scpermut-dist")
        state, extra = _split_members(torch.load(d / "weights.pt", map_location="cpu", weights_only=True),
                                      int(manifest.get("ensemble_size", 1)))
        config = RunConfig.from_yaml(d / "config.yaml")
        genes = pd.read_csv(d / "genes.tsv", sep="\t", dtype=str, keep_default_na=False)
        history = json.loads((d / "history.json").read_text())
        extras = {name: _read_extra(d, name) for name in manifest.get("extras", [])}
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"{d}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    problem = _inconsistency(manifest, genes, [state, *extra])
    if problem:
        raise UsageError(f"{d}: damaged checkpoint: {problem}; its files do not belong together. Re-export it: "
                         "save the reference again (or rerun `scpermut train --out`) and copy the whole folder")
    return Checkpoint(state_dict=state, config=config, genes=genes, classes=manifest["classes"],
                      batches=manifest["batches"], normalization=Normalization.from_dict(manifest["normalization"]),
                      dims=manifest["dims"], training_data=manifest.get("training_data", {}),
                      metrics=manifest.get("metrics", {}), summary=manifest.get("summary", {}), history=history,
                      manifest=manifest, extra_state_dicts=extra, extras=extras)


def _inconsistency(manifest: dict, genes: pd.DataFrame, state_dicts: list[dict]) -> str | None:
    """Why genes.tsv, the manifest's classes and batches, its model dims and weights.pt disagree, or None.

    Each file reads fine alone when one was cut short, edited or copied from another checkpoint; mapping
    would then fail deep in torch ("mat1 and mat2 shapes cannot be multiplied")."""
    from scpermut_dist.model.module import ScPermutModule

    missing = {"feature_id", "feature_name"} - set(genes.columns)
    if missing:
        return f"genes.tsv lacks the column(s) {sorted(missing)}"
    dims = manifest.get("dims")
    if not isinstance(dims, dict):
        return "the manifest has no model dims"
    for what, n, key in (("genes.tsv lists", len(genes), "n_genes"),
                         ("the manifest lists", len(manifest.get("classes", ())), "n_classes"),
                         ("the manifest lists", len(manifest.get("batches", ())), "n_batches")):
        name = key[2:]
        if dims.get(key) != n:
            return f"{what} {n} {name}, the model was built for {dims.get(key)}"
    if "n_genes" in manifest and manifest["n_genes"] != len(genes):
        return f"genes.tsv lists {len(genes)} genes, the manifest says {manifest['n_genes']}"
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            expected = {k: tuple(v.shape) for k, v in ScPermutModule(**dims).state_dict().items()}
    except (TypeError, ValueError) as exc:
        return f"the manifest's model dims are invalid ({exc})"
    for member, sd in enumerate(state_dicts):
        missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
        if missing or unexpected:
            return (f"weights.pt (member {member}) does not fit the manifest's model dims "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        wrong = [k for k in expected if tuple(sd[k].shape) != expected[k]]
        if wrong:
            k = wrong[0]
            return (f"weights.pt (member {member}) has {k} of shape {tuple(sd[k].shape)}, the manifest's dims "
                    f"give {expected[k]}")
    return None


def _write_extra(d: Path, name: str, arrays: dict[str, np.ndarray]) -> None:
    """One extra as `<name>.npz`: plain numeric/string arrays only, so it loads without pickle."""
    if not _EXTRA_NAME.match(name):
        raise UsageError(f"checkpoint extra {name!r}: use a name of letters, digits, '_' or '-' (starting with a letter)")
    clean = {}
    for key, value in arrays.items():
        a = np.asarray(value)
        if a.dtype.hasobject:
            raise UsageError(f"checkpoint extra {name}[{key!r}] has dtype object; convert it to a numeric or "
                             "fixed-width string array (e.g. .astype(str))")
        clean[key] = a
    with open(d / f"{name}.npz", "wb") as f:
        np.savez(f, **clean)
        _sync(f)


def _read_extra(d: Path, name: str) -> dict[str, np.ndarray]:
    if not _EXTRA_NAME.match(str(name)):
        raise ValueError(f"manifest lists an invalid extra name {name!r}")
    with np.load(d / f"{name}.npz", allow_pickle=False) as z:
        return {key: z[key] for key in z.files}


def _split_members(weights: dict, ensemble_size: int) -> tuple[dict, list[dict]]:
    """Member 0's state dict and those of members 1..K-1 (keys "member{k}.<key>"), checked against the manifest."""
    first, extra = {}, {}
    for key, value in weights.items():
        head, _, rest = key.partition(".")
        index = head[len(MEMBER_PREFIX):]
        if head.startswith(MEMBER_PREFIX) and index.isdigit():
            extra.setdefault(int(index), {})[rest] = value
        else:
            first[key] = value
    if sorted(extra) != list(range(1, ensemble_size)):
        raise ValueError(f"weights.pt holds ensemble members {[0, *sorted(extra)]}, the manifest says {ensemble_size}")
    return first, [extra[k] for k in sorted(extra)]


def _write_text(p: Path, text: str) -> None:
    with open(p, "w") as f:
        f.write(text)
        _sync(f)


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def swap_in(tmp: Path, dst: Path) -> None:
    """Put `tmp` at `dst`; afterwards `tmp` holds the old checkpoint (if any) for the caller to delete."""
    if not dst.exists():
        os.rename(tmp, dst)
        return
    if _rename_exchange(tmp, dst):
        return
    # No atomic exchange (non-Linux or unsupported fs): two renames; a crash between them leaves the
    # old checkpoint under a `.old-` sibling rather than losing it.
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(dst, old)
    os.rename(tmp, dst)
    os.rename(old, tmp)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with Linux renameat2(RENAME_EXCHANGE); False if unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange)
    return rc == 0


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
