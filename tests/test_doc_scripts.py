"""The analysis scripts that docs/experiments.md cites still do what the page says they do."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "docs" / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kang(datasets_dir) -> ad.AnnData:
    return ad.read_h5ad(datasets_dir / "kang2018_pbmc_ifnb_4samples.h5ad")


def test_rare_type_set_cuts_only_the_rare_types(kang):
    stress = _script("stress_sets")
    rare = stress.with_rare_types(kang)
    before = kang.obs.groupby(["batch", "cell_type"], observed=True).size()
    after = rare.obs.groupby(["batch", "cell_type"], observed=True).size()
    for (batch, cell_type), n in before.items():
        if cell_type in stress.RARE_TYPES:
            assert after[(batch, cell_type)] == min(n, stress.RARE_CELLS_PER_SAMPLE)
        else:
            assert after[(batch, cell_type)] == n
    assert set(rare.obs_names) <= set(kang.obs_names)


def test_new_chemistry_redraws_one_sample_without_new_molecules(kang):
    stress = _script("stress_sets")
    chem = stress.with_new_chemistry(kang)
    changed = (kang.obs["batch"].astype(str) == stress.CHEMISTRY_SAMPLE).to_numpy()
    assert abs(chem.X[~changed] - kang.X[~changed]).sum() == 0  # the other samples are untouched
    assert abs(chem.X[changed] - kang.X[changed]).sum() > 0
    before_ng, after_ng = kang.X[changed].toarray(), chem.X[changed].toarray()
    assert (after_ng[before_ng == 0] == 0).all()  # an absent gene stays absent
    x = chem.X[changed].data
    assert (x >= 0).all() and np.array_equal(x, np.round(x))  # still counts
    assert stress.CHEMISTRY_SAMPLE in chem.uns["perturbation"]


def test_linear_ceilings_scaling_and_one_vs_rest(kang):
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    lin = _script("linear_ceilings")
    x = np.log1p(kang.X[:, :200].toarray())
    batch = kang.obs["batch"].astype(str).to_numpy()
    centred = lin.scaled_per_batch(x, batch, centre_only=True)
    for b in np.unique(batch):
        assert np.allclose(centred[batch == b].mean(0), 0.0, atol=1e-5)
    y = kang.obs["cell_type"].astype(str).to_numpy()
    ovr = lin.lobo(x, y, batch, lambda: OneVsRestClassifier(LogisticRegression(max_iter=300)),
                   lambda ref: lin.scaled(x, ref))
    assert len(ovr) == len(np.unique(batch)) and all(0.2 < s <= 1.0 for s in ovr)  # > chance (0.2) on 5 types
    multi = lin.lobo(x, y, batch, lambda: LogisticRegression(max_iter=300), lambda ref: lin.scaled(x, ref))
    assert ovr != multi  # the two formulations are different fits
