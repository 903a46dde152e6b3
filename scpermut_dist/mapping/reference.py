"""`Reference`: a trained model with everything needed to map a query (no training data, no Ray).

It is what a checkpoint folder loads into, for `scpermut map`, the Python API and the server alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import pandas as pd

import scpermut_dist
from loaders.normalize import Normalization
from scpermut_dist.config import RunConfig
from scpermut_dist.mapping.align import map_anndata
from scpermut_dist.mapping.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from scpermut_dist.mapping.output import MappingResult, annotate
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

    @property
    def members(self) -> list[ScPermutModule]:
        """Every ensemble member; the first gives the embedding, all of them the probabilities."""
        return [self.module, *self.extra_members]

    def map(self, adata: ad.AnnData, layer: str | None = None, where: str = "query") -> MappingResult:
        return map_anndata(self.members, self.classes, self.genes, self.normalization, adata, layer, where)

    def annotate(self, adata: ad.AnnData, result: MappingResult | None = None, layer: str | None = None) -> ad.AnnData:
        """Map `adata` (unless `result` is given) and write the outputs into its obs/obsm/uns."""
        result = result if result is not None else self.map(adata, layer)
        return annotate(adata, result, self.model_info())

    def model_info(self) -> dict:
        return {"model": self.path or "", "format_version": FORMAT_VERSION, "version": scpermut_dist.__version__,
                "label_key": self.training_data.get("label_key") or "", "n_classes": len(self.classes),
                "ensemble_size": len(self.members)}

    def save(self, path: str | Path) -> Path:
        out = save_checkpoint(self.to_checkpoint(), path)
        self.path = str(out)
        return out

    def to_checkpoint(self) -> Checkpoint:
        return Checkpoint(state_dict=self.module.state_dict(), config=self.config, genes=self.genes,
                          classes=self.classes, batches=self.batches, normalization=self.normalization,
                          dims=self.module.dims, training_data=self.training_data, metrics=self.metrics,
                          summary=self.summary, history=self.history,
                          extra_state_dicts=[m.state_dict() for m in self.extra_members])


def load_reference(path: str | Path) -> Reference:
    ck = load_checkpoint(path)
    module, *extra = [_module_from_state(ck.dims, sd) for sd in [ck.state_dict, *ck.extra_state_dicts]]
    return Reference(module, ck.config, ck.genes, list(ck.classes), list(ck.batches), ck.normalization,
                     ck.training_data, ck.metrics, ck.summary, ck.history, path=str(path), extra_members=extra)


def _module_from_state(dims: dict, state_dict: dict) -> ScPermutModule:
    module = ScPermutModule(**dims)
    module.load_state_dict(state_dict)
    return module.eval()
