"""Reference building on a real local Ray (one per test session), 2 CPU workers, a generated Census store."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from scpermut_dist.commands.main import main

SMALL = ["model.hidden_sizes=[64, 32]", "model.latent_dim=16", "train.batch_size=128", "train.max_epochs=5",
         "train.patience=50", "train.checkpoint_every_steps=25", "data.n_hvg=200", "train.num_threads=1", "model.ensemble_size=1"]


def _train(store: Path, out: Path, workers: int, *extra: str) -> int:
    sets = [a for s in SMALL for a in ("--set", s)]
    return main(["train", "--store", str(store), "--label-key", "cell_type", "--batch-key", "dataset_id+donor_id",
                 "--workers", str(workers), "--out", str(out), "--quiet", *sets, *extra])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict:
    return torch.load(run / "model" / "weights.pt", weights_only=True)


@pytest.fixture(scope="module")
def two_worker_run(ray_cluster, census_store_3k, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "w2"
    assert _train(census_store_3k, run, 2) == 0
    return run


def test_a_two_worker_run_writes_metrics_and_a_checkpoint_that_map_loads(two_worker_run, census_store_3k, tmp_path):
    records = _metrics(two_worker_run)
    assert all("step" in r for r in records)
    assert records[0]["event"] == "start" and records[-1]["event"] == "final"
    epochs = [r for r in records if r["event"] == "epoch_end"]
    assert {r["world_size"] for r in epochs} == {2}
    assert [r["step"] for r in epochs] == sorted(r["step"] for r in epochs)
    assert {"loss_total", "cells_per_s", "stage", "epoch"} <= set(epochs[0])
    assert "val_macro_f1" in [r for r in epochs if r["stage"] == "full_model"][0]
    # map a query of the store's own cells with the checkpoint at RUN_DIR/model
    from loaders.selection import CellSelection
    from loaders.sources import spec_from_uri

    src = spec_from_uri(str(census_store_3k), CellSelection(label_key="cell_type")).open()
    rows = np.arange(0, src.n_cells, 7)
    query = ad.AnnData(src.read_counts(rows), obs={"truth": src.obs["label"].iloc[rows].astype(str).to_numpy()},
                       var=src.var.set_index("feature_id", drop=False))
    query.obs_names = [f"c{i}" for i in rows]
    src.close()
    query.write_h5ad(tmp_path / "q.h5ad")
    assert main(["map", "--model", str(two_worker_run / "model"), "--query", str(tmp_path / "q.h5ad"),
                 "--out", str(tmp_path / "mapped.h5ad"), "--quiet"]) == 0
    mapped = ad.read_h5ad(tmp_path / "mapped.h5ad")
    from sklearn.metrics import balanced_accuracy_score

    score = balanced_accuracy_score(mapped.obs["truth"], mapped.obs["scpermut_label"].astype(str))
    assert score > 5 / mapped.obs["truth"].nunique()  # a few short epochs on 26 types: far above chance


def test_one_and_two_workers_reach_comparable_validation_accuracy(two_worker_run, census_store_3k, tmp_path):
    assert _train(census_store_3k, tmp_path / "w1", 1) == 0
    final1, final2 = _metrics(tmp_path / "w1")[-1], _metrics(two_worker_run)[-1]
    assert final1["world_size"] == 1 and final2["world_size"] == 2
    # same global batch, same validation cells: the same optimisation up to the order of cells
    assert abs(final1["val_balanced_accuracy"] - final2["val_balanced_accuracy"]) < 0.1
    assert final1["step"] == pytest.approx(final2["step"], rel=0.1)


def _kill_rank_when(run: Path, rank: int, min_step: int, done: threading.Event) -> dict:
    """SIGKILL a worker process from outside once the run has checkpointed past `min_step`."""
    while not done.is_set():
        if (run / "metrics.jsonl").exists():
            steps = [r["step"] for r in _metrics(run) if r["event"] in ("step", "epoch_end")]
            if steps and max(steps) >= min_step:
                info = json.loads((run / "workers" / f"rank{rank}.json").read_text())
                os.kill(info["pid"], signal.SIGKILL)
                return info
        time.sleep(0.2)
    raise AssertionError("the run ended before the worker could be killed")


def _run_with_kill(store: Path, run: Path, *extra: str) -> tuple[int, dict]:
    out: dict = {}
    done = threading.Event()

    def target() -> None:
        out["rc"] = _train(store, run, 2, *extra)
        done.set()

    thread = threading.Thread(target=target)
    thread.start()
    killed = _kill_rank_when(run, 1, 40, done)
    thread.join(timeout=600)
    return out["rc"], killed


def _assert_resumed_exactly(run: Path, reference_run: Path) -> None:
    records = _metrics(run)
    resumes = [i for i, r in enumerate(records) if r["event"] == "resume"]
    assert resumes, "no restart from a checkpoint was recorded"
    resume = records[resumes[-1]]
    assert resume["step"] > 0 and resume["checkpoint"].startswith(f"checkpoint_{resume['step']:09d}")
    after = [r for r in records[resumes[-1] + 1:] if r["event"] in ("step", "epoch_end")]
    assert after[0]["step"] > resume["step"]  # continues after the checkpoint it got back, not from 0
    assert after[0]["step"] <= resume["step"] + 20  # the next epoch end (19 steps) or checkpoint
    assert records[-1]["event"] == "final" and records[-1]["step"] == _metrics(reference_run)[-1]["step"]
    w, ref = _weights(run), _weights(reference_run)
    assert w.keys() == ref.keys()
    # CPU, fixed seed, every rank's RNG and the loader position restored: bitwise the uninterrupted run
    assert all(torch.equal(w[k], ref[k]) for k in w)


def test_a_worker_killed_mid_run_is_restarted_from_its_checkpoint(two_worker_run, census_store_3k, tmp_path):
    rc, _ = _run_with_kill(census_store_3k, tmp_path / "killed", "--max-failures", "2")
    assert rc == 0
    _assert_resumed_exactly(tmp_path / "killed", two_worker_run)


def test_rerunning_the_command_resumes_a_stopped_run(two_worker_run, census_store_3k, tmp_path, capsys):
    run = tmp_path / "stopped"
    rc, _ = _run_with_kill(census_store_3k, run, "--max-failures", "0")
    assert rc == 1 and "re-run the same command" in capsys.readouterr().err
    assert not (run / "model").exists()
    prepared = (run / "prepared" / "codes.npz").stat().st_mtime_ns
    assert _train(census_store_3k, run, 2, "--max-failures", "0") == 0
    assert (run / "prepared" / "codes.npz").stat().st_mtime_ns == prepared  # preparation not redone
    _assert_resumed_exactly(run, two_worker_run)


def test_a_rerun_with_other_training_settings_is_refused_and_changes_nothing(two_worker_run, census_store_3k, capsys):
    """Re-running a run folder resumes (or returns) what its checkpoints trained: other settings are an error, not
    the old model under a config.yaml that claims the new ones."""
    weights, config = _weights(two_worker_run), (two_worker_run / "model" / "config.yaml").read_text()
    n_records = len(_metrics(two_worker_run))
    assert _train(census_store_3k, two_worker_run, 2, "--set", "loss.classifier=ce", "--set", "train.num_threads=2") == 2
    err = capsys.readouterr().err
    assert "other training settings" in err and "loss.classifier: 'focal' -> 'ce'" in err and "num_threads" not in err
    assert (two_worker_run / "model" / "config.yaml").read_text() == config and len(_metrics(two_worker_run)) == n_records
    assert all(torch.equal(v, _weights(two_worker_run)[k]) for k, v in weights.items())
    from scpermut_dist.api import load_reference
    from scpermut_dist.errors import UsageError

    with pytest.raises(UsageError, match="training run folder; its model is"):  # `map --model RUN_DIR` says where
        load_reference(two_worker_run)


def test_a_run_whose_checkpoints_are_gone_says_how_to_start_over(ray_cluster, census_store_3k, tmp_path, capsys):
    """The latest checkpoint's state truncated, or Ray's run snapshot naming checkpoints deleted since: re-running
    cannot resume; the error says what to delete, and doing so trains again from the start."""
    import shutil

    run = tmp_path / "gone"
    assert _train(census_store_3k, run, 2, "--set", "train.max_epochs=1") == 0
    ray_run = run / "ray" / "scpermut"
    gone = sorted(d for d in ray_run.iterdir() if d.is_dir())
    assert gone  # the run's checkpoints
    summary = json.loads((run / "model" / "manifest.json").read_text())["summary"]  # counted as in-process train counts
    printed = capsys.readouterr().out
    assert f"trained on {summary['n_train_cells']} cells" in printed and f"validation ({summary['n_val_cells']} cells)" in printed
    state = gone[-1] / "train_state.pt"  # the latest checkpoint, truncated: each restart would fail on it
    state.write_bytes(state.read_bytes()[:100])
    assert _train(census_store_3k, run, 2, "--set", "train.max_epochs=1", "--max-failures", "0") == 2
    err = capsys.readouterr().err
    assert "cannot be resumed" in err and f"delete {ray_run}" in err and "re-run the same command" not in err
    for d in gone:
        shutil.rmtree(d)
    assert _train(census_store_3k, run, 2, "--set", "train.max_epochs=1") == 2
    err = capsys.readouterr().err
    assert "cannot be resumed" in err and f"delete {ray_run}" in err and "Traceback" not in err
    shutil.rmtree(ray_run)
    assert _train(census_store_3k, run, 2, "--set", "train.max_epochs=1") == 0
    assert [r["event"] for r in _metrics(run)].count("start") == 2  # started afresh, not resumed


@pytest.mark.parametrize("extra, message", [
    (["--workers", "0"], "at least 1 worker"),
    (["--set", "train.scheme=scheme99"], "train.scheme"),
    (["--label-key", "no_such_column"], "no_such_column"),
    (["--obs-filter", "tissue_general == 'brain'"], "no cell"),
])
def test_bad_runs_fail_before_any_worker_starts(census_store_3k, tmp_path, capsys, extra, message):
    run = tmp_path / "bad"
    args = ["train", "--store", str(census_store_3k), "--label-key", "cell_type", "--workers", "2",
            "--out", str(run), "--quiet", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err
    assert not (run / "workers").exists() and not (run / "ray").exists()


def test_an_unreachable_store_fails_before_any_worker_starts(tmp_path, capsys):
    assert main(["train", "--store", str(tmp_path / "nowhere"), "--label-key", "cell_type", "--workers", "2",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "run" / "workers").exists()


def test_an_ensemble_trains_member_by_member_on_the_same_workers(ray_cluster, census_store_3k, tmp_path):
    run = tmp_path / "ens"
    assert _train(census_store_3k, run, 2, "--set", "model.ensemble_size=2", "--set", "train.max_epochs=2") == 0
    records = _metrics(run)
    epochs = [r for r in records if r["event"] == "epoch_end"]
    assert [r["member"] for r in epochs] == sorted(r["member"] for r in epochs) and {0, 1} == {r["member"] for r in epochs}
    assert [r["event"] for r in records].count("member_end") == 1  # after member 0; the final report closes member 1
    manifest = json.loads((run / "model" / "manifest.json").read_text())
    assert manifest["ensemble_size"] == 2 and len(manifest["summary"]["members"]) == 2
    assert manifest["summary"]["members"][0]["seed"] != manifest["summary"]["members"][1]["seed"]


def test_a_run_on_an_existing_cluster_keeps_its_checkpoints_in_the_storage_path(ray_cluster, census_store_3k, tmp_path):
    """`--address` (another driver process joins this session's cluster, as on a real one) and `--storage-path`
    (Ray Train's checkpoints there, e.g. a shared volume, not under the run folder)."""
    import subprocess
    import sys

    from scpermut_dist.api import load_reference

    address = ray_cluster.get_runtime_context().gcs_address
    run, storage = tmp_path / "remote_run", tmp_path / "shared_volume"
    sets = [a for s in SMALL for a in ("--set", s)]
    res = subprocess.run([sys.executable, "-m", "scpermut_dist.commands.main", "train", "--store", str(census_store_3k),
                          "--label-key", "cell_type", "--workers", "1", "--address", address,
                          "--storage-path", str(storage), "--out", str(run), "--quiet", *sets,
                          "--set", "train.max_epochs=1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Ray cluster at {address}" in res.stdout
    assert any(d.name.startswith(("checkpoint", "final")) for d in (storage / "scpermut").iterdir())
    assert not (run / "ray").exists()  # nothing of Ray's under the run folder
    assert len(load_reference(run / "model").classes) > 1


def test_a_process_already_on_ray_keeps_its_session_and_says_an_address_is_unused(ray_cluster, tmp_path, caplog):
    """Library or notebook use: the caller's Ray session is used and never shut down here; an --address naming
    another cluster is not silently dropped."""
    import logging

    from launch.ray_session import ray_session

    current = ray_cluster.get_runtime_context().gcs_address
    with caplog.at_level(logging.WARNING, logger="launch.ray_session"):
        with ray_session(tmp_path, address=current) as where:
            assert where == f"existing Ray session ({current})"
        assert not caplog.records
        with ray_session(tmp_path, address="10.0.0.9:6379"):
            pass
    assert "10.0.0.9:6379 is not used" in caplog.text and current in caplog.text
    assert ray_cluster.is_initialized()  # not shut down: it is the caller's
