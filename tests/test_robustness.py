"""Robustness of the CLI: SIGTERM stops member workers, damaged checkpoints and a missing CUDA device are clear
errors (exit 2), never tracebacks or orphaned processes."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import anndata as ad
import psutil
import pytest
import torch
from model_data import CELLBENCH, TINY, cellbench_sng, tiny_config

from scpermut_dist.api import fit, load_reference
from scpermut_dist.commands.main import main
from scpermut_dist.errors import UsageError
from scpermut_dist.mapping.checkpoint import load_checkpoint
from scpermut_dist.train.trainer import resolve_device

SETS = [arg for item in TINY for arg in ("--set", item)]


# --- SIGTERM ---------------------------------------------------------------------------------------------------


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _loky_workers(proc: psutil.Process) -> list[psutil.Process]:
    out = []
    for child in proc.children(recursive=True):
        try:
            if "popen_loky_posix" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigterm_kills_the_member_workers_and_writes_no_model(datasets_dir, tmp_path):
    out = tmp_path / "model"
    # Two members side by side; stages long enough (patience too) that the workers are still training at SIGTERM.
    cmd = [sys.executable, "-m", "scpermut_dist.commands.main", "train", "--h5ad", str(datasets_dir / CELLBENCH),
           "--label-key", "cell_line", "--batch-key", "batch", "--out", str(out), "--quiet", *SETS,
           "--set", "model.ensemble_size=2", "--set", "train.parallel_members=2", "--set", "train.num_threads=1",
           "--set", "train.max_epochs=1000", "--set", "train.patience=1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 240
        workers: list[psutil.Process] = []
        while time.monotonic() < deadline and proc.poll() is None:
            workers = _loky_workers(parent)
            if len(workers) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"training ended before its workers started: {proc.communicate()}"
        assert len(workers) >= 2, "no loky member workers appeared"
        time.sleep(1.0)  # let the workers get into their members' training
        children = parent.children(recursive=True)  # workers, loky's resource tracker, ...
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(c) for c in children):
            time.sleep(0.2)
        survivors = [f"{c.pid} {c.cmdline()}" for c in children if _alive(c)]
        assert not survivors, f"child processes outlived the SIGTERMed run: {survivors}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "error: train stopped by SIGTERM before it finished"
    assert not out.exists()  # the checkpoint is written once, whole, at the end
    assert not list(tmp_path.glob(".model.*"))  # nor a temporary sibling left behind


def test_an_error_while_members_train_kills_the_workers_still_training(datasets_dir, monkeypatch):
    """Any exception in the caller (here a failing report of the first member done) stops the other members."""
    import scpermut_dist.train.parallel as parallel
    from loaders.sources import AnnDataSource
    from scpermut_dist.train.preprocess import prepare_reference
    from scpermut_dist.train.reference import member_splits

    adata = cellbench_sng(datasets_dir)
    cfg = tiny_config("model.ensemble_size=2", "data.label_key=cell_line", "data.batch_keys=[batch]",
                      "train.max_epochs=1000", "train.patience=1000")
    prep = prepare_reference(lambda sel: AnnDataSource(adata, sel), cfg.data)
    splits = member_splits(prep, cfg)
    monkeypatch.setattr(parallel, "_train_member", _member_0_short)  # member 0 finishes, member 1 trains on
    workers = []

    def report(record):
        workers.extend(_loky_workers(psutil.Process()))
        raise RuntimeError("report failed")

    with pytest.raises(RuntimeError, match="report failed"):
        parallel.train_members_in_parallel(prep, splits, cfg, processes=2, threads=1, report=report)
    assert len(workers) >= 2
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not [w.pid for w in workers if _alive(w)]


def _member_0_short(prep, splits, k, cfg, threads):
    from scpermut_dist.train.parallel import _train_member

    if k == 0:
        cfg = cfg.apply_overrides(["train.max_epochs=1"])
    return _train_member(prep, splits, k, cfg, threads)


# --- damaged checkpoints ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(datasets_dir, tmp_path_factory):
    """A real two-member checkpoint and a query h5ad of the same genes."""
    d = tmp_path_factory.mktemp("robust")
    adata = cellbench_sng(datasets_dir)
    cfg = tiny_config("model.ensemble_size=2", "train.parallel_members=1", "train.num_threads=1", "train.max_epochs=1")
    fit(adata, "cell_line", "batch", cfg).save(d / "ck")
    query = adata[:300].copy()
    query.obs = query.obs[["total_counts"]]
    query.write_h5ad(d / "query.h5ad")
    return d / "ck", d / "query.h5ad"


def _copy(ck, tmp_path):
    dst = tmp_path / "ck_bad"
    shutil.copytree(ck, dst)
    return dst


def test_an_intact_checkpoint_loads_and_maps(saved):
    ck, query = saved
    loaded = load_checkpoint(ck)  # the consistency check passes a real ensemble checkpoint
    assert len(loaded.genes) == 200 and len(loaded.extra_state_dicts) == 1
    result = load_reference(ck).map(ad.read_h5ad(query))
    assert result.probabilities.shape == (300, len(loaded.classes))


def test_cut_genes_tsv_is_a_damaged_checkpoint_not_a_shape_error(saved, tmp_path, capsys):
    ck, query = saved
    bad = _copy(ck, tmp_path)
    lines = (bad / "genes.tsv").read_text().splitlines(keepends=True)
    (bad / "genes.tsv").write_text("".join(lines[:100]))
    out = tmp_path / "x.h5ad"
    assert main(["map", "--model", str(bad), "--query", str(query), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "damaged checkpoint" in err and "genes.tsv lists 99 genes" in err
    assert "Re-export" in err and "Traceback" not in err and "mat1" not in err
    assert not out.exists()


def test_classes_that_do_not_match_the_weights_are_a_damaged_checkpoint(saved, tmp_path):
    bad = _copy(saved[0], tmp_path)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["classes"] = manifest["classes"][:-1]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match=r"damaged checkpoint: the manifest lists \d+ classes"):
        load_checkpoint(bad)


def test_weights_of_another_shape_are_a_damaged_checkpoint(saved, tmp_path):
    bad = _copy(saved[0], tmp_path)
    weights = torch.load(bad / "weights.pt", weights_only=True)
    weights["member1.classifier.out.weight"] = weights["member1.classifier.out.weight"][:-1]
    torch.save(weights, bad / "weights.pt")
    with pytest.raises(UsageError, match=r"damaged checkpoint: weights.pt \(member 1\) has classifier.out.weight"):
        load_checkpoint(bad)


# --- train.device=cuda without CUDA ----------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_cuda_device_is_a_usage_error_before_training(datasets_dir, tmp_path, capsys, monkeypatch):
    import scpermut_dist.train.reference as reference

    def never(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(reference, "prepare_reference", never)
    out = tmp_path / "model"
    rc = main(["train", "--h5ad", str(datasets_dir / CELLBENCH), "--label-key", "cell_line", "--out", str(out),
               "--set", "train.device=cuda"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: train.device=cuda: no CUDA device is available on this machine")
    assert "train.device=cpu" in err and not out.exists()
    for name in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(UsageError, match="no CUDA device is available"):
            resolve_device(name)
    assert resolve_device("cpu") == resolve_device("auto") == torch.device("cpu")


def test_ray_runs_resolve_the_device_on_their_workers_not_the_driver(datasets_dir, tmp_path, monkeypatch):
    """A CPU-only driver may launch a GPU run: the check belongs where training runs (train.ray_worker)."""
    import launch.train

    seen = {}
    monkeypatch.setattr(launch.train, "train_on_ray", lambda uri, cfg, args, organism: seen.update(d=cfg.train.device))
    rc = main(["train", "--h5ad", str(datasets_dir / CELLBENCH), "--label-key", "cell_line", "--out",
               str(tmp_path / "run"), "--workers", "1", "--gpus-per-worker", "1", "--set", "train.device=cuda"])
    assert rc == 0 and seen == {"d": "cuda"}
