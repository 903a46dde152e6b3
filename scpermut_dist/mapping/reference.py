"""`Reference`: a trained model with everything needed to map a query (no training data, no Ray).

It is what a checkpoint folder loads into, for `scpermut map`, the Python API and the server alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import scpermut_dist
from loaders.normalize import Normalization
from scpermut_dist.config import RunConfig
from scpermut_dist.mapping.align import MIN_GENE_FRACTION, map_anndata
from scpermut_dist.mapping.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from scpermut_dist.mapping.output import MappingResult, annotate
from scpermut_dist.mapping.predict import Predictor
from scpermut_dist.model.module import ScPermutModule


@dataclass
class Reference:
    """A trained model with everything needed to map a query (no training data, no Ray)."""

    module: ScPermutModule
    config: RunConfig
    genes: pd.DataFrame
    classes: list[str]
    batches: list[str]
    normalization: Normalization
    training_data: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    path: str | None = None
    extra_members: list[ScPermutModule] = field(default_factory=list)  # model.ensemble_size > 1
    extras: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # checkpoint extras (<name>.npz)

    @property
    def members(self) -> list[ScPermutModule]:
        """Every ensemble member; the first gives the embedding, all of them the probabilities."""
        return [self.module, *self.extra_members]

    def map(self, adata: ad.AnnData, layer: str | None = None, where: str = "query", gene_key: str | None = None,
            min_gene_fraction: float = MIN_GENE_FRACTION, unknown_confidence: float | None = None,
            unknown_quantile: float | None = None) -> MappingResult:
        """`gene_key`: the var column naming the query's genes (default: var_names and known columns, per gene);
        `min_gene_fraction`: the share of the model's genes the query must have; `unknown_confidence` /
        `unknown_quantile`: override the abstention thresholds fitted at training (see mapping.unknown)."""
        return map_anndata(self.predictor(unknown_confidence, unknown_quantile), self.classes, self.genes,
                           self.normalization, adata, layer, where, gene_key=gene_key,
                           min_gene_fraction=min_gene_fraction)

    def predictor(self, unknown_confidence: float | None = None, unknown_quantile: float | None = None) -> Predictor:
        """What maps normalised cells: calibrated members, reference neighbours, the unknown rule."""
        return Predictor.from_reference(self, unknown_confidence, unknown_quantile)

    def annotate(self, adata: ad.AnnData, result: MappingResult | None = None, layer: str | None = None) -> ad.AnnData:
        """Map `adata` (unless `result` is given) and write the outputs into its obs/obsm/uns."""
        result = result if result is not None else self.map(adata, layer)
        return annotate(adata, result, self.model_info())

    def model_info(self) -> dict:
        return {"model": self.path or "", "format_version": FORMAT_VERSION, "version": scpermut_dist.__version__,
                "label_key": self.training_data.get("label_key") or "", "n_classes": len(self.classes),
                "ensemble_size": len(self.members),
                **({"calibration": self.metrics["calibration"]} if "calibration" in self.metrics else {})}

    def save(self, path: str | Path) -> Path:
        out = save_checkpoint(self.to_checkpoint(), path)
        self.path = str(out)
        return out

    def to_checkpoint(self) -> Checkpoint:
        return Checkpoint(state_dict=self.module.state_dict(), config=self.config, genes=self.genes,
                          classes=self.classes, batches=self.batches, normalization=self.normalization,
                          dims=self.module.dims, training_data=self.training_data, metrics=self.metrics,
                          summary=self.summary, history=self.history,
                          extra_state_dicts=[m.state_dict() for m in self.extra_members], extras=self.extras)


def load_reference(path: str | Path) -> Reference:
    ck = load_checkpoint(path)
    module, *extra = [_module_from_state(ck.dims, sd) for sd in [ck.state_dict, *ck.extra_state_dicts]]
    return Reference(module, ck.config, ck.genes, list(ck.classes), list(ck.batches), ck.normalization,
                     ck.training_data, ck.metrics, ck.summary, ck.history, path=str(path), extra_members=extra,
                     extras=ck.extras)


def _module_from_state(dims: dict, state_dict: dict) -> ScPermutModule:
    module = ScPermutModule(**dims)
    module.load_state_dict(state_dict)
    return module.eval()
