"""CELLxGENE Census as a `CellSource`: opened through the real `cellxgene_census.open_soma`, then
read with the SOMA Experiment logic (`soma.SomaExperimentSource`) on `census_data/<organism>`.

`uri` points at a local (or s3) Census-shaped Collection; without it `census_version` is resolved
by cellxgene_census (network). The census handle is closed with the source.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from loaders.errors import DataError
from loaders.selection import CellSelection
from loaders.sources.soma import SomaExperimentSource


def organism_key(organism: str) -> str:
    """'Homo sapiens' -> 'homo_sapiens' (the key of census_data)."""
    return organism.strip().lower().replace(" ", "_")


@dataclass(frozen=True)
class CensusSpec:
    """Picklable recipe for a Census source."""

    census_version: str | None = "stable"
    uri: str | None = None
    organism: str = "Homo sapiens"
    selection: CellSelection = field(default_factory=CellSelection)
    measurement: str = "RNA"
    layer: str = "raw"
    tiledb_config: dict | None = None
    init_buffer_bytes: int | None = None

    @property
    def where(self) -> str:
        return f"Census {self.uri}" if self.uri else f"Census version {self.census_version!r}"

    def open(self, joinids=None) -> SomaExperimentSource:
        """`joinids`: the selection's storage rows, already known (a training rank's counts reader: obs unread)."""
        census = self._open_census()
        try:
            exp = self._experiment(census)
            src = SomaExperimentSource(exp, self.selection, self.measurement, self.layer,
                                       where=f"{self.where} [{organism_key(self.organism)}]", owned=(exp, census),
                                       joinids=joinids)
        except BaseException:
            census.close()
            raise
        src.spec = self
        return src

    def _open_census(self):
        import cellxgene_census

        from loaders.sources.soma import tiledb_config_with_defaults

        cfg = tiledb_config_with_defaults(self.tiledb_config, self.init_buffer_bytes)
        try:
            return cellxgene_census.open_soma(census_version=self.census_version, uri=self.uri, tiledb_config=cfg)
        except Exception as exc:  # cellxgene_census/tiledbsoma raise many types (missing, wrong type, network)
            hint = ""
            if self.uri:
                from loaders.sources.soma import open_soma_object

                obj = open_soma_object(self.uri)  # raises DataError when it is not SOMA at all
                kind = type(obj).__name__
                obj.close()
                hint = (f" It is a SOMA {kind}, not a Census Collection"
                        + ("; open a bare Experiment with SomaExperimentSpec(uri=...)." if kind == "Experiment" else "."))
            raise DataError(f"{self.where}: could not open as a Census ({type(exc).__name__}: {exc}).{hint}") from exc

    def _experiment(self, census):
        if "census_data" not in census:
            raise DataError(f"{self.where}: a SOMA Collection without 'census_data' (keys: {list(census.keys())}); "
                            "not a Census. Open a bare Experiment with SomaExperimentSpec(uri=...).")
        key = organism_key(self.organism)
        data = census["census_data"]
        if key not in data:
            raise DataError(f"{self.where}: no organism {key!r} in census_data; available: {list(data.keys())}.")
        return data[key]
