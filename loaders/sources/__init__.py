"""Atlas sources: AnnData in memory, h5ad files, SOMA Experiments and Census (see `base.CellSource`)."""
from loaders.sources.anndata_source import AnnDataSource
from loaders.sources.base import CellSource, SourceSpec

__all__ = ["AnnDataSource", "CellSource", "SourceSpec"]
