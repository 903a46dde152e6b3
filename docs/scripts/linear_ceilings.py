"""Linear models on the genes, leave one batch out: what CellTypist's edge is made of, and how far the labels go.

Reproduces the linear rows of docs/experiments.md ("Ceilings: how far the Kang labels go"): the CellTypist recipe fitted
multinomial (this project's `logreg` baseline) and one-vs-rest (what `celltypist.train` fits), class-balanced
fits over C, per-batch per-gene scaling, and an oracle that also trains on 3/4 of the query batch's own labels.

    python docs/scripts/linear_ceilings.py --h5ad ../shared/datasets/kang2018_pbmc_ifnb_4samples.h5ad \
        --label-key cell_type [--batch-key batch] [--obs-filter "demuxlet_cls == 'SNG'"]
"""
from __future__ import annotations

import argparse
from typing import Callable

import anndata as ad
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.multiclass import OneVsRestClassifier

from scpermut_dist.evaluation.baselines import _Scaler, log_cp10k


def scaled(x: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """Per-gene z-score with the statistics of `fit_rows`, clipped at 10 (the baselines' and CellTypist's)."""
    return _Scaler(x[fit_rows])(x)


def scaled_per_batch(x: np.ndarray, batch: np.ndarray, centre_only: bool) -> np.ndarray:
    """Every batch, the query included, on its own per-gene statistics: the usual per-gene chemistry remedy."""
    out = np.empty_like(x)
    for b in np.unique(batch):
        rows = batch == b
        out[rows] = x[rows] - x[rows].mean(0) if centre_only else scaled(x, rows)[rows]
    return out


def lobo(x: np.ndarray, y: np.ndarray, batch: np.ndarray, make: Callable, features: Callable) -> list[float]:
    scores = []
    for q in sorted(set(batch)):
        ref = batch != q
        xs = features(ref)
        scores.append(balanced_accuracy_score(y[~ref], make().fit(xs[ref], y[ref]).predict(xs[~ref])))
    return scores


def oracle(x: np.ndarray, y: np.ndarray, batch: np.ndarray) -> list[float]:
    """Reference plus 3/4 of the query batch's labelled cells, scored on the remaining quarter (4-fold)."""
    xs, scores = scaled(x, np.ones(len(x), bool)), []
    for q in sorted(set(batch)):
        qi, ri = np.flatnonzero(batch == q), np.flatnonzero(batch != q)
        pred = np.empty(len(qi), dtype=object)
        for tr, te in StratifiedKFold(4, shuffle=True, random_state=0).split(qi, y[qi]):
            rows = np.concatenate([ri, qi[tr]])
            model = LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced").fit(xs[rows], y[rows])
            pred[te] = model.predict(xs[qi[te]])
        scores.append(balanced_accuracy_score(y[qi], pred.astype(str)))
    return scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--h5ad", required=True)
    p.add_argument("--label-key", required=True)
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--obs-filter", help="pandas query on obs, e.g. \"demuxlet_cls == 'SNG'\"")
    args = p.parse_args()
    a = ad.read_h5ad(args.h5ad)
    if args.obs_filter:
        a = a[a.obs.eval(args.obs_filter).to_numpy()].copy()
    x = log_cp10k(a).toarray()
    y, batch = a.obs[args.label_key].astype(str).to_numpy(), a.obs[args.batch_key].astype(str).to_numpy()
    ref_scaled = lambda ref: scaled(x, ref)  # noqa: E731
    per_batch = {centre: scaled_per_batch(x, batch, centre) for centre in (False, True)}  # fold-independent
    rows = {
        "multinomial (the logreg baseline)": lobo(x, y, batch, lambda: LogisticRegression(max_iter=1000), ref_scaled),
        "one-vs-rest (CellTypist)": lobo(
            x, y, batch, lambda: OneVsRestClassifier(LogisticRegression(max_iter=1000)), ref_scaled),
        **{f"multinomial, class-balanced, C={c}": lobo(
            x, y, batch, lambda c=c: LogisticRegression(C=c, max_iter=2000, class_weight="balanced"), ref_scaled)
           for c in (1.0, 0.1, 0.01, 0.001)},
        "multinomial, per-batch standardised": lobo(
            x, y, batch, lambda: LogisticRegression(max_iter=1000), lambda ref: per_batch[False]),
        "multinomial, per-batch centred": lobo(
            x, y, batch, lambda: LogisticRegression(max_iter=1000), lambda ref: per_batch[True]),
        "oracle: + 3/4 of the query's labels": oracle(x, y, batch),
    }
    print(f"{'method':<42}{'LOBO':>7}   per fold ({', '.join(sorted(set(batch)))})")
    for name, scores in rows.items():
        print(f"{name:<42}{np.mean(scores):>7.4f}   {' / '.join(f'{s:.3f}' for s in scores)}")


if __name__ == "__main__":
    main()
