"""Ablation of the two loss choices the authors credit for rare types and batch mixing.

(a) focal loss (gamma=3, balanced alpha) vs plain cross-entropy (`loss.classifier=ce`,
    `loss.focal_alpha=none`): F1 of the rare cell types on a held-out query split;
(b) the DANN adversary (default `loss.dann_w`) vs none (`loss.dann_w=0`): batch-mixing entropy of
    the query split's latent (and type silhouette, to see what mixing costs);
(c) the balanced focal alpha unbounded (n / (K n_c), ~42 for a 0.1 % type of 24; the default caps it at 50) vs
    capped (`loss.focal_alpha_max`, ALPHA_CAP): does bounding an atlas-rare type's weight cost its F1? With
    `rare_ref_cells` the reference keeps only that many cells of each rare type (the rest join the query), so
    alpha reaches the hundreds an atlas gives a type of a few hundred cells among millions, at a size that trains
    in minutes.

Honesty: one generated data set (fixed data seed), one stratified reference/query split, the same
training seeds and the same config for every variant except the one key under test. The query
split holds cells of every batch, so its latent can be scored for mixing; its labels are used only
to score. "Rare" = types with < 1 % of the reference cells and at least one query cell; per size bin
(reference frequency < 0.1 %, 0.1-1 %, ...) the mean F1 of the bin's types is reported too.

Rare types: by default each planted rare type is a *subtype* of a common type (its parent's program plus
~8 % private up-markers, `RARE_SUBTYPE_MARKERS`), the confusable regime in which imbalance hurts a classifier
and the authors credit focal loss. `rare_subtype_markers=None` plants types with their own full programs
instead: those separate so well that plain cross-entropy already finds them (see the README's numbers).
Mixing is reported twice: globally and within each true type (see `metrics`), since batches hold types in
different proportions. Batch effects are twice the generator's own (`BATCH_STRENGTH`): at its mild default the
permutation, whose partners come from other batches, already mixes batches within types and the adversary has
nothing left to remove (README numbers).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import anndata as ad
import numpy as np

from scpermut_dist.evaluation import metrics
from scpermut_dist.json_report import write_json

log = logging.getLogger(__name__)

LABEL, BATCH = "cell_type", "batch"
VARIANTS = {  # name -> config overrides on top of the shared base
    "focal_dann": [],
    "ce_dann": ["loss.classifier=ce", "loss.focal_alpha=none"],
    "focal_no_dann": ["loss.dann_w=0"],
    "focal_capped_dann": [],  # + loss.focal_alpha_max=<alpha_cap>, set by run_ablation
}
COMPARISONS = {  # question -> the two variants it pairs (A, B)
    "focal": ("focal_dann", "ce_dann"),
    "dann": ("focal_dann", "focal_no_dann"),
    "alpha_cap": ("focal_dann", "focal_capped_dann"),
}
DEFAULT_RUN = ("focal", "dann")  # the comparisons a run without `only` makes
ALPHA_CAP = 10.0  # a 0.1 % type of 24 gets 10 instead of ~42; types above ~0.4 % keep their balanced weight
QUICK = {"n_cells": 3000, "n_genes": 300, "seeds": [0],
         "overrides": ["model.ensemble_size=1", "train.max_epochs=2", "data.n_hvg=200", "model.hidden_sizes=[64,32]", "model.latent_dim=16"]}
FULL = {"n_cells": 10000, "n_genes": 2000, "seeds": [0, 1, 2],
        "overrides": ["model.ensemble_size=1", "data.n_hvg=1000", "train.max_epochs=30", "train.patience=8"]}


RARE_FRACS = (0.001, 0.002, 0.004, 0.008)  # four planted rare types in 0.1-1 %, plus the power-law tail
RARE_SHARE = 0.01  # a type below this share of the reference is scored as rare
RARE_SUBTYPE_MARKERS = 0.08  # 1.5 %: no classifier finds them; distinct programs: plain CE already does
BATCH_STRENGTH = 2.0  # at 1 the permutation (partners from other batches) already removes batch: no DANN question


def make_dataset(n_cells: int, n_genes: int, seed: int = 0,
                 rare_subtype_markers: float | None = RARE_SUBTYPE_MARKERS,
                 batch_strength: float = BATCH_STRENGTH) -> ad.AnnData:
    """Imbalanced, batch-affected counts from the project's Census-like generator: one tissue studied in several
    datasets (batches), so every batch holds every type. Across tissues types would be confounded with batch,
    and removing batch information would then also remove type information: a different question."""
    from loaders.synth import synthesize_anndata

    return synthesize_anndata(n_cells, n_genes, seed=seed, n_tissues=1, rare_fracs=RARE_FRACS,
                              rare_subtype_markers=rare_subtype_markers, batch_strength=batch_strength)


def split_query(labels: np.ndarray, fraction: float = 0.25, seed: int = 0) -> np.ndarray:
    """Boolean query mask: `fraction` of each type (at least 1 cell, at most all but 1)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_q = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        mask[idx[:n_q]] = True
    return mask


def trim_rare_types(labels: np.ndarray, is_query: np.ndarray, rare: list[str], keep: int,
                    seed: int = 0) -> np.ndarray:
    """The query mask with every `rare` type's reference cells cut to `keep` (at random); the cut cells join the
    query, where they are scored. An atlas-rare type's share, and so its balanced alpha, without an atlas."""
    if keep < 1:
        raise ValueError(f"keep={keep}: a rare type needs at least one reference cell to be learnt")
    rng = np.random.default_rng(seed)
    is_query = is_query.copy()
    for c in rare:
        in_ref = np.flatnonzero((labels == c) & ~is_query)
        is_query[rng.permutation(in_ref)[keep:]] = True
    return is_query


def balanced_alpha_of(freq: dict[str, float]) -> dict[str, float]:
    """The focal alpha each type gets at these reference shares (the training loss's own `balanced_alpha`)."""
    from scpermut_dist.model.losses import balanced_alpha

    alpha = balanced_alpha(np.array(list(freq.values()), dtype=np.float64)).tolist()
    return {c: a for (c, q), a in zip(freq.items(), alpha) if q > 0}


def false_rare_calls(truth: np.ndarray, pred: np.ndarray, rare: list[str]) -> float:
    """Fraction of the other types' query cells called one of the `rare` types: what an overweighted rare class
    costs the others (NaN without rare types)."""
    others = ~np.isin(truth, rare)
    return float(np.isin(pred[others], rare).mean()) if rare and others.any() else float("nan")


def run_variant(ref: ad.AnnData, query: ad.AnnData, truth: np.ndarray, config, rare: list[str],
                freq: dict[str, float], quiet: bool) -> dict:
    """Train one variant on the reference, map the query, score it (`rare`: types scored as rare)."""
    from sklearn.metrics import precision_recall_fscore_support

    from scpermut_dist.api import fit

    t0 = time.perf_counter()
    model = fit(ref, label_key=LABEL, batch_key=BATCH, config=config, quiet=quiet)
    res = model.map(query)
    pred = np.asarray(res.labels).astype(str)
    m = metrics.classification_metrics(truth, pred)
    bins = metrics.size_bin_metrics(truth, pred, freq)
    lat = np.asarray(res.latent)
    batches = query.obs[BATCH].to_numpy()
    prec, rec, _, _ = precision_recall_fscore_support(truth, pred, labels=rare, zero_division=0) if rare else ([], [], 0, 0)
    return {
        "balanced_accuracy": m["balanced_accuracy"], "macro_f1": m["macro_f1"], "per_class_f1": m["per_class_f1"],
        "rare_f1_mean": float(np.mean([m["per_class_f1"][c] for c in rare])) if rare else float("nan"),
        "rare_precision": dict(zip(rare, map(float, prec))), "rare_recall": dict(zip(rare, map(float, rec))),
        "false_rare_calls": false_rare_calls(truth, pred, rare),
        "bin_0.1-1%_f1": bins["0.1-1%"]["macro_f1_of_types"] if "0.1-1%" in bins else float("nan"),
        "size_bin_f1": {b: v["macro_f1_of_types"] for b, v in bins.items()},
        "size_bin_balanced_accuracy": {b: v["balanced_accuracy"] for b, v in bins.items()},
        "query_batch_entropy": metrics.batch_mixing_entropy(lat, batches),
        "query_batch_entropy_within_type": metrics.batch_mixing_entropy_within_type(lat, batches, truth),
        "query_silhouette_label": metrics.silhouette_by_label(lat, truth),
        "seconds": time.perf_counter() - t0,
    }


def _stat(runs: list[dict], variant: str, key: str) -> dict:
    vals = np.array([r.get(key, np.nan) for r in runs if r["variant"] == variant], float)
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "per_seed": vals.tolist()}


def compare(runs: list[dict]) -> dict:
    """The comparisons whose two variants were run, paired by seed."""
    present = {r["variant"] for r in runs}

    def paired(a: str, b: str, key: str) -> dict:
        sa, sb = _stat(runs, a, key), _stat(runs, b, key)
        d = np.array(sa["per_seed"]) - np.array(sb["per_seed"])
        return {a: sa, b: sb, "delta_mean": float(d.mean()), "delta_per_seed": d.tolist(),
                "n_seeds_a_better": int((d > 0).sum())}

    metrics_of = {
        "focal": [("focal_vs_ce_rare_f1", "rare_f1_mean"), ("focal_vs_ce_bin_0.1-1%_f1", "bin_0.1-1%_f1"),
                  ("focal_vs_ce_balanced_accuracy", "balanced_accuracy")],
        "dann": [("dann_vs_no_dann_batch_entropy", "query_batch_entropy"),
                 ("dann_vs_no_dann_batch_entropy_within_type", "query_batch_entropy_within_type"),
                 ("dann_vs_no_dann_silhouette", "query_silhouette_label"),
                 ("dann_vs_no_dann_balanced_accuracy", "balanced_accuracy")],
        "alpha_cap": [("uncapped_vs_capped_rare_f1", "rare_f1_mean"),
                      ("uncapped_vs_capped_bin_0.1-1%_f1", "bin_0.1-1%_f1"),
                      ("uncapped_vs_capped_balanced_accuracy", "balanced_accuracy"),
                      ("uncapped_vs_capped_false_rare_calls", "false_rare_calls")],
    }
    return {name: paired(*COMPARISONS[question], key)
            for question, rows in metrics_of.items() if set(COMPARISONS[question]) <= present
            for name, key in rows}


def variant_overrides(only: str | None, alpha_cap: float = ALPHA_CAP) -> dict[str, list[str]]:
    """The variants a run trains (those of `only`, or of DEFAULT_RUN) and each one's own config overrides."""
    wanted = {v for q in (DEFAULT_RUN if only is None else (only,)) for v in COMPARISONS[q]}
    cap = {"focal_capped_dann": [f"loss.focal_alpha_max={alpha_cap}"]}
    if only == "alpha_cap":  # the unbounded arm stays unbounded whatever --config says
        cap["focal_dann"] = ["loss.focal_alpha_max=null"]
    return {v: extra + cap.get(v, []) for v, extra in VARIANTS.items() if v in wanted}


def run_ablation(out_dir: str | Path, *, quick: bool = False, seeds: list[int] | None = None,
                 n_cells: int | None = None, n_genes: int | None = None, overrides: list[str] | None = None,
                 config_path: str | None = None, progress: bool = True,
                 rare_subtype_markers: float | None = RARE_SUBTYPE_MARKERS, batch_strength: float = BATCH_STRENGTH,
                 only: str | None = None, alpha_cap: float = ALPHA_CAP, rare_ref_cells: int | None = None) -> dict:
    """Run the variants of DEFAULT_RUN (or the two of the comparison `only` names) for every seed; write ablation.json
    atomically into `out_dir` and return the report."""
    from tqdm.auto import tqdm

    from scpermut_dist.config import RunConfig

    preset = QUICK if quick else FULL
    seeds = seeds if seeds is not None else preset["seeds"]
    n_cells, n_genes = n_cells or preset["n_cells"], n_genes or preset["n_genes"]
    base = list(preset["overrides"]) + list(overrides or [])
    if only is not None and only not in COMPARISONS:
        raise ValueError(f"only={only!r}: choose one of {sorted(COMPARISONS)}")
    variants = variant_overrides(only, alpha_cap)
    configs = {v: RunConfig.from_yaml(config_path, overrides=base + extra) for v, extra in variants.items()}

    adata = make_dataset(n_cells, n_genes, seed=0, rare_subtype_markers=rare_subtype_markers,
                         batch_strength=batch_strength)
    labels = adata.obs[LABEL].astype(str).to_numpy()
    is_q = split_query(labels, seed=0)
    if rare_ref_cells is not None:
        first = metrics.reference_class_freq(labels[~is_q])
        is_q = trim_rare_types(labels, is_q, sorted(c for c, f in first.items() if f < RARE_SHARE), rare_ref_cells)
    ref, query_full = adata[~is_q].copy(), adata[is_q].copy()
    truth = query_full.obs[LABEL].astype(str).to_numpy()
    query = query_full.copy()
    query.obs = query.obs.drop(columns=[LABEL])
    freq = metrics.reference_class_freq(ref.obs[LABEL].astype(str).to_numpy())
    rare = sorted(c for c, f in freq.items() if f < RARE_SHARE and (truth == c).any())  # scorable rare types
    alpha = balanced_alpha_of(freq)

    runs = []
    bar = tqdm(total=len(seeds) * len(configs), desc="ablation", disable=not progress)
    for seed in seeds:
        for variant, cfg in configs.items():
            bar.set_postfix_str(f"seed {seed}: {variant}")
            cfg_s = cfg.apply_overrides([f"train.seed={seed}"])
            r = run_variant(ref, query, truth, cfg_s, rare, freq, quiet=not progress)
            runs.append({"variant": variant, "seed": seed, **r})
            bar.update(1)
    bar.close()
    report = {
        "dataset": {"generator": "loaders.synth.synthesize_anndata", "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars),
                    "n_ref": int(ref.n_obs), "n_query": int(query.n_obs), "class_freq_ref": freq,
                    "rare_subtype_markers": rare_subtype_markers, "batch_strength": batch_strength,
                    "rare_types": rare, "query_cells_per_rare_type": {c: int((truth == c).sum()) for c in rare},
                    "rare_ref_cells": rare_ref_cells, "alpha_max": max(alpha.values()),
                    "alpha_of_rare_type": {c: alpha[c] for c in rare},
                    "batches": sorted(map(str, adata.obs[BATCH].unique()))},
        "variants": {v: base + extra for v, extra in variants.items()},
        "seeds": seeds, "quick": quick, "runs": runs, "comparisons": compare(runs),
    }
    write_json(Path(out_dir) / "ablation.json", report, indent=2)
    return report


def format_table(report: dict) -> str:
    c = report["comparisons"]
    n_q = list(report["dataset"]["query_cells_per_rare_type"].values())
    markers = report["dataset"].get("rare_subtype_markers")
    kind = f"planted ones are subtypes, {markers:.0%} marker genes" if markers else "planted ones distinct"
    alpha_max = report["dataset"].get("alpha_max")
    trimmed = report["dataset"].get("rare_ref_cells")
    lines = [f"{len(n_q)} rare types (< 1 % of reference{f', {trimmed} reference cells each' if trimmed else ''}; "
             f"{min(n_q, default=0)}-{max(n_q, default=0)} query cells each; {kind}); "
             + (f"largest balanced alpha {alpha_max:.0f}; " if alpha_max else "") + f"seeds {report['seeds']}"]
    rows = [("rare-type F1 (mean)", "focal_vs_ce_rare_f1", "focal", "CE"),
            ("0.1-1% bin F1 (mean)", "focal_vs_ce_bin_0.1-1%_f1", "focal", "CE"),
            ("balanced accuracy", "focal_vs_ce_balanced_accuracy", "focal", "CE"),
            ("query batch entropy", "dann_vs_no_dann_batch_entropy", "DANN", "no DANN"),
            ("  within types", "dann_vs_no_dann_batch_entropy_within_type", "DANN", "no DANN"),
            ("query silhouette (type)", "dann_vs_no_dann_silhouette", "DANN", "no DANN"),
            ("balanced accuracy", "dann_vs_no_dann_balanced_accuracy", "DANN", "no DANN"),
            ("rare-type F1 (mean)", "uncapped_vs_capped_rare_f1", "unbounded", "capped"),
            ("0.1-1% bin F1 (mean)", "uncapped_vs_capped_bin_0.1-1%_f1", "unbounded", "capped"),
            ("balanced accuracy", "uncapped_vs_capped_balanced_accuracy", "unbounded", "capped"),
            ("others called rare", "uncapped_vs_capped_false_rare_calls", "unbounded", "capped")]
    lines.append(f"{'metric':<26}{'A':>9}{'value A':>18}{'B':>9}{'value B':>18}{'A-B':>9}")
    for title, key, a, b in rows:
        if key not in c:
            continue
        d = c[key]
        va, vb = [v for k, v in d.items() if isinstance(v, dict)]
        lines.append(f"{title:<26}{a:>9}{va['mean']:>11.4f} ±{va['std']:.3f}{b:>9}{vb['mean']:>11.4f} ±{vb['std']:.3f}"
                     f"{d['delta_mean']:>+9.4f}")
    return "\n".join(lines)


__all__ = ["run_ablation", "make_dataset", "split_query", "trim_rare_types", "balanced_alpha_of", "false_rare_calls", "compare", "format_table", "variant_overrides", "VARIANTS", "COMPARISONS", "ALPHA_CAP"]
