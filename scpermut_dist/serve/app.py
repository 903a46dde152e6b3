"""The Ray Serve application of `scpermut serve`: a gateway (HTTP, auth, limits) and a multiplexed mapper.

- `Gateway` (FastAPI ingress) checks the bearer token, the model name against the hosted set and the
  upload size, decodes the body in memory (serve/codec.py), and answers 400/401/404/413 itself.
- `Mapper` loads references on demand with `@serve.multiplexed` (an LRU of a few per replica; Serve
  routes a model's requests to the replicas that hold it) and maps queries for the same model in
  batches with `@serve.batch` (queries with the same genes are stacked into one forward pass).

`build_app(args)` is the application builder shared by the CLI and a RayService's serveConfigV2
(`import_path: scpermut_dist.serve.app:build_app`). Nothing is written under the models folder or
anywhere else: request bodies live in memory only.
"""

import asyncio
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

from loaders.errors import DataError
from scpermut_dist.errors import UsageError
from scpermut_dist.serve.auth import authorized, read_token, token_digest
from scpermut_dist.serve.catalog import discover_models, model_card
from scpermut_dist.serve.codec import PARQUET, Payload, decode_query

log = logging.getLogger(__name__)
APP_NAME = "scpermut"
DEFAULT_MAX_UPLOAD_MB = 256.0
DECODED_PER_UPLOADED = 16  # an h5ad may be compressed; what it decompresses to is capped at this multiple
MODELS_PER_REPLICA = 4  # references cached per mapper replica (LRU)
BATCH_CELLS = 16384  # queries for one model are batched up to this many cells; larger ones run alone
BATCH_WAIT_S = 0.01  # how long a first query waits for others (latency is ~0.1-1 s per request anyway)

http = FastAPI(title="scpermut", docs_url=None, redoc_url=None, openapi_url=None)


# Helpers come before the deployments: Ray Serve serialises a deployment's class when it is declared,
# so names defined after it would be missing in the replicas.
def map_queries(ref, queries: list[ad.AnnData], name: str) -> list[Payload | dict]:
    """Map each query; queries with identical genes go through the model together, a refused one alone."""
    out: list[Payload | dict | None] = [None] * len(queries)
    groups: list[list[int]] = []
    for i, q in enumerate(queries):
        for g in groups:
            if q.var.equals(queries[g[0]].var):
                g.append(i)
                break
        else:
            groups.append([i])
    for g in groups:
        if len(g) > 1:
            try:
                stacked = ad.AnnData(X=sp.vstack([sp.csr_matrix(queries[i].X) for i in g], format="csr"),
                                     var=queries[g[0]].var)
                stacked.obs_names = [str(k) for k in range(stacked.n_obs)]
                result = ref.map(stacked, where="query")
                bounds = np.cumsum([0] + [queries[i].n_obs for i in g])
                for i, a, b in zip(g, bounds[:-1], bounds[1:]):
                    out[i] = Payload.from_result(_rows(result, a, b), queries[i].obs_names, name)
                continue
            except (DataError, UsageError):
                pass  # one bad query in the group: map them one by one so only it is refused
        for i in g:
            try:
                out[i] = Payload.from_result(ref.map(queries[i], where="query"), queries[i].obs_names, name)
            except (DataError, UsageError) as exc:
                out[i] = {"error": str(exc)}
    return out


def _rows(result, a: int, b: int):
    """Cells a..b of a MappingResult (whatever per-cell fields it has)."""
    from dataclasses import fields, replace

    per_cell = {}
    for f in fields(result):
        value = getattr(result, f.name)
        if hasattr(value, "iloc"):
            per_cell[f.name] = value.iloc[a:b]
        elif isinstance(value, np.ndarray) and value.ndim >= 1 and len(value) == len(result.labels):
            per_cell[f.name] = value[a:b]
    return replace(result, **per_cell)


def _too_large(size: int, limit: int) -> HTTPException:
    return HTTPException(413, f"upload of {size / 2**20:.1f} MiB or more exceeds the server's limit of "
                              f"{limit / 2**20:.1f} MiB (--max-upload-mb): split the query")


def _wants_parquet(fmt: str | None, accept: str) -> bool:
    if fmt is not None:
        if fmt not in ("json", "parquet"):
            raise HTTPException(400, f"format={fmt!r}: use json or parquet")
        return fmt == "parquet"
    return PARQUET in accept.lower()


@http.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:  # never a traceback to a client
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


@serve.deployment(name="mapper", max_ongoing_requests=32)
class Mapper:
    """Maps decoded queries with the reference named by the request's multiplexed model id."""

    def __init__(self, models: dict[str, str], threads: int = 1):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.models = {name: Path(p) for name, p in models.items()}
        self.counts = {"batches": 0, "queries": 0, "cells": 0}

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def reference(self, name: str):
        from scpermut_dist.mapping.reference import load_reference

        if name not in self.models:  # the gateway checked already; a handle caller may not have
            raise KeyError(f"no model {name!r}")
        return await asyncio.to_thread(load_reference, self.models[name])

    async def map(self, query: ad.AnnData) -> Payload | dict:
        """A Payload, or {"error": reason} for a query the reference refuses (answered 400)."""
        if query.n_obs > BATCH_CELLS or query.n_obs == 0:
            return (await self._map_group([query]))[0]
        return await self._map_batched(query)

    def stats(self) -> dict:
        """This replica's totals: model calls ("batches"), queries and cells mapped (queries / batches > 1: batching)."""
        return dict(self.counts)

    @serve.batch(max_batch_size=BATCH_CELLS, batch_wait_timeout_s=BATCH_WAIT_S,
                 batch_size_fn=lambda queries: sum(q.n_obs for q in queries))
    async def _map_batched(self, queries: list[ad.AnnData]) -> list[Payload | dict]:
        return await self._map_group(queries)

    async def _map_group(self, queries: list[ad.AnnData]) -> list[Payload | dict]:
        name = serve.get_multiplexed_model_id()
        ref = await self.reference(name)
        self.counts["batches"] += 1
        self.counts["queries"] += len(queries)
        self.counts["cells"] += sum(q.n_obs for q in queries)
        return await asyncio.to_thread(map_queries, ref, queries, name)


@serve.deployment(name="gateway", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(http)
class Gateway:
    """HTTP in front of the mapper: auth, model names, size limits, decoding, response format."""

    def __init__(self, mapper: DeploymentHandle, models: dict[str, str], token_sha256: str, max_upload_bytes: int):
        self.mapper = mapper
        self.cards = {name: model_card(name, Path(p)) for name, p in models.items()}
        self.digest = token_sha256
        self.max_upload = int(max_upload_bytes)

    @http.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "models": len(self.cards)}

    @http.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return {"models": list(self.cards.values())}

    @http.post("/v1/models/{name}/map")
    async def map(self, name: str, request: Request, format: str | None = None, layer: str | None = None):
        self._authorize(request)
        if name not in self.cards:  # only the hosted names: never a path
            raise HTTPException(404, f"no model {name!r}; GET /v1/models lists the hosted ones")
        want_parquet = _wants_parquet(format, request.headers.get("accept", ""))
        body = await self._read_body(request)
        try:
            query = await run_in_threadpool(decode_query, body, request.headers.get("content-type"), layer,
                                            self.max_upload * DECODED_PER_UPLOADED)
        except DataError as exc:
            raise HTTPException(400, str(exc)) from None
        del body
        try:
            out = await self.mapper.options(multiplexed_model_id=name).map.remote(query)
        except Exception:
            log.exception("mapping a query for %s failed", name)
            raise HTTPException(500, "internal error while mapping the query (see the server log)") from None
        if isinstance(out, dict):
            raise HTTPException(400, out["error"])
        if want_parquet:
            return Response(await run_in_threadpool(out.to_parquet), media_type=PARQUET)
        return Response(await run_in_threadpool(out.to_json), media_type="application/json")

    def _authorize(self, request: Request) -> None:
        if not authorized(request.headers.get("authorization"), self.digest):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as its announced or streamed size passes the limit."""
        limit = self.max_upload
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise HTTPException(400, "bad Content-Length header")
            if int(declared) > limit:
                raise _too_large(int(declared), limit)
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise _too_large(total, limit)
            chunks.append(chunk)
        return b"".join(chunks)


def build_app(args: dict) -> serve.Application:
    """The application for `args`: models (folder), token_sha256 | token_file | $SCPERMUT_TOKEN,
    max_upload_mb, mapper_replicas, mapper_cpus. Checks them all before anything starts."""
    models = {name: str(p) for name, p in discover_models(args["models"]).items()}
    digest = args.get("token_sha256") or token_digest(read_token(args.get("token_file")))
    try:
        max_upload_mb = float(args.get("max_upload_mb", DEFAULT_MAX_UPLOAD_MB))
        replicas = int(args.get("mapper_replicas", 1))
        cpus = float(args.get("mapper_cpus", 1))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad serve argument: {exc}") from None
    if max_upload_mb <= 0 or replicas < 1 or cpus <= 0:
        raise UsageError("--max-upload-mb, the mapper replicas and CPUs must be positive")
    mapper = Mapper.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus}).bind(
        models, threads=max(1, int(cpus)))
    return Gateway.bind(mapper, models, digest, int(max_upload_mb * 2**20))
