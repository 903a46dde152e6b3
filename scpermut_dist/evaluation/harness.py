"""The evaluation loop shared by every protocol: methods on splits, scores, report folder.

A protocol (leave-one-batch-out, partly annotated atlas) is a list of `Split`s: which cells form the
reference (what a method may train on, with labels) and which the query (what it predicts; its label
column is removed before any method sees it, the labels are used only to score). Outputs (written to a
temp folder, then renamed into place):

- metrics.json: per split and mean over splits, per method (see `metrics.py` for definitions), the
  rare types' per-class report per split and pooled over splits, time to result per method and split;
  classification scores use each method's forced choice (scPermut's argmax before abstention, CellTypist's
  best match), abstention ("unknown") is reported apart as `fraction_unknown`;
- predictions.csv: one row per query cell and split, true label and each method's prediction;
- confusion_fold<i>_<name>.png: row-normalised confusion matrices, one panel per method;
- latent_fold<i>_<name>.png: UMAP of the scPermut latent of that split's reference + query cells,
  coloured by type and by batch (each split trains its own model, so latents are never pooled).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from scpermut_dist.evaluation import metrics, plots
from scpermut_dist.json_report import write_json

log = logging.getLogger(__name__)


@dataclass
class MethodOutput:
    """What a method returns for one split: query predictions, optional embeddings and unknown scores.

    seconds: the method's own time to result (train + map the query), when it does evaluation-only work
    besides (e.g. embedding the reference for the latent metrics); otherwise the harness times the call.
    unknown_score: higher = more likely a type the reference lacks; unknown: cells the method calls unknown.
    """

    labels: np.ndarray
    latent_ref: np.ndarray | None = None
    latent_query: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    unknown_score: np.ndarray | None = None
    unknown: np.ndarray | None = None
    score_kind: str | None = None  # "unknown_score" or "1-confidence"
    seconds: float | None = None
    confidence: np.ndarray | None = None  # the method's confidence in each forced-choice label (query calibration)


@dataclass(frozen=True)
class Fold:
    index: int
    query_batch: str  # the split's name: the held-out batch in LOBO
    label_key: str
    batch_key: str
    quiet: bool = True


@dataclass(frozen=True)
class Split:
    """One train/score division of the cells (boolean masks over the input AnnData)."""

    name: str
    reference: np.ndarray
    query: np.ndarray
    info: dict = field(default_factory=dict)


Method = Callable[[ad.AnnData, ad.AnnData, Fold], MethodOutput]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name))[:60]


def _score(out: MethodOutput, truth: np.ndarray, ref_freq: dict, ref: ad.AnnData, query: ad.AnnData,
           fold: Fold, seconds: float, holdout_type: str | None, rare: list[str]) -> dict:
    truth_s = pd.Series(truth).astype(str).to_numpy()
    known = truth_s != holdout_type if holdout_type is not None else np.ones(len(truth), bool)
    labels = np.asarray(out.labels).astype(str)
    m = metrics.classification_metrics(truth[known], labels[known])
    m["size_bins"] = metrics.size_bin_metrics(truth[known], labels[known], ref_freq)
    m["seconds"] = seconds  # time to result: train + map this split's query
    if out.unknown is not None:  # abstention (labelled unknown), apart from the forced-choice scores above
        m["fraction_unknown"] = float(np.asarray(out.unknown, bool)[known].mean()) if known.any() else None
    has_label = pd.notna(pd.Series(truth)).to_numpy() & known
    m["per_class"] = metrics.per_class_report(truth_s[has_label], labels[has_label])
    m["rare_types"] = metrics.per_class_report(truth_s[has_label], labels[has_label], rare)
    if out.confidence is not None and has_label.any():
        m["query_calibration"] = _query_calibration(np.asarray(out.confidence, dtype=float)[has_label],
                                                    labels[has_label] == truth_s[has_label])
    if holdout_type is not None:
        score = out.unknown_score
        m["holdout"] = {"type": holdout_type, "score": out.score_kind if score is not None else None,
                        **(metrics.unknown_detection(~known, score, out.unknown) if score is not None else {})}
    if out.latent_query is not None and out.latent_ref is not None:
        z = np.vstack([out.latent_ref, out.latent_query])
        lab = np.concatenate([ref.obs[fold.label_key].astype(str).to_numpy(), truth_s])
        bat = np.concatenate([ref.obs[fold.batch_key].astype(str).to_numpy(), query.obs[fold.batch_key].astype(str)])
        m["latent"] = metrics.latent_metrics(z, lab, bat)
        m["batch_entropy"] = m["latent"]["batch_entropy"]
        m["silhouette_label"] = m["latent"]["silhouette_label"]
    if out.info:
        m["info"] = out.info
    return m


def run_splits(adata: ad.AnnData, splits: list[Split], label_key: str, batch_key: str, out_dir: str | Path, *,
               methods: dict[str, Method], protocol: str, plots_umap: bool = True, progress: bool = True,
               meta: dict | None = None, holdout_type: str | None = None) -> dict:
    """Run every method on every split, write the report folder atomically, return the metrics dict."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        report = _run(adata, splits, label_key, batch_key, tmp, methods, plots_umap, progress, holdout_type)
        report["protocol"] = protocol
        report["dataset"] = {"n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars), "label_key": label_key,
                             "batch_key": batch_key, **(meta or {})}
        write_json(tmp / "metrics.json", report, indent=2)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _labels_of(adata: ad.AnnData, label_key: str) -> np.ndarray:
    return adata.obs[label_key].to_numpy(dtype=object)


def _run(adata, splits: list[Split], label_key, batch_key, tmp: Path, methods: dict[str, Method], plots_umap: bool,
         progress: bool, holdout_type: str | None) -> dict:
    from tqdm.auto import tqdm

    folds, pred_tables = [], []
    bar = tqdm(total=len(splits) * len(methods), desc="evaluate", disable=not progress)
    for i, split in enumerate(splits):
        ref, query_full = adata[split.reference].copy(), adata[split.query].copy()
        truth = _labels_of(query_full, label_key)
        query = query_full.copy()
        query.obs = query.obs.drop(columns=[label_key])  # labels never reach a method
        ref_freq = metrics.reference_class_freq(_labels_of(ref, label_key))
        rare = metrics.rare_types(ref_freq)
        fold = Fold(i, split.name, label_key, batch_key, quiet=not progress)
        rec = {"fold": i, "query_batch": split.name, "ref_batches": sorted(set(ref.obs[batch_key])),
               "n_ref": int(ref.n_obs), "n_query": int(query.n_obs), **split.info,
               "rare_types": {c: ref_freq[c] for c in rare}, "methods": {}}
        preds = pd.DataFrame({"cell": query.obs_names.astype(str), "fold": i, "batch": query.obs[batch_key].astype(str),
                              "true": pd.Series(truth).astype(str).to_numpy()})
        outputs = {}
        for name, method in methods.items():
            bar.set_postfix_str(f"{split.name}: {name}")
            t0 = time.perf_counter()
            out = method(ref, query, fold)
            secs = out.seconds if out.seconds is not None else time.perf_counter() - t0
            if len(out.labels) != query.n_obs:
                raise RuntimeError(f"method {name} returned {len(out.labels)} labels for {query.n_obs} query cells")
            outputs[name] = out
            rec["methods"][name] = _score(out, truth, ref_freq, ref, query_full, fold, secs, holdout_type, rare)
            preds[name] = np.asarray(out.labels).astype(str)
            if out.confidence is not None:
                preds[f"{name}_confidence"] = np.asarray(out.confidence, dtype=float)
            if out.unknown is not None:
                preds[f"{name}_unknown"] = np.asarray(out.unknown, bool)
            if holdout_type is not None and out.unknown_score is not None:
                preds[f"{name}_unknown_score"] = np.asarray(out.unknown_score, dtype=float)
            log.info("split %d (%s) %s: balanced accuracy %.4f in %.1f s", i, split.name, name,
                     rec["methods"][name].get("balanced_accuracy", float("nan")), secs)
            bar.update(1)
        stem = f"fold{i}_{_safe(split.name)}"
        plots.confusion_matrices({n: (preds["true"].to_numpy(), preds[n].to_numpy()) for n in methods},
                                 tmp / f"confusion_{stem}.png", title=f"query {split.name} (rows normalised)")
        rec["plots"] = [f"confusion_{stem}.png"]
        lat = outputs.get("scpermut")
        if plots_umap and lat is not None and lat.latent_ref is not None:
            z = np.vstack([lat.latent_ref, lat.latent_query])
            labs = np.concatenate([ref.obs[label_key].astype(str), preds["true"]])
            bats = np.concatenate([ref.obs[batch_key].astype(str), query_full.obs[batch_key].astype(str)])
            isq = np.r_[np.zeros(ref.n_obs, bool), np.ones(query.n_obs, bool)]
            rec["latent_plot_method"] = plots.latent_views(z, labs, bats, tmp / f"latent_{stem}.png", is_query=isq,
                                                           title=f"scPermut latent, fold {i}: query {split.name}")
            rec["plots"].append(f"latent_{stem}.png")
        folds.append(rec)
        pred_tables.append(preds)
    bar.close()
    table = pd.concat(pred_tables)
    table.to_csv(tmp / "predictions.csv", index=False)
    all_freq = metrics.reference_class_freq([x for x in _labels_of(adata, label_key)
                                             if holdout_type is None or str(x) != holdout_type])
    report = _summarise(folds, list(methods))
    report["pooled"] = _pooled(table, list(methods), metrics.rare_types(all_freq), holdout_type)
    report["rare_types"] = {c: all_freq[c] for c in metrics.rare_types(all_freq)}
    if holdout_type is not None:
        report["holdout"] = _holdout_summary(folds, list(methods), holdout_type)
    cal = _calibration_summary(folds, list(methods))
    if cal:
        report["calibration"] = cal
    return report


def _query_calibration(confidence: np.ndarray, correct: np.ndarray) -> dict:
    """How far a method's confidence on the held-out cells is from its accuracy there: the calibration a user
    meets (the reference's own figure is measured on the validation cells its temperature was fitted on)."""
    from scpermut_dist.mapping.calibration import confidence_ece

    return {"ece": confidence_ece(confidence, correct), "mean_confidence": float(confidence.mean()),
            "accuracy": float(np.mean(correct)), "n_cells": int(len(correct))}


def _calibration_summary(folds: list[dict], names: list[str]) -> dict:
    """Mean over splits of the ECE figures (keys containing 'ece') a trained reference reports in
    metrics['calibration'], e.g. before and after calibration, and of each method's query calibration
    (`query_ece`, `query_mean_confidence`, `query_accuracy`); empty where no method has either."""
    out = {}
    for n in names:
        vals: dict[str, list[float]] = {}
        for f in folds:
            cal = (f["methods"][n].get("info") or {}).get("calibration")
            if isinstance(cal, dict):
                for k, v in cal.items():
                    if "ece" in str(k).lower() and isinstance(v, (int, float)) and np.isfinite(v):
                        vals.setdefault(str(k), []).append(float(v))
            for k, v in (f["methods"][n].get("query_calibration") or {}).items():
                if k != "n_cells" and np.isfinite(v):
                    vals.setdefault(f"query_{k}", []).append(float(v))
        if vals:
            out[n] = {k: float(np.mean(v)) for k, v in vals.items()} | {"n_folds": len(folds)}
    return out


def _pooled(table: pd.DataFrame, names: list[str], rare: list[str], holdout_type: str | None) -> dict:
    """Scores of all splits' query cells together: a rare type held by few cells per split counts once."""
    t = table[~table["true"].isin(["nan", "<NA>", "None"])]
    if holdout_type is not None:
        t = t[t["true"] != holdout_type]
    out = {}
    for n in names:
        m = metrics.classification_metrics(t["true"].to_numpy(dtype=object), t[n].to_numpy(dtype=object))
        out[n] = {k: m[k] for k in ("n_cells", "balanced_accuracy", "macro_f1") if k in m}
        out[n]["rare_types"] = metrics.per_class_report(t["true"], t[n], rare)
    return out


def _holdout_summary(folds: list[dict], names: list[str], holdout_type: str) -> dict:
    out = {"type": holdout_type}
    for n in names:
        per = [f["methods"][n].get("holdout", {}) for f in folds]
        vals = {k: [p[k] for p in per if p.get(k) is not None] for k in ("auroc", "fraction_novel_unknown")}
        out[n] = {"score": next((p.get("score") for p in per if p.get("score")), None),
                  **{k: float(np.mean(v)) if v else None for k, v in vals.items()},
                  "n_folds_scored": len(vals["auroc"])}
    return out


HEADLINE = ("balanced_accuracy", "accuracy", "macro_f1")


def _summarise(folds: list[dict], names: list[str]) -> dict:
    mean = {n: metrics.mean_over_folds([f["methods"][n] for f in folds]) for n in names}
    summary = {n: {k: mean[n][k] for k in (*HEADLINE, "seconds")} for n in names}
    runs = [n for n in names if re.fullmatch(r"scpermut(_seed\d+)?", n)]  # one per training seed
    tuned = [n for n in names if re.fullmatch(r"scpermut(_seed\d+)?_finetuned", n)]  # --finetune variants
    base = [n for n in names if not n.startswith("scpermut")]
    for prefix, group in (("scpermut", runs), ("scpermut_finetuned", tuned)):
        if len(group) > 1:
            summary[f"{prefix}_seed_mean"] = {k: float(np.mean([mean[n][k] for n in group])) for k in HEADLINE}
            summary[f"{prefix}_seed_std"] = {k: float(np.std([mean[n][k] for n in group])) for k in HEADLINE}
    if "scpermut" in names and base:
        best = max(base, key=lambda n: mean[n]["balanced_accuracy"])
        summary["best_baseline"] = best
        summary["scpermut_minus_best_baseline_balanced_accuracy"] = (
            mean["scpermut"]["balanced_accuracy"] - mean[best]["balanced_accuracy"])
        if len(runs) > 1:
            summary["scpermut_seed_mean_minus_best_baseline_balanced_accuracy"] = (
                summary["scpermut_seed_mean"]["balanced_accuracy"] - mean[best]["balanced_accuracy"])
    return {"methods": names, "summary": summary, "mean": mean, "folds": folds}


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished report into place; an existing report is replaced only once the new one is complete."""
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
