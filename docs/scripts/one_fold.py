"""One leave-one-batch-out fold of the scPermut default, per training seed: when a question is about one fold.

Scored as `scpermut evaluate` scores it (the argmax before abstention, `labels_raw`), plus the fraction the
unknown rule abstains on.

    python docs/scripts/one_fold.py --h5ad stress/kang_chem.h5ad --label-key cell_type --query-batch stim107 \
        --seeds 0,1,2 [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import time

import anndata as ad
import numpy as np
from sklearn.metrics import balanced_accuracy_score

from scpermut_dist.api import fit
from scpermut_dist.config import RunConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--h5ad", required=True)
    p.add_argument("--label-key", required=True)
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--query-batch", required=True)
    p.add_argument("--seeds", default="0")
    p.add_argument("--set", dest="overrides", action="append", default=["train.num_threads=1"])
    args = p.parse_args()
    a = ad.read_h5ad(args.h5ad)
    a.obs[args.batch_key] = a.obs[args.batch_key].astype(str)
    is_query = (a.obs[args.batch_key] == args.query_batch).to_numpy()
    ref, query = a[~is_query].copy(), a[is_query].copy()
    truth = query.obs.pop(args.label_key).astype(str).to_numpy()
    scores = []
    for seed in map(int, args.seeds.split(",")):
        t0 = time.perf_counter()
        cfg = RunConfig().apply_overrides([*args.overrides, f"train.seed={seed}"])
        res = fit(ref, label_key=args.label_key, batch_key=args.batch_key, config=cfg, quiet=True).map(query)
        scores.append(balanced_accuracy_score(truth, np.asarray(res.labels_raw).astype(str)))
        print(f"seed {seed}: balanced accuracy {scores[-1]:.4f}, unknown {np.mean(res.unknown):.3f}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    print(f"mean {np.mean(scores):.4f} ± {np.std(scores):.4f}")


if __name__ == "__main__":
    main()
