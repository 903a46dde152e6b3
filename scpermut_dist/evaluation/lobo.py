"""Leave-one-batch-out (LOBO) label transfer: scPermut and the baselines on the same folds.

For each batch b: query = the cells of b, reference = all other cells. Every method is fitted on the
reference alone (genes, HVGs, scaling, early stopping all come from it) and receives the query with
its label column removed, so query labels cannot leak into training or preprocessing; they are used
only to score. Outputs (written to a temp folder, then renamed into place):

- metrics.json: per fold and mean over folds, per method (see `metrics.py` for definitions);
- predictions.csv: one row per query cell and fold, true label and each method's prediction;
- confusion_fold<i>_<batch>.png: row-normalised confusion matrices, one panel per method;
- latent_fold<i>_<batch>.png: UMAP of the scPermut latent of that fold's reference + query cells,
  coloured by type and by batch. Each fold trains its own model, so latents of different folds live
  in different spaces and are never pooled into one plot.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import anndata as ad
import numpy as np
import pandas as pd

from loaders.errors import DataError
from scpermut_dist.evaluation import baselines, metrics, plots

log = logging.getLogger(__name__)


@dataclass
class MethodOutput:
    """What a method returns for one fold: query predictions and optional embeddings for latent metrics."""

    labels: np.ndarray
    latent_ref: np.ndarray | None = None
    latent_query: np.ndarray | None = None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Fold:
    index: int
    query_batch: str
    label_key: str
    batch_key: str
    quiet: bool = True


Method = Callable[[ad.AnnData, ad.AnnData, Fold], MethodOutput]


QUERY_UNLABELED = "__query__"  # the label given to query cells when they join training (never a real type)


def scpermut_method(config, with_query: bool = False) -> Method:
    """scPermut through its public API: `fit` on the reference, `Reference.map` on query and reference.

    with_query=True is the authors' own benchmark protocol (transductive): the query's cells also join
    training, unlabelled and as their own batch, so the DANN warm-up (which sees every cell) aligns them with
    the reference; they never enter the classifier's stages or the validation split. Genes still come from
    the reference alone, and labels of the query are never read (its label column is already gone).
    """

    def run(ref: ad.AnnData, query: ad.AnnData, fold: Fold) -> MethodOutput:
        from scpermut_dist.api import fit

        cfg, train_on, unlabeled = config, ref, None
        if with_query:
            from scpermut_dist.config import RunConfig

            spec = config.model_dump()
            spec["data"]["genes"] = reference_genes(ref, fold, config)
            cfg = RunConfig.validate_dict(spec)
            q = query.copy()
            q.obs = pd.DataFrame({fold.label_key: QUERY_UNLABELED, fold.batch_key: f"query:{fold.query_batch}"},
                                 index=q.obs_names)
            train_on = ad.concat([ref, q], join="inner", merge="same")
            train_on.obs_names_make_unique()
            unlabeled = QUERY_UNLABELED
        model = fit(train_on, label_key=fold.label_key, batch_key=fold.batch_key, config=cfg, quiet=fold.quiet,
                    unlabeled_value=unlabeled)
        res_q = model.map(query)
        res_r = model.map(ref)
        summary = getattr(model, "summary", {}) or {}
        return MethodOutput(np.asarray(res_q.labels).astype(str), np.asarray(res_r.latent),
                            np.asarray(res_q.latent), info={"summary": _jsonable(summary),
                                                            "query_in_training": with_query,
                                                            "training_data": _jsonable(model.training_data)})

    return run


def reference_genes(ref: ad.AnnData, fold: Fold, config) -> list[str]:
    """The genes (HVGs) scPermut would choose on the reference alone."""
    from loaders.sources import AnnDataSource
    from scpermut_dist.api import config_with_data_keys
    from scpermut_dist.train.preprocess import prepare_reference

    cfg = config_with_data_keys(config, fold.label_key, fold.batch_key, None, None)
    prep = prepare_reference(lambda sel: AnnDataSource(ref, sel, cfg.data.layer, where="reference"), cfg.data)
    prep.source.close()
    return prep.genes["feature_id"].astype(str).tolist()


def baseline_methods() -> dict[str, Method]:
    def logreg(ref, query, fold):
        r = baselines.logreg_celltypist(ref, ref.obs[fold.label_key].to_numpy(), query)
        return MethodOutput(r.labels)

    def knn(ref, query, fold):
        r = baselines.knn_pca(ref, ref.obs[fold.label_key].to_numpy(), query,
                              ref_batches=ref.obs[fold.batch_key].to_numpy())
        return MethodOutput(r.labels, r.latent_ref, r.latent_query)

    return {"logreg_celltypist": logreg, "knn_pca": knn}


def check_lobo_input(adata: ad.AnnData, label_key: str, batch_key: str, where: str = "input") -> None:
    """Clear errors for what makes LOBO impossible: missing columns, < 2 batches, no labels."""
    missing = [k for k in (label_key, batch_key) if k not in adata.obs.columns]
    if missing:
        raise DataError(f"{where}: obs has no column(s) {missing}; available: {sorted(map(str, adata.obs.columns))}. "
                        "Pass existing columns with --label-key/--batch-key.")
    if adata.n_obs == 0:
        raise DataError(f"{where}: no cells (after the obs filter, if any).")
    batches = adata.obs[batch_key].astype("string").fillna("NA").unique()
    if len(batches) < 2:
        raise DataError(f"{where}: batch key {batch_key!r} has a single value ({batches[0]!r}); leave-one-batch-out "
                        "needs at least 2 batches. Choose a column that separates batches (donor, sample, plate...).")
    if adata.obs[label_key].notna().sum() == 0:
        raise DataError(f"{where}: label column {label_key!r} holds no labels.")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name))[:60]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def _score(method_out: MethodOutput, truth: np.ndarray, ref_freq: dict, ref: ad.AnnData, query: ad.AnnData,
           fold: Fold, seconds: float) -> dict:
    m = metrics.classification_metrics(truth, method_out.labels)
    m["size_bins"] = metrics.size_bin_metrics(truth, method_out.labels, ref_freq)
    m["seconds"] = seconds
    if method_out.latent_query is not None and method_out.latent_ref is not None:
        z = np.vstack([method_out.latent_ref, method_out.latent_query])
        lab = np.concatenate([ref.obs[fold.label_key].astype(str).to_numpy(), truth.astype(str)])
        bat = np.concatenate([ref.obs[fold.batch_key].astype(str).to_numpy(), query.obs[fold.batch_key].astype(str)])
        m["latent"] = metrics.latent_metrics(z, lab, bat)
        m["batch_entropy"] = m["latent"]["batch_entropy"]
        m["silhouette_label"] = m["latent"]["silhouette_label"]
    if method_out.info:
        m["info"] = method_out.info
    return m


def run_lobo(adata: ad.AnnData, label_key: str, batch_key: str, out_dir: str | Path, *,
             methods: dict[str, Method], plots_umap: bool = True, progress: bool = True,
             meta: dict | None = None) -> dict:
    """Run every method on every LOBO fold, write the report folder atomically, return the metrics dict."""
    check_lobo_input(adata, label_key, batch_key)
    adata = adata.copy()
    adata.obs[batch_key] = adata.obs[batch_key].astype("string").fillna("NA").astype(str)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        report = _run_folds(adata, label_key, batch_key, tmp, methods, plots_umap, progress)
        if (meta or {}).get("query_in_training"):
            report["protocol"] += ("; except that scPermut also trained on the query's cells, unlabelled and as "
                                   "their own batch (--query-in-training)")
        report["dataset"] = {"n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars), "label_key": label_key,
                             "batch_key": batch_key, **(meta or {})}
        (tmp / "metrics.json").write_text(json.dumps(_jsonable(report), indent=2))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _run_folds(adata, label_key, batch_key, tmp: Path, methods: dict[str, Method], plots_umap: bool,
               progress: bool) -> dict:
    from tqdm.auto import tqdm

    batches = sorted(adata.obs[batch_key].unique())
    folds, pred_tables = [], []
    bar = tqdm(total=len(batches) * len(methods), desc="LOBO", disable=not progress)
    for i, b in enumerate(batches):
        is_q = (adata.obs[batch_key] == b).to_numpy()
        ref, query_full = adata[~is_q].copy(), adata[is_q].copy()
        assert b not in set(ref.obs[batch_key]), "query batch leaked into the reference"
        truth = query_full.obs[label_key].to_numpy(dtype=object)
        query = query_full.copy()
        query.obs = query.obs.drop(columns=[label_key])  # labels never reach a method
        ref_freq = metrics.reference_class_freq(ref.obs[label_key].to_numpy(dtype=object))
        fold = Fold(i, str(b), label_key, batch_key, quiet=not progress)
        rec = {"fold": i, "query_batch": str(b), "ref_batches": sorted(set(ref.obs[batch_key])),
               "n_ref": int(ref.n_obs), "n_query": int(query.n_obs), "methods": {}}
        preds = pd.DataFrame({"cell": query.obs_names.astype(str), "fold": i, "batch": str(b),
                              "true": pd.Series(truth).astype(str).to_numpy()})
        outputs = {}
        for name, method in methods.items():
            bar.set_postfix_str(f"{b}: {name}")
            t0 = time.perf_counter()
            out = method(ref, query, fold)
            secs = time.perf_counter() - t0
            if len(out.labels) != query.n_obs:
                raise RuntimeError(f"method {name} returned {len(out.labels)} labels for {query.n_obs} query cells")
            outputs[name] = out
            rec["methods"][name] = _score(out, truth, ref_freq, ref, query_full, fold, secs)
            preds[name] = np.asarray(out.labels).astype(str)
            log.info("fold %d (%s) %s: balanced accuracy %.4f", i, b, name,
                     rec["methods"][name].get("balanced_accuracy", float("nan")))
            bar.update(1)
        stem = f"fold{i}_{_safe(b)}"
        plots.confusion_matrices({n: (preds["true"].to_numpy(), preds[n].to_numpy()) for n in methods},
                                 tmp / f"confusion_{stem}.png", title=f"query batch {b} (rows normalised)")
        rec["plots"] = [f"confusion_{stem}.png"]
        lat = outputs.get("scpermut")
        if plots_umap and lat is not None and lat.latent_ref is not None:
            z = np.vstack([lat.latent_ref, lat.latent_query])
            labs = np.concatenate([ref.obs[label_key].astype(str), preds["true"]])
            bats = np.concatenate([ref.obs[batch_key].astype(str), query_full.obs[batch_key].astype(str)])
            isq = np.r_[np.zeros(ref.n_obs, bool), np.ones(query.n_obs, bool)]
            rec["latent_plot_method"] = plots.latent_views(z, labs, bats, tmp / f"latent_{stem}.png", is_query=isq,
                                                           title=f"scPermut latent, fold {i}: query batch {b}")
            rec["plots"].append(f"latent_{stem}.png")
        folds.append(rec)
        pred_tables.append(preds)
    bar.close()
    pd.concat(pred_tables).to_csv(tmp / "predictions.csv", index=False)
    return _summarise(folds, list(methods))


HEADLINE = ("balanced_accuracy", "accuracy", "macro_f1")


def _summarise(folds: list[dict], names: list[str]) -> dict:
    mean = {n: metrics.mean_over_folds([f["methods"][n] for f in folds]) for n in names}
    summary = {n: {k: mean[n][k] for k in HEADLINE} for n in names}
    runs = [n for n in names if n == "scpermut" or n.startswith("scpermut_seed")]  # one per training seed
    base = [n for n in names if n not in runs]
    if len(runs) > 1:
        summary["scpermut_seed_mean"] = {k: float(np.mean([mean[n][k] for n in runs])) for k in HEADLINE}
        summary["scpermut_seed_std"] = {k: float(np.std([mean[n][k] for n in runs])) for k in HEADLINE}
    if "scpermut" in names and base:
        best = max(base, key=lambda n: mean[n]["balanced_accuracy"])
        summary["best_baseline"] = best
        summary["scpermut_minus_best_baseline_balanced_accuracy"] = (
            mean["scpermut"]["balanced_accuracy"] - mean[best]["balanced_accuracy"])
        if len(runs) > 1:
            summary["scpermut_seed_mean_minus_best_baseline_balanced_accuracy"] = (
                summary["scpermut_seed_mean"]["balanced_accuracy"] - mean[best]["balanced_accuracy"])
    return {"protocol": "leave-one-batch-out: query = one batch, reference = all other batches; "
                        "methods fitted on the reference only",
            "methods": names, "summary": summary, "mean": mean, "folds": folds}


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished report into place; an existing report is replaced only once the new one is complete."""
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def format_table(report: dict) -> str:
    """A short text table of the mean LOBO metrics per method."""
    rows = [f"{'method':<20}" + "".join(f"{k:>20}" for k in HEADLINE)]
    for n in report["methods"]:
        m = report["mean"][n]
        rows.append(f"{n:<20}" + "".join(f"{m[k]:>13.4f} ±{m.get(k + '_std', 0):.3f}" for k in HEADLINE))
    seed_mean, seed_std = report["summary"].get("scpermut_seed_mean"), report["summary"].get("scpermut_seed_std")
    if seed_mean:
        rows.append(f"{'scpermut seed mean':<20}" + "".join(f"{seed_mean[k]:>13.4f} ±{seed_std[k]:.3f}" for k in HEADLINE)
                    + "  (± over seeds)")
    return "\n".join(rows)
