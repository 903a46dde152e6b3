"""Does `map --finetune` help on a batch-shifted query? Kang 2018: reference = ctrl cells, query = stim cells.

Trains one reference on the ctrl cells (or reuses `--ref-cache`), stores a replay sample in it, maps the stim
cells before and after fine-tuning, and reports the query's balanced accuracy and the batch-mixing entropy of
reference vs query cells in the latent (metrics.batch_mixing_entropy, k=100; also within each true type).

    .venv/bin/python -m scpermut_dist.evaluation.finetune_check --seeds 0,1,2 --out results/finetune_check.json

Balanced accuracy is scored on the classifier's own labels (`labels_raw`, no abstention); the same with
"unknown" counted as wrong, and the unknown fraction, are reported too.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np

from scpermut_dist.json_report import write_json

KANG = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "kang2018_pbmc_ifnb_4samples.h5ad"


def mapping_scores(ref, ref_cells: ad.AnnData, query: ad.AnnData, label_key: str) -> dict:
    from scpermut_dist.evaluation import metrics

    r, q = ref.map(ref_cells, where="reference cells"), ref.map(query, where="query")
    latent = np.concatenate([r.latent, q.latent])
    side = np.array(["reference"] * len(r.latent) + ["query"] * len(q.latent))
    types = np.concatenate([ref_cells.obs[label_key].astype(str), query.obs[label_key].astype(str)])
    truth = query.obs[label_key].astype(str).to_numpy()
    # The classifier's own labels (argmax), then the labels with abstention ("unknown" counts as wrong).
    cls = metrics.classification_metrics(truth, _raw(q))
    unknown = getattr(q, "unknown", None)
    return {"query_balanced_accuracy": cls["balanced_accuracy"], "query_accuracy": cls["accuracy"],
            "query_macro_f1": cls["macro_f1"],
            "query_balanced_accuracy_with_unknown": metrics.classification_metrics(truth, q.labels)["balanced_accuracy"],
            "query_unknown_fraction": float(np.mean(unknown)) if unknown is not None else float("nan"),
            "reference_balanced_accuracy": metrics.classification_metrics(
                ref_cells.obs[label_key].astype(str).to_numpy(), _raw(r))["balanced_accuracy"],
            "mixing_entropy": metrics.batch_mixing_entropy(latent, side),
            "mixing_entropy_within_type": metrics.batch_mixing_entropy_within_type(latent, side, types)}


def _raw(result) -> np.ndarray:
    raw = getattr(result, "labels_raw", None)
    return result.labels if raw is None else raw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(KANG))
    p.add_argument("--seeds", default="0", help="reference training seeds, e.g. 0,1,2 (one reference each)")
    p.add_argument("--ref-cache", default=None, help="folder: references reused from / written to <folder>/seed<n>")
    p.add_argument("--set", action="append", default=[], help="reference config override (section.key=value)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--trains", default=None, help="comma-separated modules, e.g. encoder,decoder,dann")
    p.add_argument("--replay-cells", type=int, default=None)
    p.add_argument("--anchor-w", type=float, default=None)
    p.add_argument("--query-batch-keys", default="none,batch",
                   help="comma-separated: 'none' (the query is one new batch) and/or obs columns of the query")
    p.add_argument("--out", default=None, help="JSON file for the numbers")
    args = p.parse_args(argv)

    import torch

    from scpermut_dist.api import fit, load_reference
    from scpermut_dist.config import RunConfig
    from scpermut_dist.mapping.finetune import (
        REPLAY_KEY,
        REPLAY_MAX_CELLS,
        FinetuneSettings,
        finetune_reference,
        replay_from_anndata,
    )

    torch.set_num_threads(1)
    data = ad.read_h5ad(args.data)
    ref_cells = data[data.obs["condition"] == "ctrl"].copy()
    query = data[data.obs["condition"] == "stim"].copy()
    kw = {k: v for k, v in {"epochs": args.epochs, "lr": args.lr, "anchor_w": args.anchor_w}.items() if v is not None}
    if args.trains:
        kw["trains"] = tuple(args.trains.split(","))
    settings = FinetuneSettings(**kw)
    runs = []
    for seed in [int(x) for x in args.seeds.split(",")]:
        t0 = time.perf_counter()
        cache = Path(args.ref_cache) / f"seed{seed}" if args.ref_cache else None
        if cache is not None and (cache / "manifest.json").exists():
            ref = load_reference(cache)
        else:
            cfg = RunConfig().apply_overrides(["train.num_threads=1", f"train.seed={seed}", *args.set])
            ref = fit(ref_cells, "cell_type", "batch", config=cfg, out_dir=None)
            if cache is not None:
                ref.save(cache)
        train_s = time.perf_counter() - t0
        ref.extras = {**ref.extras, REPLAY_KEY: replay_from_anndata(
            ref_cells, ref, "cell_type", "batch", max_cells=args.replay_cells or REPLAY_MAX_CELLS)}
        before = mapping_scores(ref, ref_cells, query, "cell_type")
        for key in args.query_batch_keys.split(","):
            batch_key = None if key == "none" else key
            t1 = time.perf_counter()
            outcome = finetune_reference(ref, query, batch_key=batch_key, settings=settings)
            finetune_s = time.perf_counter() - t1
            after = mapping_scores(outcome.reference, ref_cells, query, "cell_type")
            info = outcome.reference.summary["finetune"]
            runs.append({"seed": seed, "query_batch_key": batch_key, "train_seconds": round(train_s, 1),
                         "finetune_seconds": round(finetune_s, 1), "before": before, "after": after,
                         "replay_balanced_accuracy": outcome.replay_accuracy,
                         "replay_latent_relative_shift": info["replay_latent_relative_shift"],
                         "d_balanced_accuracy": after["query_balanced_accuracy"] - before["query_balanced_accuracy"],
                         "d_mixing_entropy": after["mixing_entropy"] - before["mixing_entropy"]})
            print(f"seed {seed} query batches {key}: balanced accuracy {before['query_balanced_accuracy']:.3f} -> "
                  f"{after['query_balanced_accuracy']:.3f}, mixing entropy {before['mixing_entropy']:.3f} -> "
                  f"{after['mixing_entropy']:.3f} ({finetune_s:.1f} s)", flush=True)
    d_ba = np.array([r["d_balanced_accuracy"] for r in runs])
    d_mix = np.array([r["d_mixing_entropy"] for r in runs])
    report = {"data": args.data, "reference": "condition == ctrl", "query": "condition == stim",
              "n_reference": int(ref_cells.n_obs), "n_query": int(query.n_obs),
              "settings": runs[0] and outcome.reference.summary["finetune"]["settings"], "runs": runs,
              "mean_d_balanced_accuracy": float(d_ba.mean()), "min_d_balanced_accuracy": float(d_ba.min()),
              "mean_d_mixing_entropy": float(d_mix.mean()), "min_d_mixing_entropy": float(d_mix.min()),
              "balanced_accuracy_not_lower_on_mean": bool(d_ba.mean() >= 0),
              "balanced_accuracy_not_lower_in_every_run": bool((d_ba >= 0).all()),
              "mixing_raised_in_every_run": bool((d_mix > 0).all())}
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
