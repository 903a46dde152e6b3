"""The wire format of `POST /v1/models/{name}/map`: request bodies to AnnData, results to JSON or parquet.

A request body is either the bytes of an h5ad file, read in memory (nothing is written to disk), or JSON
sparse counts: `{"genes": [...], "obs_names": [...], "indptr": [...], "indices": [...], "data": [...]}`
(CSR, cells x genes; obs_names optional). Every defect is a DataError saying what is wrong, which the
server answers with 400. The response holds, in query-cell order, `obs_names`, `labels`, `confidence`,
`unknown`, `unknown_score` and `latent`, plus the gene overlap; the same as a parquet table on request.
It also holds what a local `scpermut map` writes besides: `labels_raw` (argmax before
abstention), `probabilities` (cells x classes, columns in the order of `classes`), `neighbor_label` /
`neighbor_agreement` (references with a neighbour sample), `calibrated` and `unknown_thresholds`. These are
additions only: older clients ignore them, and clients read older servers' answers without them. In parquet
they are the columns `label_raw`, `prob_0..prob_{K-1}`, `neighbor_label`, `neighbor_agreement`, the rest in
the schema metadata `scpermut`.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from loaders.errors import DataError
from scpermut_dist.json_report import jsonable

PARQUET = "application/vnd.apache.parquet"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
META_KEYS = ("model", "n_genes_found", "n_genes_model", "genes_matched_by", "classes", "calibrated",
             "unknown_thresholds")  # the last three: absent (None) in older servers' answers
PROB_PREFIX = "prob_"  # parquet / frame columns of the class probabilities, in the order of attrs["classes"]


@dataclass
class Payload:
    """One query's mapping, as the server returns it."""

    obs_names: list[str]
    labels: np.ndarray  # str per cell
    confidence: np.ndarray  # float32 per cell
    unknown: np.ndarray  # bool per cell
    unknown_score: np.ndarray | None  # float32 per cell, when the reference computes one
    latent: np.ndarray  # cells x latent_dim float32
    meta: dict  # model, n_genes_found, n_genes_model, genes_matched_by[, classes, calibrated, unknown_thresholds]
    labels_raw: np.ndarray | None = None  # str per cell: the argmax class before abstention
    probabilities: np.ndarray | None = None  # cells x classes float32, columns in the order of meta["classes"]
    neighbor_label: np.ndarray | None = None  # str per cell, references with a neighbour sample
    neighbor_agreement: np.ndarray | None = None  # float32 per cell

    @classmethod
    def from_result(cls, result, obs_names, model: str) -> Payload:
        """From a `MappingResult`; `unknown` is all False for references that never abstain."""
        n = len(result.labels)
        unknown = getattr(result, "unknown", None)
        score = getattr(result, "unknown_score", None)
        raw = getattr(result, "labels_raw", None)
        probs = getattr(result, "probabilities", None)
        nlabel = getattr(result, "neighbor_label", None)
        nagree = getattr(result, "neighbor_agreement", None)
        thresholds = getattr(result, "thresholds", None)
        meta = {"model": model, "n_genes_found": int(result.n_genes_found),
                "n_genes_model": int(result.n_genes_model), "genes_matched_by": str(result.matched_by),
                "calibrated": bool(getattr(result, "calibrated", False))}
        if probs is not None:
            meta["classes"] = [str(c) for c in probs.columns]
        if thresholds:
            meta["unknown_thresholds"] = jsonable(thresholds)
        return cls(obs_names=[str(o) for o in obs_names], labels=np.asarray(result.labels).astype(str),
                   confidence=np.asarray(result.confidence, dtype=np.float32),
                   unknown=np.zeros(n, bool) if unknown is None else np.asarray(unknown, dtype=bool),
                   unknown_score=None if score is None else np.asarray(score, dtype=np.float32),
                   latent=np.asarray(result.latent, dtype=np.float32), meta=meta,
                   labels_raw=None if raw is None else np.asarray(raw).astype(str),
                   probabilities=None if probs is None else np.asarray(probs, dtype=np.float32).reshape(n, -1),
                   neighbor_label=None if nlabel is None else np.asarray(nlabel).astype(str),
                   neighbor_agreement=None if nagree is None else np.asarray(nagree, dtype=np.float32))

    def to_json(self) -> bytes:
        out = {"obs_names": self.obs_names, "labels": self.labels.tolist(), "confidence": self.confidence.tolist(),
               "unknown": self.unknown.tolist(), "latent": self.latent.tolist(), **self.meta}
        for key in ("unknown_score", "labels_raw", "probabilities", "neighbor_label", "neighbor_agreement"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value.tolist()
        return json.dumps(out, allow_nan=False).encode()

    def to_parquet(self) -> bytes:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(self.to_frame(), preserve_index=True)
        table = table.replace_schema_metadata({**table.schema.metadata, b"scpermut": json.dumps(self.meta).encode()})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue()

    def to_frame(self) -> pd.DataFrame:
        """One row per cell (index obs_name): label, confidence, unknown[, unknown_score], latent_0.. ."""
        cols = {"label": self.labels, "confidence": self.confidence, "unknown": self.unknown}
        if self.unknown_score is not None:
            cols["unknown_score"] = self.unknown_score
        cols.update({f"latent_{k}": self.latent[:, k] for k in range(self.latent.shape[1])})
        if self.labels_raw is not None:
            cols["label_raw"] = self.labels_raw
        if self.probabilities is not None:
            cols.update({f"{PROB_PREFIX}{k}": self.probabilities[:, k] for k in range(self.probabilities.shape[1])})
        if self.neighbor_label is not None:
            cols["neighbor_label"] = self.neighbor_label
            cols["neighbor_agreement"] = self.neighbor_agreement
        frame = pd.DataFrame(cols, index=pd.Index(self.obs_names, name="obs_name"))
        frame.attrs.update(self.meta)
        return frame


def frame_from_json(doc: dict) -> pd.DataFrame:
    """The client's view of a JSON response: `Payload.to_frame()`'s layout."""
    n = len(doc["obs_names"])
    latent = np.asarray(doc["latent"], dtype=np.float32).reshape(n, -1)

    def optional(key, dtype):
        value = doc.get(key)
        return None if value is None else np.asarray(value, dtype=dtype)

    probs = optional("probabilities", np.float32)
    return Payload(list(doc["obs_names"]), np.asarray(doc["labels"], dtype=str),
                   np.asarray(doc["confidence"], dtype=np.float32), np.asarray(doc["unknown"], dtype=bool),
                   optional("unknown_score", np.float32), latent, {k: doc.get(k) for k in META_KEYS},
                   labels_raw=optional("labels_raw", str),
                   probabilities=None if probs is None else probs.reshape(n, -1),
                   neighbor_label=optional("neighbor_label", str),
                   neighbor_agreement=optional("neighbor_agreement", np.float32)).to_frame()


def frame_from_parquet(data: bytes) -> pd.DataFrame:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    frame = table.to_pandas()
    frame.attrs.update(json.loads((table.schema.metadata or {}).get(b"scpermut", b"{}")))
    return frame


def decode_query(body: bytes, content_type: str | None = None, layer: str | None = None,
                 max_decoded_bytes: int | None = None) -> ad.AnnData:
    """The query a request body holds: an h5ad file's bytes or JSON sparse counts (see the module doc)."""
    if not body:
        raise DataError("empty request body: send the bytes of an h5ad file or JSON sparse counts")
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == "application/json" or (not body.startswith(HDF5_SIGNATURE) and body.lstrip()[:1] == b"{"):
        if layer:
            raise DataError("layer= applies to h5ad bodies; JSON bodies carry the raw counts themselves")
        return decode_json(body)
    return decode_h5ad(body, layer, max_decoded_bytes)


def decode_h5ad(body: bytes, layer: str | None = None, max_decoded_bytes: int | None = None) -> ad.AnnData:
    """X (or `layer`, or `.raw` for layer "raw"), obs names and var of an in-memory h5ad; other elements (uns,
    obsm, ...) are not read."""
    import h5py

    from loaders.sources.h5ad import h5ad_counts_matrix

    if not body.startswith(HDF5_SIGNATURE):
        raise DataError("the body is neither an h5ad (HDF5) file nor JSON: send the h5ad file's bytes "
                        "(Content-Type: application/x-hdf5) or JSON sparse counts (application/json)")
    try:
        with h5py.File(io.BytesIO(body), "r") as f:
            for key in ("obs", "var"):
                if key not in f:
                    raise DataError(f"the h5ad has no {key!r} group: is it an AnnData file?")
            matrix, var_node = h5ad_counts_matrix(f, layer, "the h5ad")
            elements = [matrix, f["obs"], var_node]
            _refuse_outside_references(elements)
            if max_decoded_bytes is not None:
                size = sum(_decoded_bytes(e) for e in elements)
                if size > max_decoded_bytes:
                    raise DataError(f"the h5ad decompresses to {size / 2**20:.0f} MiB, above the server's limit "
                                    f"of {max_decoded_bytes / 2**20:.0f} MiB: split the query")
            x = ad.io.read_elem(matrix)
            obs = ad.io.read_elem(f["obs"])
            var = ad.io.read_elem(var_node)
    except DataError:
        raise
    except Exception as exc:  # h5py/anndata raise many types for a malformed file
        raise DataError(f"the h5ad body could not be read as AnnData ({type(exc).__name__}: {exc})") from exc
    return _anndata(x, obs.index, var, "the h5ad")


def _refuse_outside_references(elements) -> None:
    """External links, external storage and virtual datasets would make the server read its own files."""
    import h5py

    found: list[str] = []  # h5py's visit callbacks must not raise: collect, then refuse

    def check(name, obj):
        if isinstance(obj, h5py.Dataset) and (obj.is_virtual or obj.external):
            found.append(f"the h5ad's {obj.name} refers to data outside the file")

    for elem in elements:
        def link(name, info, elem=elem):
            if isinstance(elem.get(name, getlink=True), h5py.ExternalLink):
                found.append(f"the h5ad's {elem.name}/{name} is an external link")

        if isinstance(elem, h5py.Group):
            elem.visititems_links(link)
            if not found:
                elem.visititems(check)
        else:
            check(elem.name, elem)
        if found:
            raise DataError(f"{found[0]}; send a self-contained h5ad")


def _decoded_bytes(elem) -> int:
    import h5py

    if isinstance(elem, h5py.Dataset):
        return int(elem.size) * elem.dtype.itemsize
    sizes = []
    elem.visititems(lambda _, o: sizes.append(int(o.size) * o.dtype.itemsize) if isinstance(o, h5py.Dataset) else None)
    return sum(sizes)


def decode_json(body: bytes) -> ad.AnnData:
    """JSON sparse counts (CSR) -> AnnData, checking every field's type, length and range."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"the JSON body could not be parsed ({exc})") from exc
    if not isinstance(doc, dict):
        raise DataError("the JSON body must be an object with genes, indptr, indices, data (and obs_names)")
    missing = [k for k in ("genes", "indptr", "indices", "data") if k not in doc]
    if missing:
        raise DataError(f"the JSON body lacks {missing}: send genes, obs_names, indptr, indices, data "
                        "(cells x genes CSR)")
    genes = _strings(doc["genes"], "genes")
    indptr = _numbers(doc["indptr"], "indptr", np.int64)
    indices = _numbers(doc["indices"], "indices", np.int64)
    data = _numbers(doc["data"], "data", np.float64)
    n = len(indptr) - 1
    if n < 0 or indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != len(indices):
        raise DataError("indptr must start at 0, never decrease and end at len(indices) (CSR row pointers, "
                        "one more than the number of cells)")
    if len(data) != len(indices):
        raise DataError(f"data has {len(data)} values but indices {len(indices)}: they must pair up")
    if len(indices) and (indices.min() < 0 or indices.max() >= len(genes)):
        raise DataError(f"indices must be gene positions in [0, {len(genes)}) (the length of genes)")
    if not np.all(np.isfinite(data)):
        raise DataError("data holds NaN or infinite values; send raw counts")
    obs_names = _strings(doc["obs_names"], "obs_names") if doc.get("obs_names") is not None \
        else [str(i) for i in range(n)]
    if len(obs_names) != n:
        raise DataError(f"obs_names has {len(obs_names)} names but indptr describes {n} cells")
    x = sp.csr_matrix((data.astype(np.float32), indices.astype(np.int32), indptr), shape=(n, len(genes)))
    x.sum_duplicates()
    return _anndata(x, pd.Index(obs_names), pd.DataFrame(index=pd.Index(genes)), "the JSON body")


def _strings(value, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{name} must be a list of strings")
    return value


def _numbers(value, name: str, dtype) -> np.ndarray:
    arr = np.asarray(value) if isinstance(value, list) else None
    if arr is None or arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iuf"):
        raise DataError(f"{name} must be a flat list of numbers")
    if dtype is np.int64:
        if arr.dtype.kind == "f" and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise DataError(f"{name} must hold integers")
        if arr.size and np.abs(arr).max() >= 2**62:
            raise DataError(f"{name} holds values out of range")
        return arr.astype(np.int64)
    return arr.astype(np.float64)


def _anndata(x, obs_names: pd.Index, var: pd.DataFrame, where: str) -> ad.AnnData:
    if x.ndim != 2 or x.shape != (len(obs_names), len(var)):
        raise DataError(f"{where}: the counts are {x.shape} but there are {len(obs_names)} cells and {len(var)} genes")
    if not (sp.issparse(x) or isinstance(x, np.ndarray)) or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{where}: the counts must be a numeric matrix (dense or CSR/CSC), not {type(x).__name__}")
    obs = pd.DataFrame(index=obs_names.astype(str))
    var = var.copy()
    var.index = var.index.astype(str)
    return ad.AnnData(X=x, obs=obs, var=var)
