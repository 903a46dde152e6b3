"""The real CellTypist (`celltypist.train` + `celltypist.annotate`) as a reference-only baseline.

Each data set is normalised on its own, over all its genes (total counts to 1e4, log1p: what CellTypist
expects), the model is trained on the labelled reference cells with CellTypist's defaults (all genes, no
feature selection, no SGD; one job, and BLAS held to as many threads: on a small shared machine
oversubscribed BLAS threads made it 3-5x slower) and the query is annotated in 'best match' mode without majority
voting. The model stays in memory; nothing is written to disk.

Two compatibility measures, both invisible in the result:
- celltypist 1.7.1 passes `multi_class='ovr'` to scikit-learn's LogisticRegression, a keyword removed in
  scikit-learn 1.8 (Teichlab/celltypist#164). Where it is gone, the same one-vs-rest fit (one binary L2
  logistic regression per class, sklearn's `OneVsRestClassifier`) is supplied for the duration of the
  training call, so the model is the one celltypist 1.7.1 trains with an older scikit-learn.
- importing celltypist creates `~/.celltypist` and configures the root logger at INFO; the import points
  it at a temporary folder (removed at once) and its logging is kept at WARNING.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
import sys
import tempfile
import warnings

import anndata as ad
import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from threadpoolctl import threadpool_limits

from scpermut_dist.evaluation.baselines import BaselineResult, _labelled, log_cp10k

_CELLTYPIST = None
UNASSIGNED_P = 0.5  # celltypist's 'prob match' threshold: no class above it = 'Unassigned'


def _import_celltypist():
    """Import celltypist once without touching the home folder or the root logger."""
    global _CELLTYPIST
    if _CELLTYPIST is not None:
        return _CELLTYPIST
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    tmp = tempfile.mkdtemp(prefix="celltypist-")
    old = os.environ.get("CELLTYPIST_FOLDER")
    os.environ["CELLTYPIST_FOLDER"] = tmp
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import celltypist
    finally:
        if old is None:
            os.environ.pop("CELLTYPIST_FOLDER", None)
        else:
            os.environ["CELLTYPIST_FOLDER"] = old
        shutil.rmtree(tmp, ignore_errors=True)
        for h in list(root.handlers):  # undo celltypist's logging.basicConfig
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
    logging.getLogger("celltypist").setLevel(logging.WARNING)
    _CELLTYPIST = celltypist
    return celltypist


class _OneVsRestLogisticRegression(LogisticRegression):
    """LogisticRegression(multi_class='ovr') as scikit-learn < 1.8 fitted it: one binary model per class."""

    def fit(self, X, y, sample_weight=None):
        params = self.get_params()
        ovr = OneVsRestClassifier(LogisticRegression(**params), n_jobs=getattr(self, "ovr_n_jobs", None))
        ovr.fit(X, y)
        self.classes_ = ovr.classes_
        self.coef_ = np.vstack([e.coef_ for e in ovr.estimators_])
        self.intercept_ = np.concatenate([e.intercept_ for e in ovr.estimators_])
        self.n_features_in_ = X.shape[1]
        self.n_iter_ = np.array([int(np.max(e.n_iter_)) for e in ovr.estimators_])
        return self


def _logistic_regression(*, multi_class: str = "auto", n_jobs=None, **kwargs) -> LogisticRegression:
    """Stand-in for celltypist.train's LogisticRegression where sklearn no longer takes multi_class."""
    if multi_class != "ovr":
        return LogisticRegression(**kwargs)
    model = _OneVsRestLogisticRegression(**kwargs)
    model.ovr_n_jobs = n_jobs
    return model


@contextlib.contextmanager
def _sklearn_compat(celltypist):
    if "multi_class" in inspect.signature(LogisticRegression).parameters:
        yield
        return
    train_mod = sys.modules["celltypist.train"]  # the module (the package's `train` attribute is the function)
    original = train_mod.LogisticRegression
    train_mod.LogisticRegression = _logistic_regression
    try:
        yield
    finally:
        train_mod.LogisticRegression = original


def _normalised(adata: ad.AnnData, layer: str | None) -> ad.AnnData:
    return ad.AnnData(X=log_cp10k(adata, layer), obs=pd.DataFrame(index=adata.obs_names.astype(str)),
                      var=pd.DataFrame(index=adata.var_names.astype(str)))


def celltypist_baseline(ref: ad.AnnData, ref_labels, query: ad.AnnData, *, layer: str | None = None,
                        n_jobs: int = 1) -> BaselineResult:
    """Train CellTypist on the labelled reference cells, annotate the query (best match, no majority voting)."""
    celltypist = _import_celltypist()
    keep = _labelled(ref_labels)
    train = _normalised(ref[keep], layer)
    y = np.asarray(ref_labels, dtype=object)[keep].astype(str)
    with _sklearn_compat(celltypist), warnings.catch_warnings(), threadpool_limits(limits=n_jobs):
        warnings.simplefilter("ignore")  # sklearn's n_jobs/penalty deprecations inside celltypist
        model = celltypist.train(train, labels=y, n_jobs=n_jobs)
        result = celltypist.annotate(_normalised(query, layer), model=model, majority_voting=False)
    labels = result.predicted_labels["predicted_labels"].astype(str).to_numpy()
    probs = expit(result.decision_matrix.to_numpy(dtype=float))  # what celltypist reports per class
    confidence = probs.max(axis=1)
    return BaselineResult(labels=labels, confidence=confidence, unknown=confidence < UNASSIGNED_P)
