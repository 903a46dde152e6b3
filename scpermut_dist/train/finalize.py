"""What a trained reference gets fitted at the end of training, for mapping: calibration, reference
neighbours and the "unknown" rule (one function, for the in-process and the Ray driver paths alike).

- calibration: one temperature per ensemble member, fitted on that member's own validation cells
  (metrics["calibration"]: temperatures, ECE before/after, 15 bins);
- neighbours: a type-stratified sample of QC'd labelled reference cells embedded by member 0
  (extras["neighbors"], see mapping.neighbors);
- replay: a type-stratified sample of reference cells' raw counts (extras["replay"]), which
  `scpermut map --finetune` trains on beside the query (see mapping.finetune);
- unknown: class means and a shared covariance of the sample's latents, and thresholds on calibrated
  confidence and that distance fitted on member 0's validation cells (metrics["unknown"],
  extras["unknown"]; the class statistics include those cells, a negligible share of the sample).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from scpermut_dist.config import RunConfig
from scpermut_dist.mapping.calibration import (
    ECE_BINS,
    expected_calibration_error,
    fit_temperature,
    softmax,
)
from scpermut_dist.mapping.finetune import REPLAY_KEY, sample_replay
from scpermut_dist.mapping.neighbors import (
    DEFAULT_K,
    MAX_CELLS,
    NeighborIndex,
    neighbor_extra,
    sample_reference_cells,
)
from scpermut_dist.mapping.neighbors import EXTRA as NEIGHBORS
from scpermut_dist.mapping.predict import predict_logits, predict_proba
from scpermut_dist.mapping.reference import Reference
from scpermut_dist.mapping.unknown import DEFAULT_QUANTILE, ClassGaussians, fit_unknown
from scpermut_dist.mapping.unknown import EXTRA as UNKNOWN

log = logging.getLogger(__name__)
READ_CELLS = 4096  # cells read and densified at a time


def finalize_reference(ref: Reference, prep, splits, cfg: RunConfig, max_neighbor_cells: int = MAX_CELLS,
                       k: int = DEFAULT_K, quantile: float = DEFAULT_QUANTILE) -> Reference:
    """Fit calibration, the neighbour sample and the unknown rule into `ref` (metrics, extras); returns it.

    `prep`: a PreparedReference with an open source (the in-process one, or one opened on the Ray driver);
    `splits`: the members' MemberSplit (validation cells as source positions).
    """
    members = ref.members
    temps, before, after, sizes, val0 = [], [], [], [], None
    for member, split in zip(members, splits):
        x_ng, y = _read_cells(prep, split.val)
        _, logits = predict_logits(member, x_ng)
        t = fit_temperature(logits, y)
        temps.append(t), sizes.append(len(y))
        before.append(expected_calibration_error(softmax(logits), y))
        after.append(expected_calibration_error(softmax(logits, t), y))
        if val0 is None:
            val0 = (x_ng, y)
    cal = {"temperature": temps, "ece_before": _mean(before), "ece_after": _mean(after), "n_cells": int(sizes[0]),
           "bins": ECE_BINS, "fitted_on": "each member's validation cells"}
    if len(members) > 1:
        cal["members"] = [{"temperature": t, "ece_before": b, "ece_after": a, "n_cells": n}
                          for t, b, a, n in zip(temps, before, after, sizes)]
    ref.metrics["calibration"] = cal

    sample = sample_reference_cells(prep.label_codes, prep.cells, max_neighbor_cells, seed=cfg.train.seed)
    z_sample = _embed(members[0], prep, sample)
    label_codes, batch_codes = np.asarray(prep.label_codes), np.asarray(prep.batch_codes)
    ref.extras[NEIGHBORS] = neighbor_extra(z_sample, label_codes[sample], batch_codes[sample], sample)
    index = NeighborIndex.from_extra(ref.extras[NEIGHBORS])
    ref.extras[REPLAY_KEY] = sample_replay(prep.source, prep.cells, label_codes, batch_codes, prep.totals,
                                           seed=cfg.train.seed)

    x0, y0 = val0
    ref.metrics["neighbors"] = {"n_cells": len(sample), "k": int(k)}
    if len(y0) == 0:
        log.warning("no validation cells: the reference is mapped without an 'unknown' rule")
        return ref
    z0, p0 = predict_proba(members, x0, temperatures=temps)
    conf0 = p0.max(axis=1)
    vote = index.vote(z0, k, exclude_cells=np.asarray(splits[0].val))
    gaussians = ClassGaussians.fit(z_sample, label_codes[sample])
    dist0 = gaussians.distance(z0)
    rule, extra = fit_unknown(conf0, dist0, gaussians, quantile)
    ref.extras[UNKNOWN] = extra
    ref.metrics["unknown"] = {**rule.to_dict(), "distance_to": "nearest class mean (Mahalanobis, shared covariance)",
                              "val_flagged_fraction": float(rule.flag(conf0, dist0).mean())}
    ref.metrics["neighbors"].update(val_accuracy=float((vote.label == y0).mean()),
                                    val_agreement=float(vote.agreement.mean()))
    log.info("calibration: T=%s, ECE %.4f -> %.4f; unknown rule %s; %d reference neighbours",
             [round(t, 3) for t in temps], cal["ece_before"], cal["ece_after"], rule.to_dict(), len(sample))
    return ref


def _read_cells(prep, cells: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """All of `cells`, normalised by `read_validation` (the one place that normalises reference cells).

    read_validation reads this rank's shard `cells[rank::world]`; repeating every cell `world` times makes
    that shard all of `cells` on any rank (finalising is not a collective).
    """
    from loaders.sharding import dist_rank_world
    from scpermut_dist.train.reference import read_validation

    world = dist_rank_world()[1]
    val = read_validation(prep, np.repeat(np.asarray(cells), world))
    return val.x_ng, val.label_n.numpy()


def _embed(member, prep, cells: np.ndarray) -> np.ndarray:
    """Member 0's latent of `cells`, read in bounded chunks."""
    parts = [np.zeros((0, member.dims["latent_dim"]), np.float32)]
    for start in range(0, len(cells), READ_CELLS):
        x_ng, _ = _read_cells(prep, cells[start:start + READ_CELLS])
        parts.append(predict_logits(member, x_ng)[0])
    return np.concatenate(parts)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")
