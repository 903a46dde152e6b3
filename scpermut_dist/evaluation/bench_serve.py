"""Server throughput: requests/s and cells/s of `scpermut serve` with N concurrent clients.

The server is a live one: `--url` (token from $SCPERMUT_TOKEN), or else `scpermut serve` started here as
a subprocess on a free 127.0.0.1 port with a throwaway token and stopped (SIGTERM) at the end. Each client
thread posts the same in-memory h5ad of `cells` query cells in a loop; the first answer is checked against
`Reference.map` when the models folder is local. Also reported: the local `Reference.map` rate on the same
cells (the ceiling without HTTP, decoding and Ray), and per-request latency percentiles.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import numpy as np
import requests

from scpermut_dist.errors import UsageError


@contextmanager
def local_server(models_dir: str | Path, replicas: int = 1, cpus_per_replica: float = 1.0,
                 max_upload_mb: float = 256.0, start_timeout_s: float = 180.0):
    """(url, token) of a `scpermut serve` subprocess, stopped with SIGTERM on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"SCPERMUT_TOKEN": token}
    cmd = [sys.executable, "-m", "scpermut_dist.commands.main", "serve", "--models", str(models_dir),
           "--port", str(port), "--replicas", str(replicas), "--cpus-per-replica", str(cpus_per_replica),
           "--max-upload-mb", str(max_upload_mb), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise UsageError(f"`scpermut serve` exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise UsageError(f"`scpermut serve` did not answer /healthz within {start_timeout_s:.0f} s")
            time.sleep(0.5)
        yield url, token
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def query_cells(query: ad.AnnData, cells: int) -> ad.AnnData:
    """The first `cells` cells, the query repeated when it has fewer (names made unique)."""
    reps = -(-cells // query.n_obs)
    q = ad.concat([query] * reps, index_unique="-") if reps > 1 else query
    return q[:cells].copy()


def measure(url: str, token: str, model: str, body: bytes, n_cells: int, clients: int = 4,
            requests_per_client: int = 25) -> dict:
    """Run `clients` threads, each posting `body` `requests_per_client` times; throughput and latency."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-hdf5"}
    target = f"{url}/v1/models/{model}/map"
    warm = requests.post(target, data=body, headers=headers, timeout=300)  # loads the model on its replica
    if warm.status_code != 200:
        raise UsageError(f"the server answered {warm.status_code}: {warm.text[:500]}")

    def client(_: int) -> list[float]:
        session, times = requests.Session(), []
        for _ in range(requests_per_client):
            t0 = time.perf_counter()
            r = session.post(target, data=body, headers=headers, timeout=300)
            r.raise_for_status()
            times.append(time.perf_counter() - t0)
        return times

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = np.concatenate([np.asarray(t) for t in pool.map(client, range(clients))])
    seconds = time.perf_counter() - t0
    n = len(latencies)
    return {"clients": clients, "requests": int(n), "cells_per_request": n_cells, "seconds": round(seconds, 3),
            "requests_per_s": round(n / seconds, 2), "cells_per_s": round(n * n_cells / seconds, 1),
            "latency_p50_s": round(float(np.percentile(latencies, 50)), 4),
            "latency_p95_s": round(float(np.percentile(latencies, 95)), 4),
            "upload_mib": round(len(body) / 2**20, 2), "first_answer": warm.json()}


def local_rate(model_dir: Path, query: ad.AnnData, repeats: int = 5) -> float:
    """Cells/s of `Reference.map` in this process on the same cells (one thread per torch default)."""
    from scpermut_dist.mapping.reference import load_reference

    ref = load_reference(model_dir)
    ref.map(query)
    t0 = time.perf_counter()
    for _ in range(repeats):
        ref.map(query)
    return query.n_obs * repeats / (time.perf_counter() - t0)


def check_answer(doc: dict, model_dir: Path, query: ad.AnnData) -> None:
    from scpermut_dist.mapping.reference import load_reference

    expected = load_reference(model_dir).map(query)
    if doc["labels"] != list(expected.labels) or not np.allclose(doc["latent"], expected.latent, atol=1e-4):
        raise UsageError("the server's answer differs from Reference.map on the same cells")
