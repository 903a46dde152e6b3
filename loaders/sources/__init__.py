"""Atlas sources: AnnData in memory, h5ad files, SOMA Experiments and Census (see `base.CellSource`)."""
from __future__ import annotations

from pathlib import Path

from loaders.errors import DataError
from loaders.selection import CellSelection
from loaders.sources.anndata_source import AnnDataSource
from loaders.sources.base import CellSource, SourceSpec
from loaders.sources.census import CensusSpec
from loaders.sources.h5ad import H5adSpec
from loaders.sources.soma import SomaExperimentSource, SomaExperimentSpec

__all__ = ["AnnDataSource", "CellSource", "SourceSpec", "CensusSpec", "H5adSpec", "SomaExperimentSource",
           "SomaExperimentSpec", "spec_from_uri"]


def spec_from_uri(uri: str, selection: CellSelection = CellSelection(), **kw) -> SourceSpec:
    """The right spec for a path/URI: an .h5ad file, a Census-shaped Collection or a SOMA Experiment.

    `kw` goes to the spec (e.g. `layer`, `organism`, `tiledb_config`); None values mean the spec's
    default (h5ad: X, SOMA: "raw"), and a non-None option the spec does not take is a TypeError.
    """
    uri = str(uri)
    path = Path(uri)
    if path.is_file():
        if uri.endswith(".h5ad") or _is_hdf5(path):
            return H5adSpec(uri, selection, **_only(kw, H5adSpec))
        raise DataError(f"{uri}: is not an h5ad file nor a SOMA Experiment/Census collection. "
                        "Give an .h5ad file with raw counts or the directory/URI of a SOMA store.")
    import tiledbsoma

    from loaders.sources.soma import open_soma_object

    try:
        obj = open_soma_object(uri)
    except DataError as exc:
        raise DataError(f"{uri}: is not an h5ad file nor a SOMA Experiment/Census collection "
                        f"(does it exist?). Details: {exc}") from exc
    try:
        if isinstance(obj, tiledbsoma.Experiment):
            return SomaExperimentSpec(uri, selection, **_only(kw, SomaExperimentSpec))
        if isinstance(obj, tiledbsoma.Collection) and "census_data" in obj:
            return CensusSpec(census_version=None, uri=uri, selection=selection, **_only(kw, CensusSpec))
        raise DataError(f"{uri}: is a SOMA {type(obj).__name__}, but not an h5ad file nor a SOMA Experiment/Census "
                        "collection (a Census collection holds 'census_data').")
    finally:
        obj.close()


def _is_hdf5(path: Path) -> bool:
    import h5py

    return h5py.is_hdf5(path)


def _only(kw: dict, cls) -> dict:
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    extra = [k for k, v in kw.items() if k not in names and v is not None]
    if extra:
        raise TypeError(f"{cls.__name__} takes no option(s) {extra}.")
    return {k: v for k, v in kw.items() if k in names and v is not None}  # None = that spec's default
