"""`scpermut bench members`: both arms train and map the same held-out batch; bad options get clear errors."""
from __future__ import annotations

import json

import pytest
from model_data import CELLBENCH, TINY

from scpermut_dist.commands.main import main

SETS = [a for item in TINY for a in ("--set", item)]


def _bench(datasets_dir, out, *extra):
    return main(["bench", "members", "--h5ad", str(datasets_dir / CELLBENCH), "--label-key", "cell_line",
                 "--batch-key", "batch", "--obs-filter", "demuxlet_cls == 'SNG'", "--out", str(out), "--quiet",
                 *SETS, "--set", "model.ensemble_size=2", "--set", "train.num_threads=1", *extra])


def test_bench_members_times_both_arms_on_the_same_held_out_batch(datasets_dir, tmp_path, capsys):
    assert _bench(datasets_dir, tmp_path, "--query-batch", "CELseq2_5cl_p1") == 0
    report = json.loads((tmp_path / "bench_members.json").read_text())
    runs = {r["arm"]: r for r in report["runs"]}
    assert set(runs) == {"in_turn", "side_by_side"} and report["query_batch"] == "CELseq2_5cl_p1"
    assert runs["in_turn"]["processes_threads"] == [1, 1]
    assert runs["side_by_side"]["processes_threads"][0] == min(2, report["cores"])
    # one thread both ways: the same model, so the same accuracy on the held-out plate
    assert runs["in_turn"]["query_balanced_accuracy"] == runs["side_by_side"]["query_balanced_accuracy"] > 0.5
    s = report["summary"]
    assert s["speedup_total"] == pytest.approx(s["in_turn"]["total_s"] / s["side_by_side"]["total_s"])
    assert "the speed of in turn to a result" in capsys.readouterr().out


def test_bench_members_rejects_bad_options(datasets_dir, tmp_path, capsys):
    assert _bench(datasets_dir, tmp_path, "--query-batch", "plate9") == 2
    assert "not a value of obs['batch']" in capsys.readouterr().err
    assert _bench(datasets_dir, tmp_path, "--set", "train.parallel_members=2") == 2
    assert "sets it per arm" in capsys.readouterr().err
    assert not (tmp_path / "bench_members.json").exists()
