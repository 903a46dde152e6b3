"""The authors' partly annotated atlas: hide a fraction of the labels, predict the hidden cells.

Per mask seed, `fraction` of the labelled cells are hidden at random, stratified by batch and by type
within batch (each (batch, type) group loses round(fraction * n) cells, at most n - 1 when n >= 2, so
every type keeps labels in every batch where it can; a one-cell group is hidden with probability
`fraction`). scPermut trains on ALL cells with the hidden ones marked unlabelled (they keep their batch
and still take part in reconstruction and the adversary); the baselines train on the labelled cells only.
Every method is scored on the hidden cells, whose labels no method ever receives: the harness drops the
label column from the query (= the hidden cells) before any method sees it.
"""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from loaders.errors import DataError
from scpermut_dist.evaluation.harness import Method, Split, run_splits
from scpermut_dist.evaluation.lobo import QUERY_UNLABELED, scpermut_method

HIDDEN = QUERY_UNLABELED  # the label scPermut receives for hidden cells (never a real type)


def hide_labels(labels, batches, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the cells whose label is hidden (only labelled cells are ever hidden)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--semi-supervised {fraction}: give the fraction of labels to hide, between 0 and 1 "
                        "(e.g. 0.7).")
    lab = pd.Series(np.asarray(labels, dtype=object))
    has = lab.notna().to_numpy() & (lab.astype(str) != "<NA>").to_numpy()
    groups = pd.DataFrame({"b": np.asarray(batches).astype(str), "t": lab.astype(str)})[has]
    rng = np.random.default_rng(seed)
    hidden = np.zeros(len(lab), bool)
    for _, idx in sorted(groups.groupby(["b", "t"]).indices.items()):
        cells = np.flatnonzero(has)[idx]
        n = len(cells)
        k = int(rng.random() < fraction) if n == 1 else min(round(fraction * n), n - 1)
        hidden[rng.permutation(cells)[:k]] = True
    return hidden


def semisupervised_splits(adata: ad.AnnData, label_key: str, batch_key: str, fraction: float,
                          mask_seeds: list[int]) -> list[Split]:
    splits = []
    for s in mask_seeds:
        h = hide_labels(adata.obs[label_key].to_numpy(dtype=object), adata.obs[batch_key], fraction, s)
        if not h.any():
            raise DataError(f"--semi-supervised {fraction}: hides no cell of {adata.n_obs}; raise the fraction.")
        splits.append(Split(f"hidden_seed{s}", ~h, h, info={"mask_seed": int(s), "hidden_fraction": float(h.mean()),
                                                            "n_hidden": int(h.sum())}))
    return splits


def scpermut_semisupervised_method(config) -> Method:
    """scPermut on all cells: the labelled reference plus the hidden cells, unlabelled, in their own batches."""
    return scpermut_method(config, with_query=True, query_batch="keep")


def run_semisupervised(adata: ad.AnnData, label_key: str, batch_key: str, out_dir, *, methods: dict[str, Method],
                       fraction: float, mask_seeds: list[int] | None = None, plots_umap: bool = True,
                       progress: bool = True, meta: dict | None = None) -> dict:
    """Hide `fraction` of the labels per mask seed, run every method, score the hidden cells, write the report."""
    from scpermut_dist.evaluation.lobo import check_lobo_input

    check_lobo_input(adata, label_key, batch_key)
    adata = adata.copy()
    adata.obs[batch_key] = adata.obs[batch_key].astype("string").fillna("NA").astype(str)
    seeds = list(mask_seeds or [0])
    protocol = (f"semi-supervised (partly annotated atlas): {fraction:.0%} of the labels hidden at random, stratified "
                "by batch and type within batch, one split per mask seed; scPermut trains on all cells with the "
                "hidden ones unlabelled, baselines on the labelled cells only; scores are on the hidden cells")
    return run_splits(adata, semisupervised_splits(adata, label_key, batch_key, fraction, seeds), label_key,
                      batch_key, out_dir, methods=methods, protocol=protocol, plots_umap=plots_umap, progress=progress,
                      meta={**(meta or {}), "semi_supervised": fraction, "mask_seeds": seeds})
