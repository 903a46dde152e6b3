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
    """An in-memory h5ad of `adata`'s counts (X or `layer`, sent as X), obs names and var."""
    import h5py

    if layer is not None and layer not in adata.layers:
        raise UsageError(f"no layer {layer!r}; layers are {list(adata.layers)}")
    x = adata.layers[layer] if layer else adata.X
    slim = ad.AnnData(X=x, obs=pd.DataFrame(index=adata.obs_names.astype(str)), var=adata.var)
    sink = io.BytesIO()
    with h5py.File(sink, "w") as f:
        ad.io.write_elem(f, "/", slim)
    return sink.getvalue()


def annotate_from_frame(adata: ad.AnnData, frame: pd.DataFrame, server: str, model: str) -> ad.AnnData:
    """Write a server's answer into `adata` as `scpermut map` does (obs labels/confidence/unknown, latent)."""
    if list(frame.index.astype(str)) != list(adata.obs_names.astype(str)):
        raise UsageError("the server's answer is not in the query's cell order")
    adata.obs["scpermut_label"] = pd.Categorical(frame["label"].to_numpy())
    adata.obs["scpermut_confidence"] = frame["confidence"].to_numpy(np.float32)
    adata.obs["scpermut_unknown"] = frame["unknown"].to_numpy(bool)
    if "unknown_score" in frame:
        adata.obs["scpermut_unknown_score"] = frame["unknown_score"].to_numpy(np.float32)
    latent = [c for c in frame.columns if c.startswith("latent_")]
    adata.obsm["X_scpermut"] = frame[latent].to_numpy(np.float32)
    adata.uns["scpermut"] = {"model": model, "server": server,
                             **{k: v for k, v in frame.attrs.items() if v is not None and k != "model"}}
    return adata
