"""`scpermut serve`: a real Ray Serve application on 127.0.0.1 hosting two references trained on Kang data.

Checked against `Reference.map` and `scpermut map` on the same query: the HTTP path (h5ad bytes, JSON sparse
counts, parquet), the client and `scpermut map --server`; authentication, size limits, model names, malformed
bodies, concurrency, and that serving writes nothing under the models folder.
"""
from __future__ import annotations

import http.client
import io
import json
import logging
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import requests
import scipy.sparse as sp
from model_data import tiny_config

from loaders.errors import DataError
from scpermut_dist.api import fit, load_reference
from scpermut_dist.commands.main import main
from scpermut_dist.errors import UsageError
from scpermut_dist.serve.auth import token_digest
from scpermut_dist.serve.client import ScpermutClient, ServerError, h5ad_bytes
from scpermut_dist.serve.codec import PARQUET, decode_query, frame_from_parquet

KANG = "kang2018_pbmc_ifnb_4samples.h5ad"
TOKEN = "test-token-0123456789abcdef"
MODELS = ("kang_a", "kang_b")
MAX_UPLOAD_MB = 4


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def data(datasets_dir, tmp_path_factory) -> dict:
    """Two references (different seeds) on three Kang samples, the fourth sample as the query file."""
    kang = ad.read_h5ad(datasets_dir / KANG)
    held_out = kang.obs["batch"].astype(str).unique()[-1]
    is_query = (kang.obs["batch"].astype(str) == held_out).to_numpy()
    root = tmp_path_factory.mktemp("serve")
    models = root / "models"
    for seed, name in enumerate(MODELS):
        cfg = tiny_config("train.max_epochs=2", "train.num_threads=1", f"train.seed={seed}")
        fit(kang[~is_query].copy(), "cell_type", "batch", cfg).save(models / name)
    (models / "not-a-model").mkdir()  # no manifest.json: not hosted
    shutil.copytree(models / "kang_a", models / "broken")  # a checkpoint missing its weights: skipped, never listed
    (models / "broken" / "weights.pt").unlink()
    query = kang[is_query].copy()
    query_path = root / "query.h5ad"
    query.write_h5ad(query_path)
    return {"models": models, "query": query, "query_path": query_path, "tree": _tree(models), "root": root}


@pytest.fixture(scope="module")
def server(ray_cluster, data):
    """The application `scpermut serve` runs, on a free port of 127.0.0.1 in the session's Ray."""
    from ray import serve

    from scpermut_dist.serve.app import APP_NAME, build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": str(data["models"]), "token_sha256": token_digest(TOKEN),
                         "max_upload_mb": MAX_UPLOAD_MB}), name=APP_NAME, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _post(server, name, body, headers=None, **kw):
    return requests.post(f"{server}/v1/models/{name}/map", data=body, headers={**AUTH, **(headers or {})},
                         timeout=120, **kw)


def _assert_same(doc_or_frame, expected, obs_names):
    """A server answer (JSON document or client frame) equals a local MappingResult."""
    if isinstance(doc_or_frame, pd.DataFrame):
        f = doc_or_frame
        names, labels, conf = list(f.index), f["label"].tolist(), f["confidence"].to_numpy()
        latent = f[[c for c in f.columns if c.startswith("latent_")]].to_numpy()
        unknown = f["unknown"].to_numpy()
    else:
        d = doc_or_frame
        names, labels, conf = d["obs_names"], d["labels"], np.asarray(d["confidence"])
        latent, unknown = np.asarray(d["latent"]), np.asarray(d["unknown"])
    assert names == list(obs_names)
    assert labels == list(expected.labels)
    np.testing.assert_allclose(conf, expected.confidence, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(latent, expected.latent, rtol=1e-4, atol=1e-5)
    want_unknown = getattr(expected, "unknown", None)
    assert unknown.tolist() == (np.zeros(len(labels), bool) if want_unknown is None else want_unknown).tolist()


def test_healthz_needs_no_token_and_models_lists_both(server, data):
    assert requests.get(f"{server}/healthz", timeout=30).json() == {"status": "ok", "models": 2}
    models = requests.get(f"{server}/v1/models", headers=AUTH, timeout=30).json()["models"]
    assert [m["name"] for m in models] == list(MODELS)
    ref = load_reference(data["models"] / "kang_a")
    card = models[0]
    assert card["cell_types"] == ref.classes
    assert card["genes"]["n_genes"] == len(ref.genes) and card["genes"]["naming"] == "symbols"
    assert card["training_data"]["label_key"] == "cell_type"
    # the card carries the checkpoint's own metrics, calibration and unknown rule, not just the keys
    assert card["metrics"] == ref.metrics and card["calibration"] == ref.metrics["calibration"]
    assert card["calibration"]["temperature"] and card["unknown"] == ref.metrics["unknown"]
    assert "/" not in str(card["training_data"].get("source", ""))  # no server paths


def test_map_h5ad_bytes_equals_reference_map_and_scpermut_map(server, data, tmp_path):
    query = data["query"]
    resp = _post(server, "kang_a", data["query_path"].read_bytes(), {"Content-Type": "application/x-hdf5"})
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    expected = load_reference(data["models"] / "kang_a").map(query)
    _assert_same(doc, expected, query.obs_names)
    assert doc["n_genes_found"] == doc["n_genes_model"] and doc["model"] == "kang_a"
    out = tmp_path / "mapped.h5ad"
    assert main(["map", "--model", str(data["models"] / "kang_a"), "--query", str(data["query_path"]),
                 "--out", str(out), "--quiet"]) == 0
    cli = ad.read_h5ad(out)
    assert doc["labels"] == cli.obs["scpermut_label"].astype(str).tolist()
    np.testing.assert_allclose(doc["confidence"], cli.obs["scpermut_confidence"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(doc["latent"], cli.obsm["X_scpermut"], rtol=1e-4, atol=1e-5)


def test_map_json_sparse_counts_and_parquet(server, data):
    query = data["query"][:150].copy()
    x = sp.csr_matrix(query.X)
    body = {"genes": query.var_names.tolist(), "obs_names": query.obs_names.tolist(), "indptr": x.indptr.tolist(),
            "indices": x.indices.tolist(), "data": x.data.tolist()}
    expected = load_reference(data["models"] / "kang_b").map(query)
    resp = _post(server, "kang_b", json.dumps(body), {"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    _assert_same(resp.json(), expected, query.obs_names)
    for kw in ({"params": {"format": "parquet"}}, {"headers": {"Accept": PARQUET}}):
        resp = _post(server, "kang_b", json.dumps(body), **kw)
        assert resp.status_code == 200 and resp.headers["content-type"] == PARQUET
        _assert_same(frame_from_parquet(resp.content), expected, query.obs_names)


def test_client_and_map_server_cli(server, data, tmp_path, monkeypatch):
    client = ScpermutClient(server, TOKEN)
    assert [m["name"] for m in client.models()] == list(MODELS)
    query = data["query"]
    expected = load_reference(data["models"] / "kang_b").map(query)
    _assert_same(client.map("kang_b", query), expected, query.obs_names)
    _assert_same(client.map("kang_b", data["query_path"], parquet=True), expected, query.obs_names)
    with pytest.raises(ServerError) as err:
        ScpermutClient(server, "wrong-token-0123456789").models()
    assert err.value.status == 401
    monkeypatch.setenv("SCPERMUT_TOKEN", TOKEN)
    out = tmp_path / "remote.h5ad"
    assert main(["map", "--server", server, "--model", "kang_b", "--query", str(data["query_path"]),
                 "--out", str(out), "--quiet"]) == 0
    remote = ad.read_h5ad(out)
    assert remote.obs["scpermut_label"].astype(str).tolist() == list(expected.labels)
    np.testing.assert_allclose(remote.obsm["X_scpermut"], expected.latent, rtol=1e-4, atol=1e-5)
    # abstention and confidence survive the server round trip exactly (no rule: no column, as a local map)
    if expected.unknown is None:
        assert "scpermut_unknown" not in remote.obs
    else:
        assert remote.obs["scpermut_unknown"].to_numpy(bool).tolist() == np.asarray(expected.unknown, bool).tolist()
    np.testing.assert_allclose(remote.obs["scpermut_confidence"], expected.confidence, rtol=1e-5, atol=1e-6)
    assert main(["map", "--server", server, "--model", "nope", "--query", str(data["query_path"]),
                 "--out", str(tmp_path / "x.h5ad"), "--quiet"]) == 2
    assert not (tmp_path / "x.h5ad").exists()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789"},
                                     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}])
def test_401_without_or_with_a_wrong_token(server, data, headers):
    assert requests.get(f"{server}/v1/models", headers=headers, timeout=30).status_code == 401
    resp = requests.post(f"{server}/v1/models/kang_a/map", data=data["query_path"].read_bytes(), headers=headers,
                         timeout=30)
    assert resp.status_code == 401 and resp.headers.get("www-authenticate") == "Bearer"
    assert requests.post(f"{server}/v1/models/nope/map", data=b"x", headers=headers, timeout=30).status_code == 401


def test_413_on_an_oversized_upload(server):
    big = b"\0" * (MAX_UPLOAD_MB * 2**20 + 1)
    resp = _post(server, "kang_a", big)  # Content-Length says it
    assert resp.status_code == 413 and "limit" in resp.json()["detail"]
    resp = _post(server, "kang_a", (big[i:i + 2**20] for i in range(0, len(big), 2**20)))  # chunked: counted
    assert resp.status_code == 413
    assert requests.get(f"{server}/healthz", timeout=30).status_code == 200


@pytest.mark.parametrize("path", ["nope", "..", "../x", "%2e%2e%2fx", "..%2Fkang_a", "%2Fetc%2Fpasswd",
                                  "kang_a%00", "not-a-model"])
def test_404_for_unknown_and_path_like_names(server, path):
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)  # sends the path exactly as written
    conn.request("POST", f"/v1/models/{path}/map", body=b"{}", headers=AUTH)
    assert conn.getresponse().status == 404
    conn.close()


def _truncated(data) -> bytes:
    b = data["query_path"].read_bytes()
    return b[: len(b) // 2]


def _external_link_h5ad(data) -> bytes:
    sink = io.BytesIO()
    with h5py.File(sink, "w") as f:
        ad.io.write_elem(f, "/", data["query"][:5].copy())
        f["var"]["evil"] = h5py.ExternalLink("/etc/hostname", "/")
    return sink.getvalue()


def _counts_json(src, **change) -> str:
    q = src["query"][:3]
    x = sp.csr_matrix(q.X)
    body = {"genes": q.var_names.tolist(), "obs_names": q.obs_names.tolist(), "indptr": x.indptr.tolist(),
            "indices": x.indices.tolist(), "data": x.data.tolist(), **change}
    return json.dumps(body)


BAD_BODIES = {
    "empty": (lambda d: b"", "empty request body"),
    "random bytes": (lambda d: b"\x01\x02garbage" * 100, "neither an h5ad"),
    "hdf5 signature then junk": (lambda d: b"\x89HDF\r\n\x1a\n" + b"\0junk" * 200, "could not be read"),
    "truncated h5ad": (_truncated, "could not be read"),
    "external link": (_external_link_h5ad, "external link"),
    "bad json": (lambda d: b'{"genes": [', "could not be parsed"),
    "json missing fields": (lambda d: b'{"genes": ["A"]}', "lacks"),
    "json gene index out of range": (lambda d: _counts_json(d, indices=[10**6] * len(json.loads(_counts_json(d))["indices"])),
                                     "indices must be gene positions"),
    "json negative counts": (lambda d: _counts_json(d, data=[-1.0] * len(json.loads(_counts_json(d))["data"])),
                             "negative"),
    "json too few genes": (lambda d: json.dumps({"genes": ["NOT_A_GENE"], "indptr": [0, 1], "indices": [0],
                                                 "data": [3]}), "genes are in the query"),
    "json obs_names length": (lambda d: _counts_json(d, obs_names=["a"]), "obs_names has 1"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_400_for_malformed_bodies_and_the_server_keeps_answering(server, data, case):
    make, reason = BAD_BODIES[case]
    body = make(data)
    resp = _post(server, "kang_a", body if isinstance(body, bytes) else body.encode())
    assert resp.status_code == 400, (resp.status_code, resp.text)
    assert reason in resp.json()["detail"], resp.json()
    assert requests.get(f"{server}/healthz", timeout=30).status_code == 200
    ok = _post(server, "kang_a", h5ad_bytes(data["query"][:20].copy()))
    assert ok.status_code == 200 and len(ok.json()["labels"]) == 20


def _mapper_handle():
    from ray import serve

    from scpermut_dist.serve.app import APP_NAME

    return serve.get_deployment_handle("mapper", app_name=APP_NAME)


def test_8_concurrent_requests_all_answered_correctly(server, data):
    query = data["query"]
    refs = {name: load_reference(data["models"] / name) for name in MODELS}
    jobs = [(MODELS[i % 2], query[i * 20:(i + 1) * 20 + 30 * (i % 3)].copy()) for i in range(8)]

    def one(job):
        name, q = job
        return _post(server, name, h5ad_bytes(q))

    mapper = _mapper_handle()
    before = mapper.stats.remote().result()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, jobs))
    after = mapper.stats.remote().result()
    assert after["queries"] - before["queries"] == 8
    for (name, q), resp in zip(jobs, answers):
        assert resp.status_code == 200, resp.text
        _assert_same(resp.json(), refs[name].map(q), q.obs_names)


def test_same_model_queries_are_batched_and_answered_as_if_alone(server, data):
    """8 calls fired at once on the mapper's handle: fewer model calls than queries, each answer its own."""
    from scpermut_dist.serve.codec import Payload

    mapper = _mapper_handle().options(multiplexed_model_id="kang_a")
    ref = load_reference(data["models"] / "kang_a")
    queries = [data["query"][i * 25:(i + 1) * 25 + 5 * i].copy() for i in range(8)]
    before = mapper.stats.remote().result()
    pending = [mapper.map.remote(q) for q in queries]
    answers = [p.result() for p in pending]
    after = mapper.stats.remote().result()
    assert after["queries"] - before["queries"] == 8
    assert 1 <= after["batches"] - before["batches"] < 8  # @serve.batch stacked some into one forward pass
    for q, answer in zip(queries, answers):
        assert isinstance(answer, Payload)
        _assert_same(answer.to_frame(), ref.map(q), q.obs_names)


def test_map_queries_stacks_same_gene_queries_into_one_model_call(data):
    """The group mapper itself: queries with identical genes cost one `ref.map`, each answer still its own."""
    from scpermut_dist.serve.app import map_queries
    from scpermut_dist.serve.codec import Payload

    ref = load_reference(data["models"] / "kang_a")

    class Counting:
        """Forwards everything to the reference, counting its `map` calls."""

        def __init__(self, inner):
            self.inner, self.calls = inner, []

        def map(self, query, *args, **kwargs):
            self.calls.append(query.n_obs)
            return self.inner.map(query, *args, **kwargs)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    queries = [data["query"][i * 25:(i + 1) * 25 + 5 * i].copy() for i in range(4)]
    counting = Counting(ref)
    answers = map_queries(counting, queries, "kang_a")
    assert counting.calls == [sum(q.n_obs for q in queries)]  # one forward pass over all stacked cells
    assert len(answers) == len(queries)
    for q, answer in zip(queries, answers):
        assert isinstance(answer, Payload)
        _assert_same(answer.to_frame(), ref.map(q), q.obs_names)


def test_bad_layer_and_format_give_400(server, data):
    body = data["query_path"].read_bytes()
    resp = _post(server, "kang_a", body, params={"layer": "counts"})
    assert resp.status_code == 400 and "no layer 'counts'" in resp.json()["detail"]
    assert _post(server, "kang_a", body, params={"format": "xml"}).status_code == 400


def test_scpermut_serve_cli_serves_and_stops_on_sigterm(data):
    """The real command in a subprocess (its own local Ray): serves both models, then stops on SIGTERM."""
    from scpermut_dist.evaluation.bench_serve import local_server

    with local_server(data["models"], max_upload_mb=1) as (url, token):
        client = ScpermutClient(url, token)
        assert [m["name"] for m in client.models()] == list(MODELS)
        q = data["query"][:40].copy()
        _assert_same(client.map("kang_a", q), load_reference(data["models"] / "kang_a").map(q), q.obs_names)
        with pytest.raises(ServerError) as err:
            client.map("kang_a", b"\0" * (2**20 + 1))
        assert err.value.status == 413
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)


def test_broken_checkpoint_is_not_hosted(server):
    """models/broken (no weights.pt) is left out at startup: not counted, not listed, 404 like any unknown name."""
    assert requests.get(f"{server}/healthz", timeout=30).json()["models"] == len(MODELS)
    names = [m["name"] for m in requests.get(f"{server}/v1/models", headers=AUTH, timeout=30).json()["models"]]
    assert "broken" not in names
    resp = _post(server, "broken", b"{}", {"Content-Type": "application/json"})
    assert resp.status_code == 404 and "no model 'broken'" in resp.json()["detail"]


def test_remapping_on_the_server_leaves_nothing_of_the_old_model(server, data, datasets_dir, tmp_path, monkeypatch):
    """A query mapped locally by a 3-class model, then with --server by kang_b (5 classes): the output holds
    kang_b's results only, in the same places as a local map (label_raw, probabilities, uns classes, ...)."""
    from test_remap import written

    query = data["query"]
    ref_b = load_reference(data["models"] / "kang_b")
    kang = ad.read_h5ad(datasets_dir / KANG)
    keep = ~kang.obs_names.isin(query.obs_names) & kang.obs["cell_type"].astype(str).isin(ref_b.classes[:3])
    subset = kang[np.asarray(keep)].copy()
    model_a = tmp_path / "model_a"
    fit(subset, "cell_type", "batch", tiny_config("train.max_epochs=1", "train.num_threads=1")).save(model_a)
    a_out = tmp_path / "a.h5ad"
    assert main(["map", "--model", str(model_a), "--query", str(data["query_path"]), "--out", str(a_out),
                 "--quiet"]) == 0
    first = ad.read_h5ad(a_out)
    assert first.obsm["scpermut_probabilities"].shape == (query.n_obs, 3)
    assert {"obs/scpermut_label_raw", "obs/scpermut_neighbor_label"} <= written(first)
    monkeypatch.setenv("SCPERMUT_TOKEN", TOKEN)
    remote_out, fresh_out, local_out = tmp_path / "ab.h5ad", tmp_path / "b.h5ad", tmp_path / "local_b.h5ad"
    for src, dst in ((a_out, remote_out), (data["query_path"], fresh_out)):
        assert main(["map", "--server", server, "--model", "kang_b", "--query", str(src), "--out", str(dst),
                     "--quiet"]) == 0
    assert main(["map", "--model", str(data["models"] / "kang_b"), "--query", str(data["query_path"]),
                 "--out", str(local_out), "--quiet"]) == 0
    remote, fresh, local = ad.read_h5ad(remote_out), ad.read_h5ad(fresh_out), ad.read_h5ad(local_out)
    # nothing of model A: every key is one kang_b writes, and the probabilities have kang_b's classes
    assert written(remote) == written(fresh) == written(local)
    assert list(remote.uns["scpermut"]["classes"]) == ref_b.classes
    assert remote.obsm["scpermut_probabilities"].shape == (query.n_obs, len(ref_b.classes)) != (query.n_obs, 3)
    assert remote.uns["scpermut"]["model"] == "kang_b" and remote.uns["scpermut"]["server"] == server
    # the same values as kang_b's local map, in the same places
    for col in ("scpermut_label", "scpermut_label_raw", "scpermut_neighbor_label", "scpermut_unknown"):
        assert remote.obs[col].astype(str).tolist() == local.obs[col].astype(str).tolist(), col
    for col in ("scpermut_label", "scpermut_label_raw", "scpermut_neighbor_label"):
        assert list(remote.obs[col].cat.categories) == list(local.obs[col].cat.categories), col
    for col in ("scpermut_confidence", "scpermut_unknown_score", "scpermut_neighbor_agreement"):
        np.testing.assert_allclose(remote.obs[col], local.obs[col], rtol=1e-5, atol=1e-6, err_msg=col)
    for key in ("X_scpermut", "scpermut_probabilities"):
        np.testing.assert_allclose(remote.obsm[key], local.obsm[key], rtol=1e-4, atol=1e-5, err_msg=key)
    for key in ("gene_overlap", "genes_matched_by", "confidence", "n_genes_found", "n_genes_model"):
        assert remote.uns["scpermut"][key] == local.uns["scpermut"][key], key


def test_bench_serve_against_a_running_server(server, data, tmp_path, monkeypatch, capsys):
    """`scpermut bench serve --url`: every request answered and counted, its rates are its counts over its time,
    and the query is repeated up to --cells when it has fewer cells."""
    monkeypatch.setenv("SCPERMUT_TOKEN", TOKEN)
    cells = data["query"].n_obs + 7  # more than the file holds
    out = tmp_path / "bench_serve.json"
    mapper = _mapper_handle()
    before = mapper.stats.remote().result()
    assert main(["bench", "serve", "--url", server, "--model", "kang_b", "--query", str(data["query_path"]),
                 "--cells", str(cells), "--clients", "2", "--requests", "3", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["requests"], r["cells_per_request"], r["model"]) == (6, cells, "kang_b")
    assert r["requests_per_s"] == pytest.approx(6 / r["seconds"], rel=0.01)
    assert r["cells_per_s"] == pytest.approx(6 * cells / r["seconds"], rel=0.01)
    assert 0 < r["latency_p50_s"] <= r["latency_p95_s"]
    assert mapper.stats.remote().result()["cells"] - before["cells"] == 7 * cells  # a warm-up request + the six timed
    assert "2 clients x 3 requests" in capsys.readouterr().out


def test_serving_wrote_nothing_under_the_models_folder(server, data):
    assert _tree(data["models"]) == data["tree"]


# No server needed below: the builder's and the codec's checks.

def test_broken_checkpoints_are_skipped_with_a_warning_or_refused(data, tmp_path, caplog):
    from scpermut_dist.serve.catalog import discover_models

    with caplog.at_level(logging.WARNING, logger="scpermut_dist.serve.catalog"):
        assert list(discover_models(data["models"])) == list(MODELS)
    (warning,) = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert "skipping checkpoint folder 'broken'" in warning and "weights.pt" in warning
    only_broken = tmp_path / "models"
    shutil.copytree(data["models"] / "broken", only_broken / "broken")
    shutil.copytree(data["models"] / "kang_a", only_broken / "bad_genes")
    (only_broken / "bad_genes" / "genes.tsv").write_text("")  # unreadable genes table
    with pytest.raises(UsageError, match="no usable checkpoint") as err:
        discover_models(only_broken)
    assert "broken:" in str(err.value) and "weights.pt" in str(err.value) and "bad_genes:" in str(err.value)


def test_builder_refuses_bad_arguments(data, tmp_path, monkeypatch):
    from scpermut_dist.serve.app import build_app

    monkeypatch.delenv("SCPERMUT_TOKEN", raising=False)
    with pytest.raises(UsageError, match="no API token"):
        build_app({"models": str(data["models"])})
    with pytest.raises(UsageError, match="no checkpoint folders"):
        build_app({"models": str(tmp_path), "token_sha256": "x"})
    short = tmp_path / "token"
    short.write_text("short\n")
    with pytest.raises(UsageError, match="at least 16"):
        build_app({"models": str(data["models"]), "token_file": str(short)})


def test_serve_cli_validates_before_starting_ray(data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SCPERMUT_TOKEN", raising=False)
    assert main(["serve", "--models", str(tmp_path / "missing")]) == 2
    assert "no API token" in capsys.readouterr().err
    monkeypatch.setenv("SCPERMUT_TOKEN", TOKEN)
    assert main(["serve", "--models", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["serve", "--models", str(data["models"]), "--port", "0"]) == 2


def test_decoded_size_cap(data):
    sink = io.BytesIO()
    with h5py.File(sink, "w") as f:
        q = ad.AnnData(X=np.zeros((2000, 1000), np.float32))
        ad.io.write_elem(f, "/", q, dataset_kwargs={"compression": "gzip"})
    assert len(sink.getvalue()) < 2**20
    with pytest.raises(DataError, match="decompresses to"):
        decode_query(sink.getvalue(), max_decoded_bytes=2**20)


def test_rayservice_manifest_is_valid_and_runs_this_builder(data, monkeypatch):
    """k8s/serve/rayservice.yaml: valid against the KubeRay CRD and Kubernetes' schemas (k8s/validate_manifests.py),
    its serveConfigV2 valid for Ray Serve and buildable by `build_app`, the token from a Secret, models read-only."""
    import importlib.util

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from launch import kuberay
    from scpermut_dist.serve import app as serve_app

    k8s = Path(__file__).resolve().parents[1] / "k8s"
    spec = importlib.util.spec_from_file_location("k8s_validate_manifests", k8s / "validate_manifests.py")
    vm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vm)
    (service,) = [d for d in yaml.safe_load_all((k8s / "serve" / "rayservice.yaml").read_text()) if d]
    assert service["kind"] == "RayService" and vm.problems(service) == []
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == kuberay.RAY_VERSION
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.parse_obj(config)  # Ray Serve's own schema of a config file
    (application,) = config["applications"]
    module, _, attr = application["import_path"].partition(":")
    assert (module, getattr(serve_app, attr)) == ("scpermut_dist.serve.app", serve_app.build_app)
    models = Path(application["args"]["models"])
    templates = vm.pod_templates(service)
    assert set(templates) == {"headGroupSpec.template", "workerGroupSpecs[0].template"}
    (secret,) = [d for d in yaml.safe_load_all((k8s / "serve" / "secret.example.yaml").read_text()) if d]
    assert vm.problems(secret) == [] and "SCPERMUT_TOKEN" in secret["stringData"]
    for template in templates.values():
        (container,) = template["spec"]["containers"]
        assert container["image"] == kuberay.DEFAULT_IMAGE
        assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]
        (mount,) = [m for m in container["volumeMounts"] if models.is_relative_to(m["mountPath"])]
        assert mount["readOnly"] is True
        (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
        assert volume["persistentVolumeClaim"] == {"claimName": "scpermut-data", "readOnly": True}
        assert {"containerPort": config["http_options"]["port"], "name": "serve"} in container["ports"]
    monkeypatch.setenv("SCPERMUT_TOKEN", TOKEN)  # as envFrom sets it in the pods
    assert serve_app.build_app({**application["args"], "models": str(data["models"])}) is not None
