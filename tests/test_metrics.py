"""Metrics against hand-computed cases, and the baselines on a real, easily separable problem."""
from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pytest

from scpermut_dist.evaluation import baselines, metrics


def test_classification_metrics_hand_computed():
    y_true = ["a", "a", "a", "a", "b", "b"]
    y_pred = ["a", "a", "a", "b", "b", "b"]
    m = metrics.classification_metrics(y_true, y_pred)
    # recall a = 3/4, recall b = 1 -> balanced accuracy 0.875; accuracy 5/6
    assert m["balanced_accuracy"] == pytest.approx(0.875)
    assert m["accuracy"] == pytest.approx(5 / 6)
    # F1 a: p=1, r=.75 -> 6/7; F1 b: p=2/3, r=1 -> 0.8
    assert m["per_class_f1"] == pytest.approx({"a": 6 / 7, "b": 0.8})
    assert m["macro_f1"] == pytest.approx((6 / 7 + 0.8) / 2)
    # 2x2 table, "a" positive: TP 3, FN 1, FP 0, TN 2
    assert m["mcc"] == pytest.approx((3 * 2 - 0 * 1) / math.sqrt(3 * 4 * 2 * 3))  # 1/sqrt(2)
    p_chance = (4 / 6) * (3 / 6) + (2 / 6) * (3 / 6)  # 1/2
    assert m["cohen_kappa"] == pytest.approx((5 / 6 - p_chance) / (1 - p_chance))  # 2/3
    # ARI from pair counts: sum C(n_ij, 2) = 3 + 1, rows 6 + 1, columns 3 + 3, C(6, 2) = 15
    expected_pairs = 7 * 6 / 15
    assert m["ari"] == pytest.approx((4 - expected_pairs) / ((7 + 6) / 2 - expected_pairs))  # 12/37
    # NMI (arithmetic mean of the entropies): MI = 1/2 ln(3/2) + 1/6 ln(1/2) + 1/3 ln 2
    mi = 0.5 * math.log(1.5) + math.log(0.5) / 6 + math.log(2) / 3
    h_true, h_pred = -(4 / 6 * math.log(4 / 6) + 2 / 6 * math.log(2 / 6)), math.log(2)
    assert m["nmi"] == pytest.approx(mi / ((h_true + h_pred) / 2))
    perfect = metrics.classification_metrics(y_true, y_true)
    assert all(perfect[k] == pytest.approx(1.0) for k in ("balanced_accuracy", "mcc", "cohen_kappa", "ari", "nmi"))


def test_predicting_a_class_absent_from_the_query_costs_macro_f1_not_balanced_accuracy():
    m = metrics.classification_metrics(["a", "a", "b", "b"], ["a", "c", "b", "b"])
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["per_class_f1"]["c"] == 0.0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)


def test_missing_true_labels_are_ignored():
    m = metrics.classification_metrics(["a", None, "b", float("nan")], ["a", "b", "b", "a"])
    assert m["n_cells"] == 2 and m["accuracy"] == 1.0


def test_size_bins_follow_reference_frequencies():
    ref = ["big"] * 900 + ["mid"] * 95 + ["small"] * 5
    freq = metrics.reference_class_freq(ref)
    assert metrics.size_bin_of(freq, "big") == ">=10%"
    assert metrics.size_bin_of(freq, "mid") == "1-10%"
    assert metrics.size_bin_of(freq, "small") == "0.1-1%"
    assert metrics.size_bin_of(freq, "never") == "unseen"
    bins = metrics.size_bin_metrics(["big", "big", "small", "small", "never"],
                                    ["big", "big", "small", "big", "big"], freq)
    assert set(bins) == {">=10%", "0.1-1%", "unseen"}
    assert bins["0.1-1%"]["accuracy"] == 0.5 and bins["0.1-1%"]["types"] == ["small"]
    assert bins[">=10%"]["accuracy"] == 1.0
    assert bins["unseen"]["accuracy"] == 0.0


def test_batch_entropy_separated_is_zero_and_mixed_is_hand_computed():
    rng = np.random.default_rng(0)
    # fully separated: each batch its own far-away cluster
    z = np.vstack([rng.normal(0, 0.1, (50, 3)), rng.normal(100, 0.1, (50, 3))])
    b = np.repeat(["x", "y"], 50)
    assert metrics.batch_mixing_entropy(z, b, k=10) == pytest.approx(0.0)
    # 25 far-apart sites with 2 cells of each batch; k = 3 -> neighbours: 1 own batch, 2 other
    sites = np.repeat(np.arange(25)[:, None] * 1000.0, 4, axis=0)
    z = sites + rng.normal(0, 0.01, (100, 1))
    b = np.tile(["x", "x", "y", "y"], 25)
    expected = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3)) / math.log(2)
    assert metrics.batch_mixing_entropy(z, b, k=3) == pytest.approx(expected)
    # perfectly mixed at random: close to 1; k is capped at n - 1
    z = rng.normal(size=(400, 5))
    b = rng.choice(["x", "y", "w"], 400)
    assert metrics.batch_mixing_entropy(z, b) > 0.95
    # 5 cells: k=100 is k=4, every cell's neighbours are the 4 others
    capped = metrics.batch_mixing_entropy(z[:5], b[:5], k=100)
    assert capped == metrics.batch_mixing_entropy(z[:5], b[:5], k=4)
    _, b5 = np.unique(b[:5], return_inverse=True)
    glob = np.bincount(b5).astype(float)
    assert len(glob) > 1

    def h(c):
        p = c[c > 0] / c.sum()
        return -(p * np.log(p)).sum()
    assert capped == pytest.approx(np.mean([h(glob - np.eye(len(glob))[j]) for j in b5]) / h(glob))
    assert math.isnan(metrics.batch_mixing_entropy(z, ["x"] * 400))


def test_batch_entropy_uses_the_batch_prior():
    """Unbalanced batches, ideally mixed (neighbourhoods = global proportions) still score 1."""
    sites = np.repeat(np.arange(30)[:, None] * 1000.0, 5, axis=0)
    z = sites + np.random.default_rng(1).normal(0, 0.01, (150, 1))
    b = np.tile(["x", "x", "x", "x", "y"], 30)  # 80/20 everywhere
    # with k=4 a y cell sees 4 x's (entropy 0) and an x cell sees 3 x + 1 y: mean is below 1 but > 0
    e = metrics.batch_mixing_entropy(z, b, k=4)
    h_x = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    prior = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert e == pytest.approx(0.8 * h_x / prior)


def test_within_type_mixing_ignores_composition_but_sees_batch_splits():
    """Batches holding types in different proportions cap the global score below 1 even when each type is
    perfectly mixed; the within-type score is then ~1, and it drops to 0 when a type splits by batch."""
    rng = np.random.default_rng(0)
    # type a: 90 % batch x; type b: 90 % batch y; each type one tight cluster, far from the other
    t = np.repeat(["a", "b"], 200)
    b = np.where(t == "a", np.where(np.arange(400) % 10 == 0, "y", "x"), np.where(np.arange(400) % 10 == 0, "x", "y"))
    z = np.where(t == "a", 0.0, 1000.0)[:, None] + rng.normal(0, 1, (400, 3))
    glob = metrics.batch_mixing_entropy(z, b, k=50)
    within = metrics.batch_mixing_entropy_within_type(z, b, t, k=50)
    assert glob < 0.6 and within > 0.9
    # now type a's two batches sit apart: a's x cells (90 %) see only x, b is still mixed (weights 1:1)
    z_split = z + np.where((t == "a") & (b == "y"), 100.0, 0.0)[:, None]
    split = metrics.batch_mixing_entropy_within_type(z_split, b, t, k=50)
    assert 0.4 * within < split < 0.6 * within
    # a type in one batch only is skipped, none left -> NaN
    assert math.isnan(metrics.batch_mixing_entropy_within_type(z, np.where(t == "a", "x", "y"), t))


def test_silhouette_and_mean_over_folds():
    z = np.vstack([np.zeros((20, 2)), np.full((20, 2), 10.0)]) + np.random.default_rng(0).normal(0, 0.1, (40, 2))
    assert metrics.silhouette_by_label(z, ["a"] * 20 + ["b"] * 20) > 0.9
    assert metrics.silhouette_by_label(z, ["a", "b"] * 20) < 0.1
    mean = metrics.mean_over_folds([{"balanced_accuracy": 0.5, "per_class_f1": {"a": 1.0}},
                                    {"balanced_accuracy": 1.0, "per_class_f1": {"a": 0.0, "b": 1.0}}])
    assert mean["balanced_accuracy"] == 0.75 and mean["balanced_accuracy_std"] == 0.25
    assert mean["per_class_f1"] == {"a": 0.5, "b": 1.0}


@pytest.fixture(scope="module")
def cellbench(datasets_dir):
    a = ad.read_h5ad(datasets_dir / "cellbench_5cl_3plates.h5ad")
    a = a[a.obs["demuxlet_cls"] == "SNG"].copy()
    return a


@pytest.mark.parametrize("name", ["logreg", "knn_pca"])
def test_baselines_learn_real_cell_lines_across_plates(cellbench, name):
    """Train on two CEL-seq2 plates, predict the third: real cell lines are separable."""
    is_q = (cellbench.obs["batch"] == "CELseq2_5cl_p1").to_numpy()
    ref, query = cellbench[~is_q].copy(), cellbench[is_q].copy()
    # the query holds half of the reference's genes, in another order: only shared genes can be used
    rng = np.random.default_rng(0)
    query = query[:, rng.permutation(query.n_vars)[: query.n_vars // 2]].copy()
    fn = baselines.BASELINES[name]
    kwargs = {"ref_batches": ref.obs["batch"].to_numpy(), "n_hvg": 500} if name == "knn_pca" else {}
    res = fn(ref, ref.obs["cell_line"].to_numpy(), query, **kwargs)
    m = metrics.classification_metrics(query.obs["cell_line"].to_numpy(), res.labels)
    assert m["balanced_accuracy"] > 0.9
    # shuffled reference labels carry no signal: the same pipeline then fails
    shuffled = rng.permutation(ref.obs["cell_line"].to_numpy())
    bad = fn(ref, shuffled, query, **kwargs)
    assert metrics.classification_metrics(query.obs["cell_line"].to_numpy(), bad.labels)["balanced_accuracy"] < 0.6


def test_baselines_reject_disjoint_genes(cellbench):
    other = cellbench[:20].copy()
    other.var_names = [f"G{i}" for i in range(other.n_vars)]
    with pytest.raises(Exception, match="share no gene"):
        baselines.logreg_celltypist(cellbench, cellbench.obs["cell_line"].to_numpy(), other)
