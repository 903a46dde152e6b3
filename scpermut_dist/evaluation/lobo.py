"""Leave-one-batch-out (LOBO) label transfer: scPermut and the baselines on the same folds.

For each batch b: query = the cells of b, reference = all other cells. Every method is fitted on the
reference alone (genes, HVGs, scaling, early stopping all come from it) and receives the query with
its label column removed, so query labels cannot leak into training or preprocessing; they are used
only to score. With `holdout_type`, that type's cells are also removed from every reference (issue 14's
unknown detection): the report gives the AUROC of each method's unknown score for them, and the other
metrics score the query's remaining cells. The loop and the report folder are `harness.py`'s.
"""
from __future__ import annotations

import time

import anndata as ad
import numpy as np
import pandas as pd

from loaders.errors import DataError
from scpermut_dist.evaluation import baselines
from scpermut_dist.evaluation.harness import (  # noqa: F401 - re-exported for callers and tests
    HEADLINE,
    Fold,
    Method,
    MethodOutput,
    Split,
    run_splits,
)
from scpermut_dist.json_report import jsonable

QUERY_UNLABELED = "__query__"  # the label given to query cells when they join training (never a real type)
UNKNOWN_LABEL = "unknown"


def scpermut_method(config, with_query: bool = False, query_batch: str = "own", keep: dict | None = None) -> Method:
    """scPermut through its public API: `fit` on the reference, `Reference.map` on query and reference.

    with_query=True is the authors' own benchmark protocol (transductive): the query's cells also join
    training, unlabelled, so the DANN warm-up (which sees every cell) aligns them with the reference; they
    never enter the classifier's stages or the validation split. Labels of the query are never read (its
    label column is already gone). query_batch="own": the query is its own batch and genes come from the
    reference alone (LOBO); "keep": the query keeps its batch column and genes are chosen on all cells
    (the partly annotated atlas, where hidden cells are part of the atlas).
    Time to result = fit + map of the query; mapping the reference (for the latent metrics) is not counted.
    `keep`: {fold index: (model, fit seconds)} is filled for `finetuned_method`, which adapts the same model.
    """

    def run(ref: ad.AnnData, query: ad.AnnData, fold: Fold) -> MethodOutput:
        from scpermut_dist.api import fit

        t0 = time.perf_counter()
        cfg, train_on, unlabeled = config, ref, None
        if with_query:
            q = query.copy()
            if query_batch == "own":
                from scpermut_dist.config import RunConfig

                spec = config.model_dump()
                spec["data"]["genes"] = reference_genes(ref, fold, config)
                cfg = RunConfig.validate_dict(spec)
                batch = f"query:{fold.query_batch}"
            else:
                batch = q.obs[fold.batch_key].astype(str).to_numpy()
            q.obs = pd.DataFrame({fold.label_key: QUERY_UNLABELED, fold.batch_key: batch}, index=q.obs_names)
            train_on = ad.concat([ref, q], join="inner", merge="same")
            train_on.obs_names_make_unique()
            unlabeled = QUERY_UNLABELED
        model = fit(train_on, label_key=fold.label_key, batch_key=fold.batch_key, config=cfg, quiet=fold.quiet,
                    unlabeled_value=unlabeled)
        fit_seconds = time.perf_counter() - t0
        if keep is not None:
            keep[fold.index] = (model, fit_seconds)
        return _scpermut_output(model, ref, query, t0, {"query_in_training": with_query})

    return run


def finetuned_method(config, keep: dict) -> Method:
    """scPermut then `map --finetune`: the query (its held-out batch, one new DANN class) adapts a copy of the
    fold's model (from `keep`, filled by `scpermut_method`; trained here if absent). Time to result = fit +
    fine-tune + map of the query."""

    def run(ref: ad.AnnData, query: ad.AnnData, fold: Fold) -> MethodOutput:
        from scpermut_dist.api import fit
        from scpermut_dist.mapping.finetune import finetune_reference

        if fold.index in keep:
            model, fit_seconds = keep.pop(fold.index)
        else:
            t_fit = time.perf_counter()
            model = fit(ref, label_key=fold.label_key, batch_key=fold.batch_key, config=config, quiet=fold.quiet)
            fit_seconds = time.perf_counter() - t_fit
        t0 = time.perf_counter()
        outcome = finetune_reference(model, query, where=f"query {fold.query_batch}", quiet=fold.quiet)
        out = _scpermut_output(outcome.reference, ref, query, t0,
                               {"finetune": jsonable(outcome.reference.summary.get("finetune", {}))})
        out.seconds += fit_seconds
        return out

    return run


def _scpermut_output(model, ref: ad.AnnData, query: ad.AnnData, t0: float, extra_info: dict) -> MethodOutput:
    """Map the query (timed from `t0`) and the reference (latent metrics only) with a trained `model`."""
    res_q = model.map(query)
    seconds = time.perf_counter() - t0
    res_r = model.map(ref)
    summary = getattr(model, "summary", {}) or {}
    score = getattr(res_q, "unknown_score", None)
    kind = "unknown_score" if score is not None else "1-confidence"
    if score is None:
        score = 1.0 - np.asarray(res_q.confidence, dtype=float)
    unknown = getattr(res_q, "unknown", None)
    # scored like the baselines: a forced choice (the argmax before abstention); abstention is reported apart
    raw = getattr(res_q, "labels_raw", None)
    labels = np.asarray(raw if raw is not None else res_q.labels).astype(str)
    info = {"summary": jsonable(summary), **extra_info, "training_data": jsonable(model.training_data),
            "labels_scored": "labels_raw (argmax before abstention)" if raw is not None else "labels",
            "unknown_flag": "MappingResult.unknown" if unknown is not None else f"label == {UNKNOWN_LABEL!r}"}
    calibration = (getattr(model, "metrics", {}) or {}).get("calibration")
    if calibration is not None:
        info["calibration"] = jsonable(calibration)
    return MethodOutput(labels, np.asarray(res_r.latent), np.asarray(res_q.latent), info=info,
                        unknown_score=np.asarray(score, dtype=float),
                        unknown=(np.asarray(unknown, bool) if unknown is not None
                                 else np.asarray(res_q.labels).astype(str) == UNKNOWN_LABEL),
                        score_kind=kind, seconds=seconds, confidence=np.asarray(res_q.confidence, dtype=float))


def reference_genes(ref: ad.AnnData, fold: Fold, config) -> list[str]:
    """The genes (HVGs) scPermut would choose on the reference alone."""
    from loaders.sources import AnnDataSource
    from scpermut_dist.api import config_with_data_keys
    from scpermut_dist.train.preprocess import prepare_reference

    cfg = config_with_data_keys(config, fold.label_key, fold.batch_key, None, None)
    prep = prepare_reference(lambda sel: AnnDataSource(ref, sel, cfg.data.layer, where="reference"), cfg.data)
    prep.source.close()
    return prep.genes["feature_id"].astype(str).tolist()


def _baseline_output(r: baselines.BaselineResult, latent: bool = False) -> MethodOutput:
    score = None if r.confidence is None else 1.0 - np.asarray(r.confidence, dtype=float)
    return MethodOutput(r.labels, r.latent_ref if latent else None, r.latent_query if latent else None,
                        unknown_score=score, unknown=r.unknown, score_kind="1-confidence" if score is not None else None,
                        confidence=None if r.confidence is None else np.asarray(r.confidence, dtype=float))


def baseline_methods() -> dict[str, Method]:
    """The reference-only baselines, each trained on the reference's labelled cells only."""

    def logreg(ref, query, fold):
        return _baseline_output(baselines.logreg_celltypist(ref, ref.obs[fold.label_key].to_numpy(), query))

    def knn(ref, query, fold):
        r = baselines.knn_pca(ref, ref.obs[fold.label_key].to_numpy(), query,
                              ref_batches=ref.obs[fold.batch_key].to_numpy())
        return _baseline_output(r, latent=True)

    def celltypist(ref, query, fold):
        from scpermut_dist.evaluation.celltypist_baseline import celltypist_baseline

        return _baseline_output(celltypist_baseline(ref, ref.obs[fold.label_key].to_numpy(), query))

    return {"logreg_celltypist": logreg, "knn_pca": knn, "celltypist": celltypist}


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


def check_holdout_type(adata: ad.AnnData, label_key: str, holdout_type: str) -> None:
    types = sorted(set(adata.obs[label_key].dropna().astype(str)))
    if holdout_type not in types:
        raise DataError(f"--holdout-type {holdout_type!r} is not a type of {label_key!r}; types: {types}.")
    if len(types) < 3:
        raise DataError(f"--holdout-type needs at least 3 types in {label_key!r} (the reference keeps >= 2); "
                        f"found {types}.")


def lobo_splits(adata: ad.AnnData, label_key: str, batch_key: str, holdout_type: str | None = None) -> list[Split]:
    """One split per batch: query = that batch, reference = the others (minus `holdout_type`'s cells)."""
    batch = adata.obs[batch_key].to_numpy()
    keep = np.ones(adata.n_obs, bool)
    if holdout_type is not None:
        keep = adata.obs[label_key].astype(str).to_numpy() != holdout_type
    splits = []
    for b in sorted(pd.unique(batch)):
        is_q = batch == b
        ref = ~is_q & keep
        assert b not in set(batch[ref]), "query batch leaked into the reference"
        splits.append(Split(str(b), ref, is_q))
    return splits


PROTOCOL = ("leave-one-batch-out: query = one batch, reference = all other batches; methods fitted on the "
            "reference only")


def run_lobo(adata: ad.AnnData, label_key: str, batch_key: str, out_dir, *,
             methods: dict[str, Method], plots_umap: bool = True, progress: bool = True,
             meta: dict | None = None, holdout_type: str | None = None) -> dict:
    """Run every method on every LOBO fold, write the report folder atomically, return the metrics dict."""
    check_lobo_input(adata, label_key, batch_key)
    if holdout_type is not None:
        check_holdout_type(adata, label_key, holdout_type)
    adata = adata.copy()
    adata.obs[batch_key] = adata.obs[batch_key].astype("string").fillna("NA").astype(str)
    protocol = PROTOCOL
    if (meta or {}).get("query_in_training"):
        protocol += ("; except that scPermut also trained on the query's cells, unlabelled and as their own batch "
                     "(--query-in-training)")
    if holdout_type is not None:
        protocol += (f"; type {holdout_type!r} removed from every reference (--holdout-type): its query cells are "
                     "scored for unknown detection only, the other metrics score the remaining query cells")
    return run_splits(adata, lobo_splits(adata, label_key, batch_key, holdout_type), label_key, batch_key, out_dir,
                      methods=methods, protocol=protocol, plots_umap=plots_umap, progress=progress, meta=meta,
                      holdout_type=holdout_type)


def format_table(report: dict) -> str:
    """The printed report: summary with time to result, per split, rare types, held-out type, calibration."""
    from scpermut_dist.evaluation.tables import format_report

    return format_report(report)
