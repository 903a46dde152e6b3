"""The models a server hosts: every checkpoint folder directly under DIR, named after its folder.

Names are fixed when the server starts and every request's model name is looked up in that set, so a
request can never name a path (`../x`, `/etc`) or a folder that is not a finished checkpoint.
At startup each checkpoint is loaded once as the mapper would load it (`load_reference`: manifest, weights,
config, genes, history, extras, the network rebuilt) and its model card built; a folder that fails is
skipped with a warning naming it and the problem, and never listed (no checkpoint usable: startup fails).
Model cards are read from each checkpoint's manifest.json and genes.tsv.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pandas as pd

from scpermut_dist.errors import UsageError
from scpermut_dist.mapping.checkpoint import MANIFEST

log = logging.getLogger(__name__)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # no slash, no leading dot (hides `..` and temp folders)
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def discover_models(models_dir: str | Path) -> dict[str, Path]:
    """Name -> folder for every subfolder of `models_dir` holding a manifest.json that loads (`check_model`).
    Broken checkpoints are skipped with a warning naming them; none usable is a UsageError."""
    root = Path(models_dir)
    if not root.is_dir():
        raise UsageError(f"--models {root}: not a directory; give the folder whose subfolders are checkpoints "
                         "written by `scpermut train`")
    found, broken = {}, []
    for sub in sorted(root.iterdir()):
        if not (sub / MANIFEST).is_file():
            continue
        if not NAME.match(sub.name):
            log.warning("skipping checkpoint folder %r: model names use letters, digits, '.', '_' and '-' "
                        "and start with a letter or digit", sub.name)
            continue
        problem = check_model(sub.name, sub)
        if problem is not None:
            log.warning("skipping checkpoint folder %r (%s): it cannot be served: %s", sub.name, sub, problem)
            broken.append(f"{sub.name}: {problem}")
            continue
        found[sub.name] = sub.resolve()
    if not found:
        if broken:
            raise UsageError(f"--models {root}: no usable checkpoint; " + "; ".join(broken))
        raise UsageError(f"--models {root}: no checkpoint folders (subfolders with {MANIFEST}) found; "
                         "train one with `scpermut train --out DIR/NAME`")
    return found


def check_model(name: str, folder: Path) -> str | None:
    """Why checkpoint `folder` cannot be served, or None: it must load as the mapper loads it
    (mapping/reference.py `load_reference`, which reads and checks every file through
    mapping/checkpoint.py `load_checkpoint`) and give a model card."""
    from scpermut_dist.mapping.reference import load_reference

    try:
        load_reference(folder)
        model_card(name, folder)
    except Exception as exc:  # any failure here would be a 500 on every request for this model
        return str(exc) if isinstance(exc, UsageError) else f"{type(exc).__name__}: {exc}"
    return None


def model_card(name: str, folder: Path) -> dict:
    """What a client needs to choose a model and prepare a query: genes, types, training data, metrics."""
    manifest = json.loads((folder / MANIFEST).read_text())
    genes = pd.read_csv(folder / "genes.tsv", sep="\t", dtype=str, keep_default_na=False)
    training = dict(manifest.get("training_data", {}))
    if training.get("source"):  # the server's own paths are not the client's business
        training["source"] = Path(str(training["source"])).name
    metrics = manifest.get("metrics", {})
    return {
        "name": name,
        "format_version": manifest.get("format_version"),
        "created": manifest.get("created"),
        "packages": manifest.get("packages", {}),
        "genes": {"n_genes": int(manifest.get("n_genes", len(genes))), "naming": gene_naming(genes),
                  "example_ids": genes["feature_id"].head(5).tolist(),
                  "example_symbols": genes["feature_name"].head(5).tolist()},
        "cell_types": list(manifest.get("classes", [])),
        "n_batches": len(manifest.get("batches", [])),
        "ensemble_size": int(manifest.get("ensemble_size", 1)),
        "normalization": manifest.get("normalization", {}),
        "training_data": training,
        "metrics": metrics,
        "calibration": manifest.get("calibration") or metrics.get("calibration")
        or {k: v for k, v in metrics.items() if "ece" in k.lower() or "temperature" in k.lower()} or None,
        "unknown": metrics.get("unknown") or manifest.get("unknown"),  # the abstention rule fitted at training
        "reference_neighbors": "neighbors" in manifest.get("extras", []),
    }


def gene_naming(genes: pd.DataFrame) -> str:
    """How the model's genes are named: queries match on either column, this says which is informative."""
    ids = genes["feature_id"].astype(str)
    ensembl = ids.map(lambda g: bool(_ENSEMBL.match(g))).mean() if len(ids) else 0.0
    same = (ids == genes["feature_name"].astype(str)).mean() if len(ids) else 1.0
    if ensembl >= 0.5:
        return "ensembl ids with symbols" if same < 0.5 else "ensembl ids"
    return "symbols"
