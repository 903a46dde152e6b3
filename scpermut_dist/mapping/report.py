"""`scpermut map --report DIR`: a folder a biologist can open in a browser, written atomically.

    index.html     one page: model, gene overlap, thresholds, unknown cells, per-type counts, the plots
    umap.png       the query on the reference's UMAP (fitted on the checkpoint's `extras["neighbors"]` latent
                   sample, the query `transform`ed into it); without that sample, a UMAP of the query alone
    confidence.png histogram of the mapping confidence (unknown cells apart, thresholds marked)
    types.png      predicted-type counts
    report.json    the numbers of the page
The folder is built under a temporary sibling and swapped in with one rename, so a reader never sees half a
report; an existing folder is replaced only when it is an earlier report.
"""
from __future__ import annotations

import html
import json
import logging
import shutil
import uuid
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from scpermut_dist.errors import UsageError  # noqa: E402

log = logging.getLogger(__name__)
MARKER = "report.json"  # a folder holding it is a report this module may replace
PLOT_CELLS = 20_000  # query cells drawn (and transformed) at most: UMAP transform is the slow part
NEIGHBORS_KEY = "neighbors"
_LABEL_KEYS = ("label", "labels", "label_codes", "type", "types")


def check_report_dir(path: str | Path) -> Path:
    """Fail before any mapping when `path` cannot become a report folder."""
    out = Path(path).absolute()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--report {path}: exists and is a file; give a folder path (it is created)")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UsageError(f"--report {path}: the folder exists, is not empty and is not an earlier scpermut report; "
                         "give a new or empty folder")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--report {path}: {parent} is a file, so the folder cannot be created there")
    return out


def write_report(path: str | Path, result, ref, query_name: str = "", seed: int = 0) -> Path:
    """Write the report folder for `result` (a MappingResult) mapped with `ref` (a Reference)."""
    from scpermut_dist.mapping.checkpoint import swap_in

    out = check_report_dir(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        summary = _summary(result, ref, query_name)
        summary["umap"] = _umap_plot(result, ref, tmp / "umap.png", seed)
        _confidence_plot(result, summary["thresholds"], tmp / "confidence.png")
        _types_plot(summary["per_type"], tmp / "types.png")
        (tmp / "index.html").write_text(_html(summary), encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps(summary, indent=1, default=_json_default), encoding="utf-8")
        swap_in(tmp, out)
    finally:
        if tmp.exists():  # a failed write, or the previous report after the swap
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----- numbers ----------------------------------------------------------------------------------------------
def _summary(result, ref, query_name: str) -> dict:
    labels = np.asarray(result.labels).astype(str)
    conf = np.asarray(result.confidence, dtype=np.float64)
    unknown = _unknown(result, labels)
    agreement = getattr(result, "neighbor_agreement", None)
    frame = pd.DataFrame({"type": labels, "confidence": conf})
    if agreement is not None:
        frame["agreement"] = np.asarray(agreement, dtype=np.float64)
    grouped = frame.groupby("type", sort=False)
    per_type = pd.DataFrame({"cells": grouped.size(), "mean_confidence": grouped["confidence"].mean()})
    if agreement is not None:
        per_type["mean_neighbor_agreement"] = grouped["agreement"].mean()
    per_type = per_type.sort_values("cells", ascending=False)
    per_type["fraction"] = per_type["cells"] / max(len(labels), 1)
    info = ref.model_info() if hasattr(ref, "model_info") else {}
    return {
        "query": query_name, "model": ref.path or info.get("model", ""), "model_info": info,
        "n_cells": int(len(labels)),
        "genes": {"found": int(result.n_genes_found), "model": int(result.n_genes_model),
                  "fraction": result.n_genes_found / max(result.n_genes_model, 1), "matched_by": result.matched_by},
        "thresholds": _thresholds(result, ref),
        "unknown": None if unknown is None else {"cells": int(unknown.sum()), "fraction": float(unknown.mean())},
        "confidence": {"median": float(np.median(conf)) if len(conf) else float("nan"),
                       "below_0.5": float((conf < 0.5).mean()) if len(conf) else float("nan")},
        "per_type": [{"type": str(t), "cells": int(row["cells"]),
                      **{k: float(v) for k, v in row.items() if k != "cells"}} for t, row in per_type.iterrows()],
        "reference_types": list(ref.classes),
        "finetune": (ref.summary or {}).get("finetune"),
    }


def _unknown(result, labels: np.ndarray) -> np.ndarray | None:
    flag = getattr(result, "unknown", None)
    return None if flag is None else np.asarray(flag, dtype=bool)


def _thresholds(result, ref) -> dict:
    """Whatever abstention thresholds the result or the checkpoint carry (the mapping code owns their names)."""
    for source in (getattr(result, "thresholds", None), getattr(ref, "thresholds", None),
                   (ref.metrics or {}).get("thresholds"), (ref.summary or {}).get("thresholds")):
        if isinstance(source, dict) and source:
            return {str(k): _num(v) for k, v in source.items()}
        if source is not None and hasattr(source, "__dataclass_fields__"):
            from dataclasses import asdict

            return {str(k): _num(v) for k, v in asdict(source).items()}
    return {}


def _num(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


# ----- plots ------------------------------------------------------------------------------------------------
def _reference_sample(ref) -> tuple[np.ndarray, np.ndarray] | None:
    """(latent, type names) of the checkpoint's reference-neighbour sample, or None."""
    sample = (getattr(ref, "extras", None) or {}).get(NEIGHBORS_KEY)
    if not sample or "latent" not in sample:
        return None
    latent = np.asarray(sample["latent"], dtype=np.float32)
    key = next((k for k in _LABEL_KEYS if k in sample), None)
    if key is None:
        names = np.full(len(latent), "reference", dtype=object)
    else:
        codes = np.asarray(sample[key])
        if codes.dtype.kind in "iu":
            classes = np.asarray([*ref.classes, "unlabelled"], dtype=object)
            names = classes[np.where(codes >= 0, codes, len(ref.classes))]
        else:
            names = codes.astype(str)
    return latent, names


def _embed(ref_latent: np.ndarray | None, query_latent: np.ndarray, seed: int) -> tuple[np.ndarray | None, np.ndarray, str]:
    """UMAP fitted on the reference sample (or the query alone) and the query transformed; PCA if UMAP cannot run."""
    base = ref_latent if ref_latent is not None else query_latent
    if len(base) >= 10:
        try:
            import umap

            reducer = umap.UMAP(n_neighbors=min(15, len(base) - 1), random_state=seed, n_jobs=1).fit(base)
            xy_ref = reducer.embedding_
            xy_q = reducer.transform(query_latent) if ref_latent is not None else xy_ref
            return (xy_ref if ref_latent is not None else None), xy_q, "UMAP"
        except Exception as exc:  # noqa: BLE001 - any failure falls back to PCA
            log.warning("UMAP failed (%s); plotting PCA instead", exc)
    from sklearn.decomposition import PCA

    n = min(2, base.shape[1], len(base))
    pca = PCA(n_components=n).fit(base)

    def two(x):
        y = pca.transform(x)
        return y if y.shape[1] == 2 else np.column_stack([y, np.zeros((len(y), 2 - y.shape[1]))])

    return (two(ref_latent) if ref_latent is not None else None), two(query_latent), "PCA"


def _umap_plot(result, ref, path: Path, seed: int) -> dict:
    latent = np.asarray(result.latent, dtype=np.float32)
    labels = np.asarray(result.labels).astype(str)
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(len(latent), size=PLOT_CELLS, replace=False)) if len(latent) > PLOT_CELLS \
        else np.arange(len(latent))
    sample = _reference_sample(ref)
    xy_ref, xy_q, how = _embed(None if sample is None else sample[0], latent[take], seed)
    cats = sorted(set(labels[take]) | (set(sample[1]) if sample is not None else set()))
    colors = _colors(cats)
    size_q = max(1.0, min(12.0, 3e4 / max(len(take), 1)))
    if sample is None:
        fig, ax = plt.subplots(figsize=(7.5, 6))
        _scatter(ax, xy_q, labels[take], colors, size_q)
        ax.set_title(f"{how} of the query alone (the checkpoint has no reference latent sample),\n"
                     "coloured by predicted type", fontsize=9)
        note = "the checkpoint carries no reference latent sample: the query is embedded alone"
    else:
        fig, axes = plt.subplots(1, 2, figsize=(14, 6), sharex=True, sharey=True)
        size_r = max(1.0, min(12.0, 3e4 / max(len(xy_ref), 1)))
        _scatter(axes[0], xy_ref, sample[1], colors, size_r)
        axes[0].set_title(f"reference sample ({len(xy_ref)} cells) on its {how}, by type", fontsize=9)
        axes[1].scatter(xy_ref[:, 0], xy_ref[:, 1], s=size_r, color="0.85", linewidths=0, label="reference")
        _scatter(axes[1], xy_q, labels[take], colors, size_q)
        axes[1].set_title(f"query ({len(take)} cells) projected onto it, by predicted type", fontsize=9)
        note = f"{how} fitted on {len(xy_ref)} reference cells, query cells transformed into it"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"method": how, "query_cells_drawn": int(len(take)), "reference_cells": 0 if sample is None
            else int(len(sample[0])), "note": note}


def _colors(cats: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
    out = {c: cmap(i % cmap.N) for i, c in enumerate(c for c in cats if c != "unknown")}
    out["unknown"] = (0.2, 0.2, 0.2, 1.0)
    return out


def _scatter(ax, xy: np.ndarray, values: np.ndarray, colors: dict, size: float) -> None:
    values = np.asarray(values).astype(str)
    for c in sorted(set(values)):
        m = values == c
        ax.scatter(xy[m, 0], xy[m, 1], s=size, color=colors.get(c, "k"), label=c, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(set(values)) <= 30:
        ax.legend(fontsize=7, markerscale=3, loc="best", frameon=False)


def _confidence_plot(result, thresholds: dict, path: Path) -> None:
    conf = np.asarray(result.confidence, dtype=np.float64)
    unknown = _unknown(result, np.asarray(result.labels).astype(str))
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0.0, 1.0, 41)
    if unknown is None:
        ax.hist(conf, bins=bins, color="tab:blue")
    else:
        ax.hist([conf[~unknown], conf[unknown]], bins=bins, stacked=True, color=["tab:blue", "0.3"],
                label=["assigned", "unknown"])
        ax.legend(fontsize=8, frameon=False)
    for name, value in thresholds.items():
        if "conf" in name.lower() and isinstance(value, (int, float)) and 0.0 <= value <= 1.0:
            ax.axvline(value, color="tab:red", linestyle="--", linewidth=1)
            ax.text(value, ax.get_ylim()[1] * 0.95, f" {name}={value:.2f}", color="tab:red", fontsize=7, va="top")
    ax.set_xlabel("confidence")
    ax.set_ylabel("cells")
    ax.set_title(f"mapping confidence of {len(conf)} cells", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _types_plot(per_type: list[dict], path: Path) -> None:
    names = [r["type"] for r in per_type][::-1]
    counts = [r["cells"] for r in per_type][::-1]
    colors = _colors(sorted(names))
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.35 * len(names) + 1.2)))
    ax.barh(range(len(names)), counts, color=[colors[n] for n in names])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i, c in enumerate(counts):
        ax.text(c, i, f" {c}", va="center", fontsize=7)
    ax.set_xlabel("cells")
    ax.set_title("predicted types", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----- page -------------------------------------------------------------------------------------------------
def _html(s: dict) -> str:
    e = html.escape
    g = s["genes"]
    rows = "".join(
        f"<tr><td>{e(r['type'])}</td><td>{r['cells']}</td><td>{r['fraction']:.1%}</td>"
        f"<td>{r['mean_confidence']:.3f}</td>"
        + (f"<td>{r['mean_neighbor_agreement']:.3f}</td>" if "mean_neighbor_agreement" in r else "") + "</tr>"
        for r in s["per_type"])
    agreement_head = "<th>mean neighbour agreement</th>" if s["per_type"] and \
        "mean_neighbor_agreement" in s["per_type"][0] else ""
    thresholds = "".join(f"<tr><td>{e(k)}</td><td>{e(_fmt(v))}</td></tr>" for k, v in s["thresholds"].items()) \
        or "<tr><td colspan=2>none stored in this checkpoint</td></tr>"
    unknown = "not computed by this version" if s["unknown"] is None else \
        f"{s['unknown']['cells']} cells ({s['unknown']['fraction']:.1%})"
    ft = s.get("finetune")
    finetune = "" if not ft else (
        f"<p>Fine-tuned on this query from <code>{e(str(ft.get('base_model', '')))}</code>: new batches "
        f"{e(', '.join(map(str, ft.get('new_batches', []))))}; {ft.get('n_replay_cells', 0)} replay cells.</p>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>scpermut mapping report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}
th{{background:#f3f3f3}}img{{max-width:100%;border:1px solid #eee;margin:0.5em 0}}</style></head><body>
<h1>scpermut mapping report</h1>
<table>
<tr><th>query</th><td>{e(s['query'])}</td></tr>
<tr><th>model</th><td><code>{e(str(s['model']))}</code></td></tr>
<tr><th>cells</th><td>{s['n_cells']}</td></tr>
<tr><th>gene overlap</th><td>{g['found']} of {g['model']} model genes ({g['fraction']:.1%}), matched by
{e(str(g['matched_by']))}</td></tr>
<tr><th>unknown</th><td>{unknown}</td></tr>
<tr><th>median confidence</th><td>{s['confidence']['median']:.3f}</td></tr>
</table>
{finetune}
<h2>Thresholds</h2><table>{thresholds}</table>
<h2>Predicted types</h2>
<table><tr><th>type</th><th>cells</th><th>fraction</th><th>mean confidence</th>{agreement_head}</tr>{rows}</table>
<img src="types.png" alt="predicted-type counts">
<h2>Query on the reference</h2><p>{e(s['umap']['note'])}.</p>
<img src="umap.png" alt="query on the reference UMAP">
<h2>Confidence</h2><img src="confidence.png" alt="confidence histogram">
<p>Reference types: {e(', '.join(s['reference_types']))}</p>
</body></html>
"""


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
