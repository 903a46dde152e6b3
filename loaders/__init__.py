"""The data layer of scpermut-dist: atlas sources, ingest, sampling plans and streaming datasets.

Importable alone: nothing here imports `scpermut_dist`, and Ray stays out of it.
"""
from loaders.batch import PairedBatch
from loaders.errors import DataError
from loaders.normalize import Normalization
from loaders.selection import CellSelection
from loaders.validate import check_raw_counts

__all__ = ["CellSelection", "DataError", "Normalization", "PairedBatch", "check_raw_counts"]
