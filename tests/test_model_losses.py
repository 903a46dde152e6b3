"""The network's pieces and the losses, checked against their formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scpermut_dist.model.losses import (
    LossWeights,
    balanced_alpha,
    confusion_loss,
    focal_loss,
    total_loss,
)
from scpermut_dist.model.module import GradientReversal, ScPermutModule
from scpermut_dist.train.split import stratified_split


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_gradient_reversal_is_identity_forward_and_flips_and_scales_the_gradient(lam):
    x = torch.randn(5, 3, requires_grad=True)
    y = GradientReversal(lam)(x)
    assert torch.equal(y, x)
    w = torch.randn(5, 3)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -lam * w)


def test_confusion_objective_trains_discriminator_and_encoder_on_separate_losses():
    """The discriminator learns only from its own cross-entropy; the encoder only from the confusion term."""
    torch.manual_seed(0)
    m = ScPermutModule(30, 3, 4, (16,), 8, dann_objective="confusion").train()
    x, b = torch.rand(24, 30), torch.arange(24) % 4
    out = m(x, heads=("dann",))
    grads = {}
    for name in ("dann", "confusion"):
        m.zero_grad()
        loss = F.cross_entropy(out.batch_logits, b) if name == "dann" else confusion_loss(out.batch_logits_encoder, b)
        loss.backward(retain_graph=True)
        grads[name] = (m.encoder.bottleneck[0].weight.grad, m.dann.head.out.weight.grad)
    assert grads["dann"][0] is None or float(grads["dann"][0].abs().sum()) == 0.0  # latent detached
    assert float(grads["dann"][1].abs().sum()) > 0
    assert float(grads["confusion"][0].abs().sum()) > 0
    assert grads["confusion"][1] is None or float(grads["confusion"][1].abs().sum()) == 0.0  # frozen copy
    # Both passes see the same discriminator: identical logits in eval mode.
    m.eval()
    ev = m(x, heads=("dann",))
    assert torch.allclose(ev.batch_logits, ev.batch_logits_encoder)


def test_confusion_loss_is_minimal_when_the_discriminator_outputs_the_batch_prior():
    b = torch.tensor([0, 0, 0, 1, 2, 2])
    prior = torch.tensor([3.0, 1.0, 2.0]) / 6
    at_prior = prior.log().repeat(6, 1).requires_grad_(True)
    loss = confusion_loss(at_prior, b)
    assert float(loss) == pytest.approx(float(-(prior * prior.log()).sum()), rel=1e-6)  # the prior's entropy
    loss.backward()
    assert float(at_prior.grad.abs().max()) < 1e-6
    confident = torch.tensor([[9.0, 0.0, 0.0]]).repeat(6, 1)  # "confidently wrong" or right: both cost more
    assert float(confusion_loss(confident, b)) > float(loss) + 1.0


def test_focal_loss_matches_its_formula_and_ignores_unlabelled():
    torch.manual_seed(0)
    logits = torch.randn(8, 4)
    labels = torch.tensor([0, 1, 2, 3, -1, 1, 1, -1])
    alpha = torch.tensor([0.5, 2.0, 1.0, 3.0])
    gamma = 3.0
    got = focal_loss(logits, labels, gamma, alpha)
    p = torch.softmax(logits, 1).numpy()
    terms = []
    for i, y in enumerate(labels.tolist()):
        if y < 0:
            continue
        onehot = np.eye(4)[y]
        terms.append(-np.sum(alpha.numpy() * (1 - p[i]) ** gamma * onehot * np.log(p[i])))
    assert float(got) == pytest.approx(np.mean(terms), rel=1e-5)


def test_focal_loss_with_gamma_0_and_alpha_1_is_cross_entropy():
    logits, labels = torch.randn(10, 5), torch.randint(0, 5, (10,))
    assert float(focal_loss(logits, labels, 0.0, None)) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)
    assert float(focal_loss(logits, labels, 0.0, torch.ones(5))) == pytest.approx(float(F.cross_entropy(logits, labels)),
                                                                                rel=1e-6)
    assert float(focal_loss(logits, torch.full((10,), -1), 3.0)) == 0.0


def test_balanced_alpha_is_authors_weights_under_natural_sampling_and_one_when_balanced():
    counts = np.array([60, 30, 10, 0])  # natural sampling: q = n_c / n
    alpha = balanced_alpha(counts / counts.sum()).numpy()
    n, k = counts.sum(), 3  # K = classes actually sampled
    assert alpha[:3] == pytest.approx(n / (k * counts[:3]))
    assert alpha[3] == 0.0
    assert balanced_alpha(np.array([0.25] * 4)).numpy() == pytest.approx(np.ones(4))  # no double correction


def test_total_loss_is_the_weighted_sum_of_its_terms():
    torch.manual_seed(0)
    m = ScPermutModule(20, 3, 2, hidden_sizes=[16, 8], latent_dim=4)
    x, xp = torch.rand(6, 20), torch.rand(6, 20)
    labels, batches = torch.tensor([0, 1, 2, -1, 0, 1]), torch.tensor([0, 1, 0, 1, 0, 1])
    out = m(x)
    w = LossWeights(clas_w=0.3, dann_w=0.02, rec_w=0.01)
    total, parts = total_loss(out, xp, labels, batches, ["clas", "dann", "rec"], w)
    assert float(parts["rec"]) == pytest.approx(float(F.mse_loss(out.reconstruction, xp).detach()))
    assert float(parts["dann"]) == pytest.approx(float(F.cross_entropy(out.batch_logits, batches).detach()))
    assert float(total.detach()) == pytest.approx(0.3 * float(parts["clas"]) + 0.02 * float(parts["dann"])
                                         + 0.01 * float(parts["rec"]), rel=1e-5)
    total_rec, parts_rec = total_loss(out, xp, labels, batches, ["rec"], w)
    assert set(parts_rec) == {"rec", "total"}
    # only the rec term, weighted, and the same rec part as with all terms
    assert float(parts_rec["rec"]) == pytest.approx(float(parts["rec"]), rel=1e-6)
    assert float(total_rec.detach()) == pytest.approx(0.01 * float(parts_rec["rec"]), rel=1e-5)
    assert float(parts_rec["total"]) == float(total_rec.detach())


def test_module_shapes_linear_bottleneck_and_freezing():
    torch.manual_seed(0)
    m = ScPermutModule(50, 4, 3)  # the authors' sizes: 50 -> 1151 -> 235 -> 84
    assert [type(x).__name__ for x in m.encoder.bottleneck] == ["Linear", "BatchNorm1d"]  # no ReLU/dropout
    assert m.encoder.hidden[0][0].out_features == 1151 and m.encoder.hidden[1][0].out_features == 235
    out = m(torch.rand(7, 50))
    assert out.latent.shape == (7, 84) and out.reconstruction.shape == (7, 50)
    assert out.class_logits.shape == (7, 4) and out.batch_logits.shape == (7, 3)
    assert (out.latent < 0).any()  # linear bottleneck: not ReLU'd
    assert (out.reconstruction >= 0).all()
    params = m.set_trainable(["classifier"])
    assert len(params) == len(list(m.classifier.parameters()))
    assert m.classifier.training and not m.encoder.training and not m.dann.training
    assert not any(p.requires_grad for p in m.encoder.parameters())
    only = m(torch.rand(3, 50), heads=("classifier",))
    assert only.reconstruction is None and only.batch_logits is None


def test_input_standardization_learns_reference_gene_statistics():
    """input_norm="standardize": running per-gene mean/var of the training inputs, applied (clipped) at eval."""
    torch.manual_seed(0)
    m = ScPermutModule(5, 3, 2, (16,), 8, input_norm="standardize").train()
    scale = torch.tensor([0.1, 1.0, 5.0, 20.0, 1.0])
    for _ in range(100):
        m.encoder(torch.randn(64, 5) * scale + 3.0)
    norm = m.encoder.input_norm
    assert ((norm.running_mean - 3.0).abs() < 0.1 * scale).all()  # ~4 standard errors
    assert torch.allclose(norm.running_var.sqrt() / scale, torch.ones(5), rtol=0.15)
    m.eval()
    x = torch.full((2, 5), 3.0)
    x[1, 0] = 1e6  # an outlier is clipped at 10 standard deviations
    seen = {}
    m.encoder.hidden.register_forward_pre_hook(lambda mod, inp: seen.setdefault("x", inp[0]))
    m.encoder(x)
    assert (seen["x"][0].abs() < 0.2).all() and seen["x"][1, 0] == 10.0
    assert ScPermutModule(5, 3, 2, (16,), 8).encoder.input_norm is None  # the authors' default: none
    with pytest.raises(ValueError, match="input_norm"):
        ScPermutModule(5, 3, 2, input_norm="zscore")


def test_input_dropout_masks_genes_in_training_only():
    """input_dropout: a fraction of the encoder's input genes zeroed per cell while training, none at eval."""
    torch.manual_seed(0)
    m = ScPermutModule(400, 3, 2, (16,), 8, input_dropout=0.3)
    seen = []
    m.encoder.hidden.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach()))
    x = torch.rand(64, 400) + 0.5  # no zeros of its own
    m.train().encoder(x)
    m.eval().encoder(x)
    assert abs(float((seen[0] == 0).float().mean()) - 0.3) < 0.02  # 25,600 genes x cells
    assert torch.equal(seen[1], x)  # mapping sees every gene
    assert ScPermutModule(5, 3, 2, (16,), 8).encoder.input_dropout is None  # the authors' default: off
    assert ScPermutModule(5, 3, 2, (16,), 8, input_dropout=0.3).dims["input_dropout"] == 0.3  # travels to checkpoints


def test_stratified_split_is_a_seeded_minority_and_keeps_singletons_in_train():
    labels = np.array([0] * 100 + [1] * 10 + [2] * 1 + [-1] * 7)
    train, val = stratified_split(labels, 0.2, seed=3)
    assert len(val) == 22 and len(train) == 89  # 20 + 2 of 111 labelled; the unlabelled are in neither
    assert np.bincount(labels[val], minlength=3).tolist() == [20, 2, 0]
    assert 110 in train and not np.intersect1d(train, val).size
    assert np.array_equal(val, stratified_split(labels, 0.2, seed=3)[1])
    assert not np.array_equal(val, stratified_split(labels, 0.2, seed=4)[1])
    _, capped = stratified_split(labels, 0.2, max_val=5, seed=0)
    # 22 > 5: fraction 5/111, so round(100*5/111) = 5 of class 0, round(0.45) = 0 of class 1, 0 of the singleton
    assert len(capped) == 5 and np.bincount(labels[capped], minlength=3).tolist() == [5, 0, 0]
    assert np.all(np.diff(capped) > 0)  # sorted, distinct


def test_focal_alpha_max_caps_only_the_rare_class():
    q = np.array([0.5, 0.3, 0.199, 0.001])
    free, capped = balanced_alpha(q).numpy(), balanced_alpha(q, max_weight=10.0).numpy()
    assert free[3] == pytest.approx(250.0, rel=1e-5)  # 1 / (K q): unbounded for an atlas-rare type
    assert capped[3] == pytest.approx(10.0) and np.allclose(capped[:3], free[:3])


def test_the_default_cap_bounds_only_atlas_rare_types():
    from scpermut_dist.config import RunConfig

    cap = RunConfig().loss.focal_alpha_max
    assert cap is not None
    shared_like = np.array([0.4, 0.3, 0.2, 0.1])  # every alpha <= 2.5, as on the shared sets
    assert torch.equal(balanced_alpha(shared_like, cap), balanced_alpha(shared_like))  # bit for bit unchanged
    atlas = np.array([0.6, 0.4 - 1e-6, 1e-6])  # a type at 1e-6: alpha ~333,000 unbounded
    capped = balanced_alpha(atlas, cap)
    assert float(capped[2]) == cap and float(balanced_alpha(atlas)[2]) > 1e5
    assert torch.equal(capped[:2], balanced_alpha(atlas)[:2])
    assert RunConfig().apply_overrides(["loss.focal_alpha_max=null"]).loss.focal_alpha_max is None
