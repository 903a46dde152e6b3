"""Harder variants of the shared Kang set, for questions the shared sets cannot ask (docs/experiments.md, stress tests).

- `kang_rare.h5ad`: CD8 T cells and FCGR3A+ monocytes cut to 10 cells per sample (3.4 % each): rare types
  a classifier without class weights tends to give away to their abundant neighbours (CD4 T, CD14 monocytes).
- `kang_chem.h5ad`: the stim107 sample re-drawn as if from another chemistry, counts ~ Poisson(x_g * f_g) with
  one capture factor per gene, log f_g ~ N(0, 0.6): the per-gene shift between 10x 3' and 5' kits.

    python docs/scripts/stress_sets.py --kang ../shared/datasets/kang2018_pbmc_ifnb_4samples.h5ad --out stress/
"""
from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

RARE_TYPES, RARE_CELLS_PER_SAMPLE = ("CD8 T cells", "FCGR3A+ Monocytes"), 10
CHEMISTRY_SAMPLE, CHEMISTRY_LOG_SD = "stim107", 0.6


def with_rare_types(a: ad.AnnData, seed: int = 0) -> ad.AnnData:
    rng, keep = np.random.default_rng(seed), np.ones(a.n_obs, bool)
    for sample in a.obs["batch"].unique():
        for cell_type in RARE_TYPES:
            idx = np.flatnonzero((a.obs["batch"] == sample).to_numpy() & (a.obs["cell_type"] == cell_type).to_numpy())
            keep[rng.permutation(idx)[RARE_CELLS_PER_SAMPLE:]] = False
    return a[keep].copy()


def with_new_chemistry(a: ad.AnnData, seed: int = 7) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    factor_g = np.exp(rng.normal(0.0, CHEMISTRY_LOG_SD, a.n_vars))
    x = sp.csr_matrix(a.X, dtype=np.float32, copy=True)
    rows = np.flatnonzero((a.obs["batch"].astype(str) == CHEMISTRY_SAMPLE).to_numpy())
    for r in rows:  # one cell at a time keeps the CSR structure; zeros stay zero (no new molecules of absent genes)
        lo, hi = x.indptr[r], x.indptr[r + 1]
        x.data[lo:hi] = rng.poisson(x.data[lo:hi] * factor_g[x.indices[lo:hi]])
    x.eliminate_zeros()
    out = a.copy()
    out.X = x
    out.uns["perturbation"] = (f"{CHEMISTRY_SAMPLE}: counts ~ Poisson(x * f_g), log f_g ~ N(0, {CHEMISTRY_LOG_SD}), "
                               f"seed {seed}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kang", required=True, help="kang2018_pbmc_ifnb_4samples.h5ad")
    p.add_argument("--out", required=True, help="folder for kang_rare.h5ad and kang_chem.h5ad")
    args = p.parse_args()
    kang, out = ad.read_h5ad(args.kang), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with_rare_types(kang).write_h5ad(out / "kang_rare.h5ad")
    with_new_chemistry(kang).write_h5ad(out / "kang_chem.h5ad")
    print(f"written {out / 'kang_rare.h5ad'} and {out / 'kang_chem.h5ad'}")


if __name__ == "__main__":
    main()
