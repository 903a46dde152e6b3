"""Small real datasets for the streaming tests: counts with rows grouped by batch, like Census."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from loaders.sampling import SamplingPlan, encode_obs
from loaders.selection import CellSelection
from loaders.sources import AnnDataSource

SELECTION = CellSelection(label_key="cell_type", batch_keys=("dataset",), unlabeled_values=("unknown",))


def grouped_adata(n: int = 3000, n_genes: int = 40, n_batches: int = 6, seed: int = 0,
                  unlabelled_frac: float = 0.05) -> ad.AnnData:
    """Raw counts; rows grouped by dataset; cell types with very different sizes plus special cases.

    'solo' is a single cell; 'lonely' lives in one dataset only; some cells are 'unknown'.
    """
    rng = np.random.default_rng(seed)
    batch = np.sort(rng.integers(0, n_batches, n))
    types = rng.choice(["T", "B", "NK", "mono", "DC"], size=n, p=[0.55, 0.25, 0.12, 0.06, 0.02]).astype(object)
    types[rng.random(n) < unlabelled_frac] = "unknown"
    first = np.flatnonzero(batch == 0)
    types[first[:25]] = "lonely"
    types[n // 2] = "solo"
    x = sp.random(n, n_genes, density=0.3, format="csr", random_state=seed, dtype=np.float32)
    x.data = np.ceil(x.data * 20).astype(np.float32)
    obs = pd.DataFrame({"cell_type": types.astype(str), "dataset": [f"ds{b}" for b in batch]},
                       index=[f"c{i}" for i in range(n)])
    var = pd.DataFrame(index=[f"ENSG{i:08d}" for i in range(n_genes)])
    return ad.AnnData(X=x, obs=obs, var=var)


def source_and_plan(adata: ad.AnnData | None = None, **plan_kw):
    src = AnnDataSource(adata if adata is not None else grouped_adata(), SELECTION)
    return src, SamplingPlan.from_source(src, **plan_kw)


def codes(src):
    return encode_obs(src.obs)
