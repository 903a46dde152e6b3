"""The text tables `scpermut evaluate` prints: summary, per split, rare types, held-out type, calibration."""
from __future__ import annotations

import numpy as np

from scpermut_dist.evaluation.harness import HEADLINE


def _f(x, fmt: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, fmt)


def summary_table(report: dict) -> str:
    """Mean over splits per method, with the time to result (train + map one split)."""
    rows = [f"{'method':<20}" + "".join(f"{k:>20}" for k in HEADLINE) + f"{'s/fold':>10}"]
    for n in report["methods"]:
        m = report["mean"][n]
        rows.append(f"{n:<20}" + "".join(f"{m[k]:>13.4f} ±{m.get(k + '_std', 0):.3f}" for k in HEADLINE)
                    + f"{m.get('seconds', float('nan')):>10.1f}")
    seed_mean, seed_std = report["summary"].get("scpermut_seed_mean"), report["summary"].get("scpermut_seed_std")
    if seed_mean:
        rows.append(f"{'scpermut seed mean':<20}" + "".join(f"{seed_mean[k]:>13.4f} ±{seed_std[k]:.3f}" for k in HEADLINE)
                    + "  (± over seeds)")
    return "\n".join(rows)


def folds_table(report: dict) -> str:
    """Balanced accuracy and time to result (s) of each method on each split."""
    names = report["methods"]
    rows = [f"{'split':<24}" + "".join(f"{n[:22]:>24}" for n in names)]
    for f in report["folds"]:
        cells = [f"{_f(f['methods'][n].get('balanced_accuracy'))} / {f['methods'][n]['seconds']:7.1f}s"
                 for n in names]
        rows.append(f"{str(f['query_batch'])[:23]:<24}" + "".join(f"{c:>24}" for c in cells))
    return "balanced accuracy / time to result per split\n" + "\n".join(rows)


def rare_table(report: dict) -> str:
    """Pooled over splits: precision / recall / F1 of the rarest types, per method."""
    pooled, rare = report.get("pooled") or {}, report.get("rare_types") or {}
    if not pooled or not rare:
        return ""
    names = report["methods"]
    rows = [f"{'rare type (share)':<30}" + "".join(f"{n[:20]:>22}" for n in names)]
    for t, share in rare.items():
        cells = []
        for n in names:
            r = pooled[n]["rare_types"].get(t, {})
            cells.append(f"{_f(r.get('precision'), '.2f')}/{_f(r.get('recall'), '.2f')}/{_f(r.get('f1'), '.2f')}")
        sup = pooled[names[0]]["rare_types"].get(t, {}).get("support", 0)
        rows.append(f"{f'{t[:16]} ({share:.1%}, n={sup})':<30}" + "".join(f"{c:>22}" for c in cells))
    return "rare types, pooled over splits: precision/recall/F1\n" + "\n".join(rows)


def holdout_table(report: dict) -> str:
    h = report.get("holdout")
    if not h:
        return ""
    rows = [f"held-out type {h['type']!r}: AUROC of the unknown score, fraction of its cells labelled unknown",
            f"{'method':<20}{'score':>16}{'AUROC':>10}{'unknown':>10}"]
    for n in report["methods"]:
        m = h.get(n, {})
        rows.append(f"{n:<20}{m.get('score')!s:>16}{_f(m.get('auroc'), '.3f'):>10}"
                    f"{_f(m.get('fraction_novel_unknown'), '.3f'):>10}")
    return "\n".join(rows)


def calibration_table(report: dict) -> str:
    """ECE before/after calibration, where the trained references hold metrics['calibration']."""
    rows = []
    for f in report["folds"]:
        for n, m in f["methods"].items():
            cal = (m.get("info") or {}).get("calibration")
            if isinstance(cal, dict):
                eces = {k: v for k, v in cal.items() if "ece" in str(k).lower() and isinstance(v, (int, float))}
                if eces:
                    rows.append(f"{str(f['query_batch'])[:23]:<24}{n:<20}"
                                + "  ".join(f"{k}={v:.4f}" for k, v in eces.items()))
    parts = ["calibration (from the trained reference)\n" + "\n".join(rows)] if rows else []
    query = {n: c for n, c in (report.get("calibration") or {}).items() if "query_ece" in c}
    if query:
        parts.append("calibration on the query cells (mean over splits): confidence vs accuracy of each method's "
                     f"own calls\n{'method':<20}{'confidence':>12}{'accuracy':>10}{'ECE':>8}\n" + "\n".join(
                         f"{n:<20}{c['query_mean_confidence']:>12.3f}{c['query_accuracy']:>10.3f}{c['query_ece']:>8.3f}"
                         for n, c in query.items()))
    return "\n\n".join(parts)


def format_report(report: dict) -> str:
    parts = [summary_table(report), folds_table(report), rare_table(report), holdout_table(report),
             calibration_table(report)]
    return "\n\n".join(p for p in parts if p)
