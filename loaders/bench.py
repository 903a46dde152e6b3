"""Loader benchmark: our paired stream vs. `tiledbsoma_ml.ExperimentDataset` on the same SOMA store.

Each loader runs in its own fresh subprocess (`python -m loaders.bench run CONFIG_JSON`), so peak RSS
values are separate. Measured per loader: cells/s over the streaming loop (a pair counts as one
cell), peak RSS, and the mean minibatch batch-label entropy relative to true random minibatches.
For ours also: partner same-type / other-batch fractions, partners found inside the IO pool, and
the total-variation distance between delivered and target class frequencies.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from loaders.mixing import batch_entropy_ratio
from loaders.sampling import DEFAULT_BLOCK_CELLS, DEFAULT_IO_BATCH_CELLS

RESULT_TAG = "BENCH_RESULT "


@dataclass(frozen=True)
class BenchConfig:
    store: str
    loader: str = "ours"  # "ours" | "tiledbsoma-ml"
    cells: int | None = None  # None = one full epoch
    batch_size: int = 430
    genes_first: int | None = None  # only the first G genes (var soma_joinid order)
    label_key: str = "cell_type"
    batch_keys: tuple[str, ...] = ("dataset_id",)
    obs_filter: str | None = None
    io_batch_cells: int = DEFAULT_IO_BATCH_CELLS
    block_cells: int = DEFAULT_BLOCK_CELLS
    prefetch: int = 1
    io_threads: int = 1
    tsml_batch_size: int | None = None  # tiledbsoma-ml minibatch size (None = its own default, 1)
    tiledb_mem_budget_mb: int | None = 256  # TileDB reader budget (sm.mem.total_budget); None = TileDB default
    balance: float = 0.0
    seed: int = 0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _cpu_s() -> float:
    """CPU seconds of this process, all threads (robust to other load on a shared machine, unlike wall time)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _selection(cfg: BenchConfig):
    from loaders.selection import CellSelection

    genes = None
    if cfg.genes_first:
        genes = tuple(_first_gene_ids(cfg.store, cfg.genes_first))
    return CellSelection(obs_value_filter=cfg.obs_filter, label_key=cfg.label_key, batch_keys=tuple(cfg.batch_keys),
                         genes=genes)


def _experiment(store: str):
    """(experiment, handle to close): a bare Experiment, or census_data/homo_sapiens of a Census collection."""
    import tiledbsoma

    obj = tiledbsoma.open(store, mode="r")
    if isinstance(obj, tiledbsoma.Experiment):
        return obj, obj
    return obj["census_data"]["homo_sapiens"], obj


def _first_gene_ids(store: str, g: int) -> list[str]:
    exp, handle = _experiment(store)
    try:
        var = exp.ms["RNA"].var.read(column_names=["soma_joinid", "feature_id"]).concat().to_pandas()
    finally:
        handle.close()
    return var.sort_values("soma_joinid")["feature_id"].astype(str).tolist()[:g]


def run_ours(cfg: BenchConfig) -> dict:
    from loaders.dataset import PairedCellDataset
    from loaders.sampling import SamplingPlan
    from loaders.sources import spec_from_uri

    t0 = time.perf_counter()
    budget_mb = cfg.tiledb_mem_budget_mb or 10240  # 0/None: TileDB's own default (10 GiB)
    tiledb_config = {"sm.mem.total_budget": str(budget_mb * 2**20)}
    source = spec_from_uri(cfg.store, _selection(cfg), tiledb_config=tiledb_config).open()
    plan = SamplingPlan.from_source(source, balance=cfg.balance, seed=cfg.seed, cells_per_epoch=cfg.cells,
                                    block_cells=cfg.block_cells)
    ds = PairedCellDataset(source, plan, batch_size=cfg.batch_size, io_batch_cells=cfg.io_batch_cells,
                           prefetch=cfg.prefetch, io_threads=cfg.io_threads)
    setup_s, rss_setup = time.perf_counter() - t0, _rss_mb()
    codes, labels, n = [], [], 0
    t1, c1 = time.perf_counter(), _cpu_s()
    for b in ds:
        n += len(b)
        codes.append(b.batch_n.numpy())
        labels.append(b.label_n.numpy())
    stream_s, cpu_s = time.perf_counter() - t1, _cpu_s() - c1
    peak = _peak_rss_mb()
    out = {"cells": n, "minibatches": len(codes), "setup_s": setup_s, "stream_s": stream_s, "cells_per_s": n / stream_s,
           "cpu_s": cpu_s, "cells_per_cpu_s": n / cpu_s,
           "peak_rss_mb": peak, "rss_after_setup_mb": rss_setup, "n_cells_store": int(source.n_cells),
           "n_genes": int(source.n_genes)}
    weights = plan.cell_weights(plan.cells)
    out["batch_entropy_ratio"] = batch_entropy_ratio(codes, plan.batches[plan.cells], seed=1, weights=weights)
    out.update(_partner_stats(plan, cfg))
    lab = np.concatenate(labels)
    lab = lab[lab >= 0]
    got = np.bincount(lab, minlength=plan.n_classes) / max(len(lab), 1)
    out["class_balance_tv"] = float(0.5 * np.abs(got - plan.target_class_freq).sum())
    source.close()
    return out


def _partner_stats(plan, cfg: BenchConfig) -> dict:
    """Partner quality from the plan (the stream is its deterministic replay, see test_dataset)."""
    lay = plan.layout(0, cfg.batch_size, cfg.io_batch_cells)
    same = other = possible = inside = labelled = 0
    batches_per_class = _batches_per_class(plan)
    block = 1 if len(plan.cells) <= cfg.io_batch_cells else plan.block_cells
    for task in lay.rank_tasks(0):
        d = plan.draw(0, task, cfg.io_batch_cells)
        lab = plan.labels[d.anchors]
        m = lab >= 0
        a, p = d.anchors[m], d.partners[m]
        labelled += int(m.sum())
        same += int(np.sum(plan.labels[p] == lab[m]))
        other += int(np.sum(plan.batches[p] != plan.batches[a]))
        possible += int(np.sum(batches_per_class[lab[m]] >= 2))
        inside += int(np.isin(p, plan.pool_cells(task, block)).sum())
    return {"partner_same_type_frac": same / max(labelled, 1), "partner_other_batch_frac": other / max(labelled, 1),
            "partner_other_batch_possible_frac": possible / max(labelled, 1),
            "partner_in_pool_frac": inside / max(labelled, 1)}


def _batches_per_class(plan) -> np.ndarray:
    lab, bat = plan.labels[plan.cells], plan.batches[plan.cells]
    m = lab >= 0
    pairs = np.unique(lab[m].astype(np.int64) * (int(bat.max()) + 1) + bat[m])
    return np.bincount(pairs // (int(bat.max()) + 1), minlength=plan.n_classes)


def run_tiledbsoma_ml(cfg: BenchConfig) -> dict:
    import tiledbsoma
    import tiledbsoma_ml

    t0 = time.perf_counter()
    exp, handle = _experiment(cfg.store)
    var_q = tiledbsoma.AxisQuery(coords=(slice(0, cfg.genes_first - 1),)) if cfg.genes_first else tiledbsoma.AxisQuery()
    obs_q = tiledbsoma.AxisQuery(value_filter=cfg.obs_filter) if cfg.obs_filter else tiledbsoma.AxisQuery()
    keys = list(cfg.batch_keys)
    with exp.axis_query("RNA", obs_query=obs_q, var_query=var_q) as query:
        bs = cfg.tsml_batch_size or 1
        ds = tiledbsoma_ml.ExperimentDataset(query, layer_name="raw", obs_column_names=["soma_joinid", *keys],
                                             batch_size=bs, seed=cfg.seed)  # other options: its defaults
        setup_s, rss_setup = time.perf_counter() - t0, _rss_mb()
        codes, n = [], 0
        t1, c1 = time.perf_counter(), _cpu_s()
        for x, obs in ds:
            n += len(obs)
            if bs > 1:  # with single cells, only count (recording obs per cell would dominate the loop)
                codes.append(_combine(obs, keys))
            if cfg.cells is not None and n >= cfg.cells:
                break
        stream_s, cpu_s = time.perf_counter() - t1, _cpu_s() - c1
        peak = _peak_rss_mb()
        all_obs = query.obs(column_names=keys).concat().to_pandas()
    handle.close()
    ratio = batch_entropy_ratio(codes, _combine(all_obs, keys), seed=1) if codes else None
    return {"cells": n, "minibatches": len(codes), "setup_s": setup_s, "stream_s": stream_s, "cells_per_s": n / stream_s,
            "cpu_s": cpu_s, "cells_per_cpu_s": n / cpu_s, "peak_rss_mb": peak, "rss_after_setup_mb": rss_setup, "batch_entropy_ratio": ratio,
            "n_cells_store": int(len(all_obs)), "x_shape": list(np.shape(x)),
            "batch_size": bs, "options": "its defaults (io_batch_size=65536, shuffle_chunk_size=64, shuffle=True, "
                                         "use_eager_fetch=True, dense X)" + ("" if bs == 1 else f" except batch_size={bs}")}


def _combine(obs, keys: list[str]) -> np.ndarray:
    vals = obs[keys[0]].astype(str).to_numpy()
    for k in keys[1:]:
        vals = np.char.add(np.char.add(vals.astype(str), "+"), obs[k].astype(str).to_numpy().astype(str))
    return vals


def run_in_subprocess(cfg: BenchConfig, timeout: float | None = None) -> dict:
    """Run one loader in a fresh interpreter (separate peak RSS); returns its result dict."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-m", "loaders.bench", "run", json.dumps(asdict(cfg))], env=env,
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"benchmark of {cfg.loader} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def warm_page_cache(store: str, max_bytes: int | None = None) -> int:
    """Read every file of a local store once so no loader pays (or gains from) cold-disk reads first."""
    import psutil

    limit = max_bytes if max_bytes is not None else psutil.virtual_memory().available // 2
    total = 0
    for root, _, files in os.walk(store):
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            if total + size > limit:
                return total
            with open(path, "rb") as fh:
                while fh.read(1 << 24):
                    pass
            total += size
    return total


LOADERS = ("ours", "tiledbsoma-ml", "tiledbsoma-ml-matched")


def loader_config(cfg: BenchConfig, name: str) -> BenchConfig:
    """"tiledbsoma-ml": its defaults (minibatch of 1 cell); "-matched": our minibatch size, a stricter baseline."""
    if name == "tiledbsoma-ml-matched":
        return replace(cfg, loader="tiledbsoma-ml", tsml_batch_size=cfg.batch_size)
    return replace(cfg, loader=name)


def compare(cfg: BenchConfig, sweep: list[tuple[int, int]] = (), rss_store: str | None = None,
            loaders: tuple[str, ...] = LOADERS, log=print) -> dict:
    """Run each loader on the same store, plus optional block/pool sweeps and a second-store RSS check."""
    report: dict = {"config": asdict(cfg), "load_average_at_start": list(os.getloadavg()), "results": {}}
    if os.path.isdir(cfg.store):
        report["page_cache_warmed_bytes"] = warm_page_cache(cfg.store)
    for name in loaders:
        log(f"[bench] {name} ...")
        report["results"][name] = run_in_subprocess(loader_config(cfg, name))
    res = report["results"]
    for base, suffix in (("tiledbsoma-ml", ""), ("tiledbsoma-ml-matched", "_matched_batch")):
        if "ours" in res and base in res:
            report["ratio_cells_per_s" + suffix] = res["ours"]["cells_per_s"] / res[base]["cells_per_s"]
            report["ratio_cells_per_cpu_s" + suffix] = res["ours"]["cells_per_cpu_s"] / res[base]["cells_per_cpu_s"]
    report["sweep"] = []
    for block, pool in sweep:
        log(f"[bench] ours block_cells={block} io_batch_cells={pool} ...")
        r = run_in_subprocess(replace(cfg, loader="ours", block_cells=block, io_batch_cells=pool))
        report["sweep"].append({"block_cells": block, "io_batch_cells": pool, **{k: r[k] for k in (
            "cells_per_s", "cells_per_cpu_s", "batch_entropy_ratio", "peak_rss_mb", "partner_in_pool_frac", "partner_other_batch_frac")}})
    if rss_store:
        log(f"[bench] ours on {rss_store} (memory boundedness) ...")
        if os.path.isdir(rss_store):
            warm_page_cache(rss_store)
        other = run_in_subprocess(replace(cfg, loader="ours", store=rss_store))
        base = res.get("ours") or run_in_subprocess(replace(cfg, loader="ours"))
        report["rss_compare"] = {
            "stores": {cfg.store: base["n_cells_store"], rss_store: other["n_cells_store"]},
            "peak_rss_mb": [base["peak_rss_mb"], other["peak_rss_mb"]],
            "rss_after_setup_mb": [base["rss_after_setup_mb"], other["rss_after_setup_mb"]],
            "peak_ratio": other["peak_rss_mb"] / base["peak_rss_mb"],
            "streaming_delta_mb": [base["peak_rss_mb"] - base["rss_after_setup_mb"],
                                   other["peak_rss_mb"] - other["rss_after_setup_mb"]]}
    report["load_average_at_end"] = list(os.getloadavg())
    return report


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "run":
        print("usage: python -m loaders.bench run CONFIG_JSON", file=sys.stderr)
        return 2
    raw = json.loads(argv[1])
    raw["batch_keys"] = tuple(raw["batch_keys"])
    cfg = BenchConfig(**raw)
    import torch

    torch.set_num_threads(1)
    result = run_ours(cfg) if cfg.loader == "ours" else run_tiledbsoma_ml(cfg)
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
