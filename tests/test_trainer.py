"""The training loop on real counts through the real data path: pairs, stages, early stopping, seeds."""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from model_data import cellbench_sng, tiny_config

from loaders.sources import AnnDataSource
from scpermut_dist.api import fit
from scpermut_dist.model.losses import LossWeights
from scpermut_dist.model.module import MODULE_NAMES, ScPermutModule
from scpermut_dist.model.schedule import Stage, scheme_stages
from scpermut_dist.train.preprocess import prepare_reference
from scpermut_dist.train.reference import MemberSplit, _loader_factory
from scpermut_dist.train.trainer import Trainer, ValidationSet


@pytest.fixture(scope="module")
def prepared(datasets_dir):
    adata = cellbench_sng(datasets_dir, unlabelled_fraction=0.2)
    cfg = tiny_config("data.label_key=cell_line", "data.batch_keys=batch", "data.unlabeled_value=unknown")
    prep = prepare_reference(lambda sel: AnnDataSource(adata, sel), cfg.data)
    labelled = np.flatnonzero(prep.label_codes >= 0)
    val, train_lab = labelled[::5], np.setdiff1d(labelled, labelled[::5])
    train_all = np.setdiff1d(prep.cells, val)
    x_val = torch.from_numpy(prep.normalization.apply_dense(prep.source.read_counts(val), prep.totals[val]))
    validation = ValidationSet(x_val, torch.from_numpy(prep.label_codes[val]))
    return prep, cfg, train_all, train_lab, validation


def _module(prep, cfg, seed=0):
    torch.manual_seed(seed)
    return ScPermutModule.from_config(cfg.model, len(prep.genes), len(prep.classes), len(prep.batches))


class Recording:
    """Wraps a stage loader and keeps every PairedBatch it hands to the trainer."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []
        self.sampled_class_freq = inner.sampled_class_freq

    def set_epoch(self, e):
        self.inner.set_epoch(e)

    def __iter__(self):
        for b in self.inner:
            self.batches.append(b)
            yield b


def _trainer(prep, cfg, train_all, train_lab, validation, stages, module, wrap=lambda x: x):
    make = _loader_factory(prep, cfg, MemberSplit(0, np.zeros(0, np.int64), train_all, train_lab), 0)
    return Trainer(module, stages, lambda s, i: wrap(make(s, i)), LossWeights.from_config(cfg.loss),
                   seed=0, validation=validation)


def test_pairs_as_delivered_to_the_trainer_are_same_class_never_self_and_unlabelled_self(prepared):
    prep, cfg, train_all, train_lab, validation = prepared
    recorders = []
    stage = Stage(name="perm", cells="all", trains=["encoder", "decoder"], losses=["rec"], permutation=True, epochs=2)
    t = _trainer(prep, cfg, train_all, train_lab, validation, [stage], _module(prep, cfg),
                 wrap=lambda x: recorders.append(Recording(x)) or recorders[-1])
    t.fit()
    batches = recorders[0].batches
    assert batches and sum(len(b) for b in batches) >= len(train_all)
    norm = prep.normalization.apply_dense(prep.source.read_counts(np.arange(prep.source.n_cells)), prep.totals)
    rows = {}
    for i, r in enumerate(norm):
        rows.setdefault(r.tobytes(), []).append(i)
    n_checked = n_unlabelled = 0
    for b in batches:
        for i, anchor in enumerate(b.cell_n.tolist()):
            assert anchor in set(train_all.tolist())
            assert np.array_equal(b.x_ng[i].numpy(), norm[anchor])
            label = prep.label_codes[anchor]
            assert int(b.label_n[i]) == label and int(b.batch_n[i]) == prep.batch_codes[anchor]
            if label < 0:
                assert torch.equal(b.x_partner_ng[i], b.x_ng[i])
                n_unlabelled += 1
                continue
            candidates = rows[b.x_partner_ng[i].numpy().tobytes()]
            assert any(prep.label_codes[c] == label and c != anchor for c in candidates), (anchor, candidates)
            n_checked += 1
    assert n_checked > 300 and n_unlabelled > 30


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("stage", scheme_stages("scheme8"), ids=lambda s: s.name)
def test_each_stage_trains_exactly_the_modules_it_names(prepared, stage):
    prep, cfg, train_all, train_lab, validation = prepared
    module = _module(prep, cfg)
    before = _snapshot(module)
    short = stage.model_copy(update={"epochs": 1})
    _trainer(prep, cfg, train_all, train_lab, validation, [short], module).fit()
    after = _snapshot(module)
    for name in MODULE_NAMES:
        keys = [k for k in before if k.startswith(name + ".")]
        changed = any(not torch.equal(before[k], after[k]) for k in keys)
        assert changed == (name in stage.trains), (name, stage.trains)  # weights AND BatchNorm statistics


def test_early_stopping_restores_the_best_weights(prepared):
    prep, cfg, train_all, train_lab, validation = prepared
    module = _module(prep, cfg, seed=1)
    stage = Stage(name="full", trains=["encoder", "decoder", "classifier", "dann"], losses=["clas", "dann", "rec"],
                  epochs=12, early_stopping=2)
    snaps = []
    t = _trainer(prep, cfg, train_all, train_lab, validation, [stage], module)
    history = t.fit(on_epoch_end=lambda tr: snaps.append(_snapshot(tr.module)))
    best = 0
    for i, r in enumerate(history):  # best = highest balanced accuracy, ties broken by lower balanced NLL
        b = history[best]
        if i == 0 or r["val_balanced_accuracy"] > b["val_balanced_accuracy"] or (
                r["val_balanced_accuracy"] == b["val_balanced_accuracy"] and r["val_balanced_nll"] < b["val_balanced_nll"]):
            best = i
    assert len(history) == min(12, best + 1 + 2)  # stopped after `patience` epochs without improvement
    final = _snapshot(module)
    assert all(torch.equal(final[k], snaps[best][k]) for k in final)
    if best != len(snaps) - 1:
        assert any(not torch.equal(final[k], snaps[-1][k]) for k in final)


def test_a_seed_makes_a_cpu_run_reproducible(datasets_dir):
    adata = cellbench_sng(datasets_dir)
    cfg = tiny_config("train.max_epochs=1")
    runs = [fit(adata, "cell_line", "batch", cfg.apply_overrides([f"train.seed={s}"])) for s in (5, 5, 6)]
    sd = [r.module.state_dict() for r in runs]
    assert all(torch.equal(sd[0][k], sd[1][k]) for k in sd[0])
    assert any(not torch.equal(sd[0][k], sd[2][k]) for k in sd[0] if sd[0][k].is_floating_point())
    p0, p1 = runs[0].map(adata).probabilities, runs[1].map(adata).probabilities
    assert np.array_equal(p0.to_numpy(), p1.to_numpy())


def test_single_batch_training_drops_the_adversary(datasets_dir):
    adata = cellbench_sng(datasets_dir)
    ref = fit(adata, "cell_line", None, tiny_config("train.max_epochs=1"))
    assert ref.batches == ["all"]
    assert all("loss_dann" not in r for r in ref.history)
    assert ref.summary["stages"] == ["warmup_dann", "full_model", "classifier_branch"]
    assert {r["stage"] for r in ref.history if "loss_rec" in r} == {"warmup_dann", "full_model"}


def test_trainer_state_is_exposed_for_checkpointing(prepared):
    prep, cfg, train_all, train_lab, validation = prepared
    states = []
    stages = [s.model_copy(update={"epochs": 1}) for s in scheme_stages("scheme8")]
    t = _trainer(prep, cfg, train_all, train_lab, validation, stages, _module(prep, cfg))
    t.fit(on_epoch_end=lambda tr: states.append(copy.deepcopy(tr.state_dict())))
    assert [s["position"]["stage_index"] for s in states] == [0, 1, 2]
    assert all(s["position"]["epoch"] == 1 for s in states)
    assert states[1]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(9.9e-4)
    for s in states:  # the real loader's position, saved at an epoch boundary: the next epoch from its start
        assert s["loader"]["epoch"] == s["position"]["epoch"] and s["loader"]["step"] == 0, s["loader"]


def test_resuming_from_an_epoch_boundary_state_reproduces_the_uninterrupted_run(prepared):
    prep, cfg, train_all, train_lab, validation = prepared
    stages = [s.model_copy(update={"epochs": 2}) for s in scheme_stages("scheme8", patience=1)]
    states = []
    full = _trainer(prep, cfg, train_all, train_lab, validation, stages, _module(prep, cfg))
    full.fit(on_epoch_end=lambda tr: states.append(copy.deepcopy(tr.state_dict())))
    for k in (0, 1, 3):  # mid-stage (warmup epoch 2 next), the end of a stage, within full_model
        resumed = _trainer(prep, cfg, train_all, train_lab, validation, stages, _module(prep, cfg, seed=9))
        resumed.load_state_dict(copy.deepcopy(states[k]))
        history = resumed.fit()
        assert [r["stage"] for r in history] == [r["stage"] for r in full.history]
        final, expected = resumed.module.state_dict(), full.module.state_dict()
        assert all(torch.equal(final[key], expected[key]) for key in expected), k


def test_a_given_gene_list_replaces_hvg_selection(datasets_dir):
    adata = cellbench_sng(datasets_dir)
    genes = list(adata.var_names[100:160])
    ref = fit(adata, "cell_line", "batch", tiny_config("train.max_epochs=1").apply_overrides([f"data.genes={genes}"]))
    assert list(ref.genes["feature_id"]) == genes and ref.module.dims["n_genes"] == 60


def test_batch_key_may_combine_columns(datasets_dir):
    adata = cellbench_sng(datasets_dir)
    adata.obs["plate_half"] = (np.arange(adata.n_obs) % 2).astype(str)
    ref = fit(adata, "cell_line", "batch+plate_half", tiny_config("train.max_epochs=1"))
    assert len(ref.batches) == 6 and "CELseq2_5cl_p1+0" in ref.batches
    assert sum(ref.training_data["batch_counts"].values()) == adata.n_obs


def test_stage_length_in_cells_seen(prepared):
    prep, cfg, train_all, train_lab, validation = prepared
    stage = Stage(name="warm", cells="all", trains=["encoder", "decoder"], losses=["rec"], permutation=True,
                  epochs=50, cells_per_epoch=200, max_cells_seen=700)
    history = _trainer(prep, cfg, train_all, train_lab, validation, [stage], _module(prep, cfg)).fit()
    assert [r["cells"] for r in history] == [200, 200, 200, 200]  # stops once 700 cells were seen


def _early_stopping(curve: list[tuple[float, float]], tolerance: float = 0.0) -> dict:
    """The stage state after feeding (balanced accuracy, balanced NLL) per epoch to the early-stopping rule."""
    from scpermut_dist.train.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t._stage_state = {"best_metric": None, "best_epoch": None, "bad_epochs": 0}
    t._best_state, t.module, t.tolerance = None, torch.nn.Linear(2, 2), tolerance
    stage = Stage(name="s", trains=["encoder", "classifier"], losses=["clas"], epochs=5, early_stopping=3)
    for epoch, (ba, nll) in enumerate(curve):
        t._early_stopping_update(stage, epoch, ba, nll)
    return t._stage_state


def test_validation_nll_breaks_accuracy_ties():
    st = _early_stopping([(1.0, 0.5), (1.0, 0.3), (1.0, 0.4), (0.9, 0.1)])
    assert st["best_epoch"] == 1 and st["bad_epochs"] == 2


CURVE = [(0.90, 0.50), (0.93, 0.40), (0.925, 0.30), (0.94, 0.35), (0.95, 0.45), (0.92, 0.20)]


def test_without_tolerance_the_first_highest_accuracy_is_kept():
    st = _early_stopping(CURVE)
    assert st["best_epoch"] == 4 and st["bad_epochs"] == 1 and st["peak"] == 0.95


def test_a_tolerance_keeps_the_best_fitting_epoch_near_the_accuracy_peak():
    """0.01: epoch 2 (0.925, within 0.005 of the 0.93 peak) fits better than epoch 1; the 0.94 peak drops it out of
    the band; the 0.95 peak keeps epoch 3 (in its band, lower NLL) but resets patience; 0.92 is below the band."""
    st = _early_stopping(CURVE, tolerance=0.01)
    assert st["best_epoch"] == 3 and st["best_metric"] == 0.94 and st["peak"] == 0.95 and st["bad_epochs"] == 1
    assert _early_stopping(CURVE[:3], tolerance=0.01)["best_epoch"] == 2
    assert _early_stopping(CURVE[:3], tolerance=0.001)["best_epoch"] == 1  # 0.925 is not level with 0.93 at 0.001


def test_the_adversary_learns_on_its_own_time_scale(prepared):
    prep, cfg, train_all, train_lab, validation = prepared
    module = _module(prep, cfg)
    make = _loader_factory(prep, cfg, MemberSplit(0, np.zeros(0, np.int64), train_all, train_lab), 0)
    stage = Stage(name="w", cells="all", trains=["encoder", "decoder", "dann"], losses=["dann", "rec"], epochs=1)
    t = Trainer(module, [stage], make, LossWeights.from_config(cfg.loss), lr=1e-3, dann_lr_mult=10.0)
    t.fit()
    groups = {len(g["params"]): g["lr"] for g in t._optimizer.param_groups}
    n_dann = len(list(module.dann.parameters()))
    assert groups[n_dann] == pytest.approx(1e-2) and len(groups) == 2
    assert sorted(groups.values()) == pytest.approx([1e-3, 1e-2])


def test_bf16_on_cpu_is_fp32_and_says_so_once(datasets_dir, caplog):
    """train.precision=bf16 autocasts on CUDA only: on the CPU the weights are fp32's bit for bit, and a note says
    so once per run (not once per ensemble member: two members train in worker processes here)."""
    cells = cellbench_sng(datasets_dir)[::3].copy()
    fp32 = fit(cells, "cell_line", "batch", tiny_config("train.max_epochs=1", "model.ensemble_size=2"))
    assert not [r for r in caplog.records if "bf16" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="scpermut_dist.train.trainer"):
        bf16 = fit(cells, "cell_line", "batch", tiny_config("train.max_epochs=1", "model.ensemble_size=2",
                                                             "train.precision=bf16"))
    notes = [r for r in caplog.records if "bf16" in r.getMessage()]
    assert len(notes) == 1 and "fp32" in notes[0].getMessage()
    for a, b in zip([fp32.module, *fp32.extra_members], [bf16.module, *bf16.extra_members], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
