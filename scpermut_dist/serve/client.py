"""A small client for `scpermut serve`: list the models, map an AnnData (or h5ad file) on one of them.

    client = ScpermutClient("http://127.0.0.1:8000", token)
    client.models()                      # model cards
    frame = client.map("pbmc", adata)    # DataFrame, one row per cell in query order

No Ray needed: plain HTTP (requests). The query is sent as an in-memory h5ad holding only its counts,
obs names and var; nothing is written to disk.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from urllib.parse import quote

import anndata as ad
import numpy as np
import pandas as pd

from scpermut_dist.errors import UsageError
from scpermut_dist.serve.auth import TOKEN_ENV
from scpermut_dist.serve.codec import PARQUET, frame_from_json, frame_from_parquet


class ServerError(UsageError):
    """The server refused a request (status 4xx/5xx); the message is its reason."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"server answered {status}: {detail}")
        self.status, self.detail = status, detail


class ScpermutClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0):
        import requests

        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        self.timeout = timeout
        self.session = requests.Session()
        if self.token:
            self.session.headers["Authorization"] = f"Bearer {self.token}"

    def health(self) -> dict:
        return self._request("GET", "/healthz").json()

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models").json()["models"]

    def map(self, name: str, query: ad.AnnData | str | Path | bytes, layer: str | None = None,
            as_frame: bool = True, parquet: bool = False) -> pd.DataFrame | dict:
        """Map `query` (AnnData, h5ad path or h5ad bytes) on model `name`.

        A DataFrame indexed by obs name (label, confidence, unknown[, unknown_score], latent_0..; the gene
        overlap in `.attrs`), or with as_frame=False the server's JSON document.
        """
        if isinstance(query, ad.AnnData):
            body = h5ad_bytes(query, layer)
            layer = None  # the counts are sent as X
        elif isinstance(query, (str, Path)):
            p = Path(query)
            if not p.is_file():
                raise UsageError(f"query {p}: file not found")
            body = p.read_bytes()
        else:
            body = bytes(query)
        params = {"layer": layer} if layer else {}
        headers = {"Content-Type": "application/x-hdf5"}
        if parquet:
            params["format"] = "parquet"
            headers["Accept"] = PARQUET
        resp = self._request("POST", f"/v1/models/{quote(name, safe='')}/map", data=body, params=params,
                             headers=headers)
        if parquet:
            frame = frame_from_parquet(resp.content)
            return frame if as_frame else {"frame": frame}
        doc = resp.json()
        return frame_from_json(doc) if as_frame else doc

    def _request(self, method: str, path: str, **kwargs):
        import requests

        try:
            resp = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise UsageError(f"cannot reach the scpermut server at {self.url} ({type(exc).__name__}: {exc})") from exc
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise ServerError(resp.status_code, str(detail))
        return resp


def h5ad_bytes(adata: ad.AnnData, layer: str | None = None) -> bytes:
    """An in-memory h5ad of `adata`'s counts (X, `layer` or `.raw`, sent as X), obs names and their var."""
    import h5py

    from loaders.errors import DataError
    from loaders.sources.anndata_source import counts_and_var

    try:
        x, var = counts_and_var(adata, layer, "query")
    except DataError as exc:
        raise UsageError(str(exc)) from exc
    slim = ad.AnnData(X=x, obs=pd.DataFrame(index=adata.obs_names.astype(str)), var=var)
    sink = io.BytesIO()
    with h5py.File(sink, "w") as f:
        ad.io.write_elem(f, "/", slim)
    return sink.getvalue()


def annotate_from_frame(adata: ad.AnnData, frame: pd.DataFrame, server: str, model: str) -> ad.AnnData:
    """Write a server's answer into `adata` where a local `scpermut map` writes it (mapping/output.py `annotate`).

    Every `scpermut_*` obs column / obsm key, `obsm["X_scpermut"]` and `uns["scpermut"]` already in `adata`
    (an earlier mapping, perhaps by another model) is removed first, so `adata` holds only this answer.

    From a server that sends them (class probabilities and `classes`): obs `scpermut_label`,
    `scpermut_confidence`, `scpermut_label_raw`, `scpermut_unknown`, `scpermut_unknown_score`,
    `scpermut_neighbor_label` / `scpermut_neighbor_agreement` (references with a neighbour sample), obsm
    `X_scpermut` and `scpermut_probabilities`, uns `scpermut` with `classes`, the gene overlap, the confidence
    kind and the unknown thresholds, as a local map writes them. Differences from a local map: uns
    `scpermut` names the model by its server name and holds `server`, but not the checkpoint's path,
    format/package version, label key, ensemble size or calibration (the model card, GET /v1/models, has
    them). A reference without an unknown rule gets no `scpermut_unknown` column, as locally.
    An older server's answer (no probabilities) gives only the label, confidence, unknown flag and score,
    and the latent, with no `classes` in uns.
    """
    from scpermut_dist.mapping.output import LATENT_KEY, UNS_KEY, MappingResult, annotate, clear_annotations
    from scpermut_dist.serve.codec import PROB_PREFIX

    if list(frame.index.astype(str)) != list(adata.obs_names.astype(str)):
        raise UsageError("the server's answer is not in the query's cell order")
    attrs = frame.attrs
    latent = frame[[c for c in frame.columns if c.startswith("latent_")]].to_numpy(np.float32)
    classes = [str(c) for c in (attrs.get("classes") or [])]
    prob_cols = [f"{PROB_PREFIX}{k}" for k in range(len(classes))]
    clear_annotations(adata)
    if classes and all(c in frame.columns for c in prob_cols):
        def column(name, dtype):
            return frame[name].to_numpy(dtype) if name in frame.columns else None

        result = MappingResult(
            labels=frame["label"].to_numpy(str), confidence=frame["confidence"].to_numpy(np.float32),
            probabilities=pd.DataFrame(frame[prob_cols].to_numpy(np.float32), index=frame.index, columns=classes),
            latent=latent, n_genes_found=int(attrs.get("n_genes_found") or 0),
            n_genes_model=int(attrs.get("n_genes_model") or 0), matched_by=str(attrs.get("genes_matched_by") or ""),
            labels_raw=column("label_raw", str), unknown=frame["unknown"].to_numpy(bool),
            unknown_score=column("unknown_score", np.float32), neighbor_label=column("neighbor_label", str),
            neighbor_agreement=column("neighbor_agreement", np.float32),
            thresholds=attrs.get("unknown_thresholds") or None, calibrated=bool(attrs.get("calibrated")))
        if result.unknown_score is None:  # no unknown rule: nothing abstains (annotate writes both or neither)
            result.unknown = None
        annotate(adata, result, {"model": model, "server": server})
        return adata
    # an older server: only what it sends
    adata.obs["scpermut_label"] = pd.Categorical(frame["label"].to_numpy())
    adata.obs["scpermut_confidence"] = frame["confidence"].to_numpy(np.float32)
    adata.obs["scpermut_unknown"] = frame["unknown"].to_numpy(bool)
    if "unknown_score" in frame:
        adata.obs["scpermut_unknown_score"] = frame["unknown_score"].to_numpy(np.float32)
    adata.obsm[LATENT_KEY] = latent
    adata.uns[UNS_KEY] = {"model": model, "server": server,
                          **{k: v for k, v in attrs.items() if v is not None and k != "model"}}
    return adata
