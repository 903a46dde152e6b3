"""Time to result of the default ensemble: members in turn (every core each) vs side by side (train.parallel).

Both arms train the same reference with the same config but `train.parallel_members` (and, in turn, torch's
default thread count, what a user gets without settings); with a held-out batch they also map it, so the
numbers are a user's time to result and the accuracy shows the model did not change. Arms alternate order
over repeats (ABBA...), since a machine's speed drifts within a run.
"""
from __future__ import annotations

import time
from pathlib import Path

import anndata as ad
import numpy as np

from scpermut_dist.config import RunConfig

ARMS = {"in_turn": ["train.parallel_members=1"], "side_by_side": ["train.parallel_members=auto"]}


def run_benchmark(adata: ad.AnnData, label_key: str, batch_key: str, query_batch: str | None, cfg: RunConfig,
                  out_dir: Path, repeats: int = 1, quiet: bool = False) -> dict:
    from scpermut_dist.api import fit
    from scpermut_dist.cpu import available_cores
    from scpermut_dist.json_report import write_json
    from scpermut_dist.train.parallel import member_processes

    ref, query, truth = _split(adata, label_key, batch_key, query_batch)
    runs = []
    for r in range(repeats):
        order = list(ARMS) if r % 2 == 0 else list(ARMS)[::-1]
        for arm in order:
            arm_cfg = cfg.apply_overrides(ARMS[arm])
            t0 = time.perf_counter()
            reference = fit(ref, label_key=label_key, batch_key=batch_key, config=arm_cfg, quiet=True)
            t_train = time.perf_counter() - t0
            run = {"arm": arm, "repeat": r, "train_s": t_train, "members": reference.summary["ensemble_size"],
                   "val_balanced_accuracy": reference.metrics.get("val_balanced_accuracy"),
                   "processes_threads": list(member_processes(arm_cfg.train, reference.summary["ensemble_size"]))}
            if query is not None:
                from sklearn.metrics import balanced_accuracy_score

                t1 = time.perf_counter()
                res = reference.map(query)
                run["map_s"] = time.perf_counter() - t1
                run["query_balanced_accuracy"] = balanced_accuracy_score(truth, np.asarray(res.labels_raw).astype(str))
            run["total_s"] = time.perf_counter() - t0
            runs.append(run)
            if not quiet:
                print(format_run(run), flush=True)
    report = {"cores": available_cores(), "query_batch": query_batch, "n_reference_cells": int(ref.n_obs),
              "runs": runs, "summary": summarise(runs)}
    write_json(out_dir / "bench_members.json", report, indent=2)
    return report


def _split(adata: ad.AnnData, label_key: str, batch_key: str, query_batch: str | None):
    if query_batch is None:
        return adata, None, None
    batches = adata.obs[batch_key].astype(str).to_numpy()
    if query_batch not in set(batches):
        from scpermut_dist.errors import UsageError

        raise UsageError(f"--query-batch {query_batch!r} is not a value of obs[{batch_key!r}]; "
                         f"values: {sorted(set(batches))}")
    is_query = batches == query_batch
    query = adata[is_query].copy()
    truth = query.obs.pop(label_key).astype(str).to_numpy()
    return adata[~is_query].copy(), query, truth


def summarise(runs: list[dict]) -> dict:
    """Per arm: median times and mean accuracies; the speed-up is in-turn time over side-by-side time."""
    out = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        out[arm] = {k: float(np.median([r[k] for r in mine])) for k in ("train_s", "total_s")}
        for k in ("val_balanced_accuracy", "query_balanced_accuracy"):
            if mine and mine[0].get(k) is not None:
                out[arm][k] = float(np.mean([r[k] for r in mine]))
    out["speedup_total"] = out["in_turn"]["total_s"] / out["side_by_side"]["total_s"]
    out["speedup_train"] = out["in_turn"]["train_s"] / out["side_by_side"]["train_s"]
    return out


def format_run(run: dict) -> str:
    acc = "".join(f", {k.replace('_', ' ')} {run[k]:.4f}" for k in ("val_balanced_accuracy", "query_balanced_accuracy")
                  if run.get(k) is not None)
    p, t = run["processes_threads"]
    how = f"{p} processes x {t} threads" if p > 1 else f"in turn, {t or 'default'} threads"
    return (f"{run['arm']:>12} (repeat {run['repeat']}, {run['members']} members, {how}): train {run['train_s']:.1f} s,"
            f" total {run['total_s']:.1f} s{acc}")


def format_summary(report: dict) -> str:
    s = report["summary"]
    lines = [f"{report['cores']} cores, {report['n_reference_cells']} reference cells"
             + (f", query batch {report['query_batch']}" if report["query_batch"] else "")]
    for arm in ARMS:
        acc = "".join(f", {k.replace('_', ' ')} {s[arm][k]:.4f}" for k in ("val_balanced_accuracy",
                      "query_balanced_accuracy") if k in s[arm])
        lines.append(f"{arm:>12}: train {s[arm]['train_s']:.1f} s, time to result {s[arm]['total_s']:.1f} s{acc}")
    lines.append(f"side by side runs at {s['speedup_total']:.2f}x the speed of in turn to a result "
                 f"({s['speedup_train']:.2f}x in training; above 1: faster)")
    return "\n".join(lines)
