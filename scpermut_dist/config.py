"""The run configuration: one typed, validated object for data, model, loss and training settings.

Defaults are the scPermut authors' tuned defaults (see shared/spec/model.md). Every key can be set in
YAML or with a dotted `--set section.key=value` override; errors name the key path and the fix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scpermut_dist.errors import UsageError
from scpermut_dist.model.schedule import Stage, cap_stages, scheme_stages


class ConfigError(UsageError):
    """A bad configuration value or key; the message names the key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_assignment=True)


class SamplingConfig(_Section):
    balance: float = Field(0.0, ge=0.0, le=1.0)  # 0 = natural class frequencies .. 1 = uniform over types
    io_batch_cells: int = Field(32768, ge=1)  # cells per read from the source (one pool)
    prefetch: int = Field(2, ge=1)  # IO pools read ahead by a background thread


class GenerateConfig(_Section):
    """A Census-shaped store to generate (`scpermut synth`) at `data.source` when it does not exist yet."""

    cells: int = Field(ge=1)
    genes: int = Field(ge=10)
    seed: int = 0
    datasets: int | None = Field(None, ge=1)


def _unlabeled_defaults() -> list[str]:
    from loaders.selection import (
        UNLABELED_DEFAULTS,  # lazily: pandas is not needed to parse a config
    )

    return list(UNLABELED_DEFAULTS)


class DataConfig(_Section):
    source: str | None = None  # h5ad file, SOMA Experiment or Census-shaped collection (--h5ad / --store)
    organism: str | None = None  # Census-shaped collections: e.g. "Homo sapiens"
    generate: GenerateConfig | None = None
    label_key: str | None = None
    batch_keys: list[str] = Field(default_factory=list)
    # Label values meaning "no label", matched case-insensitively; missing values are unlabelled too. The
    # defaults (loaders.selection.UNLABELED_DEFAULTS) always apply: a value given here or by --unlabeled-value
    # is added to them.
    unlabeled_value: str | list[str] | None = Field(default_factory=lambda: _unlabeled_defaults())
    obs_value_filter: str | None = None
    layer: str | None = None
    n_hvg: int = Field(3000, ge=1)
    genes: list[str] | None = None  # fixed gene list (feature_id or feature_name); skips HVG selection
    min_counts_per_cell: int = Field(1, ge=0)
    min_genes_per_cell: int = Field(0, ge=0)
    min_cells_per_gene: int = Field(1, ge=0)
    val_fraction: float = Field(0.2, gt=0.0, le=0.5)
    val_max_cells: int = Field(20000, ge=1)
    val_min_per_class: int = Field(10, ge=0)  # rare types keep validation cells when val_max_cells caps the rest
    val_split: Literal["cell", "batch"] = "cell"  # "batch": hold out whole batches (donors/datasets)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    @field_validator("batch_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):  # "donor+assay" or "donor"
            return [k for k in v.split("+") if k]
        return [] if v is None else v


class ModelConfig(_Section):
    hidden_sizes: list[int] = Field(default_factory=lambda: [1151, 235])
    latent_dim: int = Field(84, ge=1)
    dropout: float = Field(0.27, ge=0.0, lt=1.0)
    classifier_hidden: int = Field(64, ge=1)
    dann_hidden: int = Field(64, ge=1)
    grl_lambda: float = Field(1.0, ge=0.0)
    dann_objective: Literal["reversal", "confusion"] = "reversal"  # see module.DannHead
    input_norm: Literal["none", "standardize"] = "none"  # per-gene z-score before the encoder, see module.Encoder
    input_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # genes zeroed per cell at the encoder's input in training
    # Averaged members (train.reference.train_reference); "auto": by the number of labelled reference cells, from
    # AUTO_ENSEMBLE_TIERS, one member above them (see resolve_ensemble_size and docs/experiments.md).
    ensemble_size: int | Literal["auto"] = "auto"

    @field_validator("ensemble_size", mode="before")
    @classmethod
    def _members(cls, v: Any) -> int | str:
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, (int, str)) or not str(v).strip().isdigit() \
                or not 1 <= int(v) <= 16:
            raise ValueError(f"ensemble_size must be 'auto' or an integer from 1 to 16, got {v!r}")
        return int(v)

    @field_validator("hidden_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(h < 1 for h in v):
            raise ValueError("every hidden size must be >= 1")
        return v


# (at most this many labelled cells, members), smallest first; above the last tier: one member.
AUTO_ENSEMBLE_TIERS: tuple[tuple[int, int], ...] = ((10_000, 5), (50_000, 3))
AUTO_ENSEMBLE_MAX_CELLS = AUTO_ENSEMBLE_TIERS[-1][0]


def resolve_ensemble_size(model: ModelConfig, n_labelled: int) -> int:
    """Members to train. On small references one model's result moves with its seed by more than the gap between
    methods, and members cost minutes (five measured best on every shared set); the tiers above 10,000 cells are a
    cost choice: a member's cost grows with the reference, and on an atlas one member costs GPU hours and its
    seed matters less (more steps, more validation cells)."""
    if model.ensemble_size != "auto":
        return int(model.ensemble_size)
    return next((members for max_cells, members in AUTO_ENSEMBLE_TIERS if n_labelled <= max_cells), 1)


class LossConfig(_Section):
    clas_w: float = Field(0.307, ge=0.0)
    dann_w: float = Field(0.0187, ge=0.0)
    rec_w: float = Field(0.0131, ge=0.0)
    classifier: Literal["focal", "ce"] = "focal"
    focal_gamma: float = Field(3.0, ge=0.0)
    focal_alpha: Literal["balanced", "none"] = "balanced"
    # Cap on a class's balanced weight (mean 1); None: unbounded. 50 is above every alpha of the shared sets (<= 2)
    # and of the generated 10k atlas (<= 42), which it leaves bit for bit unchanged, and bounds atlas-rare types
    # (10 cells among 60 M of 900 types: ~6,700); measured in docs/experiments.md ("Atlas-rare alpha").
    focal_alpha_max: float | None = Field(50.0, gt=0.0)


class TrainConfig(_Section):
    scheme: Literal["scheme8", "scheme13"] = "scheme8"
    stages: list[Stage] | None = None  # explicit schedule, overrides `scheme`
    max_epochs: int | None = Field(None, ge=1)  # caps every stage (quick runs, tests)
    cells_per_epoch: int | None = Field(None, ge=1)  # redefines an epoch for every stage (atlas scale)
    lr: float = Field(9.9e-4, gt=0.0)
    dann_lr_mult: float = Field(10.0, gt=0.0)  # the DANN discriminator learns this much faster (see trainer)
    batch_size: int = Field(430, ge=2)
    seed: int = 0
    patience: int = Field(20, ge=1)
    early_stopping_monitor: Literal["balanced_accuracy", "balanced_nll"] = "balanced_accuracy"
    # Epochs within this much of the stage's best monitored value count as level; the lowest balanced NLL among them
    # is kept (see Trainer._early_stopping_update). 0: the first best epoch, the authors' rule.
    early_stopping_tolerance: float = Field(0.0, ge=0.0, lt=1.0)
    num_threads: int | None = Field(None, ge=1)  # torch threads (per member process when members run in parallel)
    # Ensemble members trained side by side in processes on a CPU (train.parallel); "auto": as many as the
    # cores allow at num_threads each (num_threads unset: cores shared evenly); 1: in turn. GPU runs: in turn.
    parallel_members: int | Literal["auto"] = "auto"
    device: str = "cpu"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    checkpoint_every_steps: int = Field(500, ge=1)  # Ray runs: mid-epoch checkpoint period (and at stage ends)

    @field_validator("parallel_members", mode="before")
    @classmethod
    def _parallel(cls, v: Any) -> Any:
        if v == "auto":
            return v
        if isinstance(v, bool) or not str(v).isdigit() or int(v) < 1:
            raise ValueError(f"parallel_members must be 'auto' or an integer >= 1, got {v!r}")
        return int(v)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("cpu", "cuda", "auto") and not v.startswith("cuda:"):
            raise ValueError("device must be 'cpu', 'cuda', 'cuda:N' or 'auto'")
        return v


class RunConfig(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @classmethod
    def validate_dict(cls, raw: dict, where: str = "config") -> "RunConfig":
        try:
            return cls.model_validate(raw or {})
        except ValidationError as exc:
            raise ConfigError(_explain(exc, where)) from None

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "RunConfig":
        raw: dict = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {p} does not exist")
            try:
                raw = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"config file {p} must hold a mapping of sections (data, model, loss, train)")
        return cls.validate_dict(apply_overrides(raw, overrides or []), where=str(path or "config"))

    def apply_overrides(self, overrides: list[str]) -> "RunConfig":
        """A new config with dotted `key=value` overrides applied (values parsed as YAML, then validated)."""
        return RunConfig.validate_dict(apply_overrides(self.model_dump(), overrides))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def resolved_stages(self) -> list[Stage]:
        """The stages this run trains: explicit `train.stages` or the named scheme, capped by max_epochs."""
        stages = self.train.stages if self.train.stages is not None else scheme_stages(self.train.scheme,
                                                                                        self.train.patience)
        if not stages:
            raise ConfigError("train.stages is empty; give at least one stage or remove it to use train.scheme")
        return cap_stages(stages, self.train.max_epochs, self.train.cells_per_epoch)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a nested dict; unknown keys are caught by validation afterwards."""
    out = _deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. loss.clas_w=0.5)")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".")]
        if not all(parts):
            raise ConfigError(f"override {item!r}: bad key path {key!r}")
        _check_path(parts)
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
                node[p] = nxt
            node = nxt
        node[parts[-1]] = parsed
    return out


def _check_path(parts: list[str]) -> None:
    """Reject unknown dotted keys early, listing the valid ones (clearer than a nested validation error)."""
    model: type[BaseModel] = RunConfig
    for depth, p in enumerate(parts):
        fields = model.model_fields
        if p not in fields:
            where = ".".join(parts[:depth]) or "top level"
            raise ConfigError(f"unknown config key {'.'.join(parts)!r}: {where} has keys {sorted(fields)}")
        ann = fields[p].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return


def _explain(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `RunConfig().to_yaml()` for all keys)"
        lines.append(f"{path}: {msg}")
    return f"invalid {where}: " + "; ".join(lines)


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d
