"""RunConfig: authors' defaults, dotted overrides with type coercion, YAML round trip, clear errors."""
from __future__ import annotations

import pytest

from scpermut_dist.config import ConfigError, RunConfig
from scpermut_dist.errors import UsageError


def test_defaults_are_the_authors_tuned_defaults():
    c = RunConfig()
    assert c.model.hidden_sizes == [1151, 235] and c.model.latent_dim == 84 and c.model.dropout == 0.27
    assert (c.loss.clas_w, c.loss.dann_w, c.loss.rec_w) == (0.307, 0.0187, 0.0131)
    assert c.loss.focal_gamma == 3.0 and c.train.lr == 9.9e-4 and c.train.batch_size == 430
    assert c.data.n_hvg == 3000 and c.data.val_fraction == 0.2
    stages = c.resolved_stages()
    assert [s.name for s in stages] == ["warmup_dann", "full_model", "classifier_branch"]
    warm, full, branch = stages
    assert warm.epochs == 36 and warm.cells == "all" and warm.permutation and "classifier" not in warm.trains
    assert set(warm.losses) == {"dann", "rec"}
    assert full.epochs == 100 and not full.permutation and full.early_stopping == 20 and full.cells == "labelled"
    assert branch.trains == ["classifier"] and branch.losses == ["clas"] and branch.epochs == 50


def test_scheme13_is_full_model_with_permutation_then_classifier_branch():
    stages = RunConfig().apply_overrides(["train.scheme=scheme13"]).resolved_stages()
    assert [s.name for s in stages] == ["full_model", "classifier_branch"]
    assert stages[0].permutation and not stages[1].permutation


def test_overrides_coerce_types_and_yaml_round_trips(tmp_path):
    c = RunConfig().apply_overrides(["loss.clas_w=0.5", "train.seed=7", "data.label_key=123",
                                     "data.batch_keys=donor+assay", "model.hidden_sizes=[32, 16]",
                                     "train.max_epochs=2", "train.cells_per_epoch=1000"])
    assert c.loss.clas_w == 0.5 and c.train.seed == 7 and c.data.label_key == "123"
    assert c.data.batch_keys == ["donor", "assay"] and c.model.hidden_sizes == [32, 16]
    assert all(s.epochs == 2 and s.cells_per_epoch == 1000 for s in c.resolved_stages())
    path = tmp_path / "c.yaml"
    path.write_text(c.to_yaml())
    again = RunConfig.from_yaml(path, overrides=["loss.rec_w=1"])
    assert again.loss.clas_w == 0.5 and again.loss.rec_w == 1.0 and again.model.hidden_sizes == [32, 16]


def test_explicit_stages_override_the_scheme():
    c = RunConfig().apply_overrides(
        ["train.stages=[{name: rec_only, cells: all, trains: [encoder, decoder], losses: [rec], epochs: 3}]"])
    (s,) = c.resolved_stages()
    assert s.name == "rec_only" and s.epochs == 3 and s.used_modules == ["encoder", "decoder"]


@pytest.mark.parametrize("override, key", [
    ("loss.clas_w=-1", "loss.clas_w"),
    ("loss.foo=1", "loss.foo"),
    ("foo.bar=1", "foo.bar"),
    ("data.val_fraction=0.8", "data.val_fraction"),
    ("data.val_fraction=0", "data.val_fraction"),
    ("train.scheme=scheme99", "train.scheme"),
    ("train.early_stopping_tolerance=-0.01", "train.early_stopping_tolerance"),
    ("train.batch_size=abc", "train.batch_size"),
    ("train.stages=[{name: a, trains: [encoder, foo], losses: [rec], epochs: 1}]", "train.stages.0.trains.1"),
    ("train.stages=[{name: a, trains: [encoder], losses: [bogus], epochs: 1}]", "train.stages.0.losses.0"),
    ("train.stages=[{name: a, trains: [encoder, decoder], losses: [clas], epochs: 1}]", "train.stages.0"),
    ("loss.clas_w", "loss.clas_w"),
])
def test_bad_values_raise_usage_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError) as exc:
        RunConfig().apply_overrides([override])
    assert isinstance(exc.value, UsageError)
    assert key in str(exc.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: {clas_w: [1, 2]}\n")
    with pytest.raises(ConfigError, match="loss.clas_w"):
        RunConfig.from_yaml(bad)
    bad.write_text("modle: {latent_dim: 3}\n")
    with pytest.raises(ConfigError, match="modle"):
        RunConfig.from_yaml(bad)
