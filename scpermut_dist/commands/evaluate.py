"""`scpermut evaluate`: label transfer of scPermut against three baselines (logreg, kNN, CellTypist).

Protocols: leave-one-batch-out (default; with --holdout-type, one type removed from every reference),
or --semi-supervised FRACTION (the partly annotated atlas).
"""
from __future__ import annotations

import argparse

METHOD_NAMES = ("scpermut", "logreg_celltypist", "knn_pca", "celltypist")
ALIASES = {"logreg": "logreg_celltypist", "knn": "knn_pca"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="leave-one-batch-out (or semi-supervised) benchmark of scPermut vs baselines on an h5ad",
        description="For each batch: train on the other batches, map the held-out batch, score against its labels "
                    "(or, with --semi-supervised, hide labels and score the hidden cells). Prints mean scores and "
                    "time to result per method, per split, and the rare types' precision/recall/F1. "
                    "Writes OUT/metrics.json, OUT/predictions.csv and PNG plots.")
    p.add_argument("--h5ad", required=True, help="AnnData file with raw counts in X (or --layer)")
    p.add_argument("--label-key", required=True, help="obs column with the cell types")
    p.add_argument("--batch-key", required=True, help="obs column whose values define the folds")
    p.add_argument("--out", required=True, help="report folder (replaced atomically when complete)")
    p.add_argument("--config", help="scPermut run config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set train.max_epochs=5 (repeatable)")
    p.add_argument("--obs-filter", help="pandas query selecting cells, e.g. \"demuxlet_cls == 'SNG'\"")
    p.add_argument("--layer", help="layer holding raw counts (default: X; raw: the h5ad's .raw)")
    p.add_argument("--methods", default=",".join(METHOD_NAMES),
                   help=f"comma-separated subset of {','.join(METHOD_NAMES)} (default: all)")
    p.add_argument("--seeds", help="comma-separated training seeds for scPermut (default: the config's seed); "
                                   "with several, each seed is a method (scpermut, scpermut_seed<S>...) and the "
                                   "summary gives their mean, the honest comparison for a stochastic model")
    p.add_argument("--query-in-training", action="store_true",
                   help="the authors' transductive protocol: scPermut also trains on each fold's query cells, "
                        "unlabelled and as their own batch (the DANN warm-up aligns them); genes still come from "
                        "the reference and query labels are never read. Baselines are unchanged")
    p.add_argument("--semi-supervised", type=float, metavar="FRACTION",
                   help="the authors' partly-annotated-atlas protocol instead of LOBO: hide FRACTION (e.g. 0.7) of "
                        "the labels at random, stratified by batch and type; scPermut trains on all cells with "
                        "those unlabelled, baselines on the labelled cells only; the hidden cells are scored")
    p.add_argument("--mask-seeds", default="0",
                   help="with --semi-supervised: comma-separated seeds of the label masks, one split each (default 0)")
    p.add_argument("--holdout-type", metavar="TYPE",
                   help="LOBO with TYPE removed from every fold's reference: reports the AUROC of each method's "
                        "unknown score for TYPE's query cells and the fraction of them labelled unknown")
    p.add_argument("--finetune", action="store_true",
                   help="also report scpermut_finetuned: each fold's model adapted to its query batch as `map "
                        "--finetune` does (query = a new DANN class, replay of reference cells, classifier frozen)")
    p.add_argument("--no-umap", action="store_true", help="skip the latent UMAP plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    p.set_defaults(func=run)


def load_filtered(path: str, obs_filter: str | None, layer: str | None = None):
    """Read the h5ad into memory and keep the cells matching the filter, with clear errors."""
    from pathlib import Path

    import anndata as ad

    from loaders.errors import DataError
    from loaders.sources.anndata_source import counts_and_var
    from loaders.validate import check_raw_counts

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file. Pass an existing .h5ad with --h5ad.")
    try:
        adata = ad.read_h5ad(p)
    except Exception as exc:  # h5py/anndata raise many types for a broken file
        raise DataError(f"{p}: cannot be read as h5ad ({exc}).") from exc
    if layer:
        x, var = counts_and_var(adata, layer, str(p))
        adata = ad.AnnData(X=x, obs=adata.obs, var=var)  # `.raw` may hold more genes than X
    if obs_filter:
        try:
            keep = adata.obs.eval(obs_filter)
            keep = keep.to_numpy(dtype=bool)
        except Exception as exc:  # pandas raises many types for a bad expression
            raise DataError(f"{p}: bad --obs-filter {obs_filter!r}: {exc}. Use pandas query syntax over obs "
                            f"columns {sorted(map(str, adata.obs.columns))}.") from exc
        if not keep.any():
            raise DataError(f"{p}: --obs-filter {obs_filter!r} matches no cell.")
        adata = adata[keep].copy()
    check_raw_counts(adata.X, str(p))
    adata.obs_names_make_unique()
    adata.var_names_make_unique()
    return adata


def check_out_dir(out: str) -> None:
    """Refuse to replace a folder that is not a previous report (protects e.g. `--out .`)."""
    from pathlib import Path

    from scpermut_dist.errors import UsageError

    p = Path(out)
    if p.exists() and (not p.is_dir() or (any(p.iterdir()) and not (p / "metrics.json").exists())):
        raise UsageError(f"--out {p} exists and is not an earlier report folder; choose a new or empty folder.")


def run(args: argparse.Namespace) -> int:
    from scpermut_dist.commands.main import parse_seeds
    from scpermut_dist.errors import UsageError
    from scpermut_dist.evaluation import lobo as evaluate

    names = list(dict.fromkeys(ALIASES.get(m.strip(), m.strip()) for m in args.methods.split(",") if m.strip()))
    unknown = [m for m in names if m not in METHOD_NAMES]
    if unknown or not names:
        raise UsageError(f"--methods: unknown {unknown or 'empty list'}; choose from {','.join(METHOD_NAMES)} "
                         f"(aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    semi = args.semi_supervised
    if semi is not None:
        if not 0.0 < semi < 1.0:
            raise UsageError(f"--semi-supervised {semi}: give the fraction of labels to hide, between 0 and 1 "
                             "(e.g. 0.7)")
        if args.query_in_training or args.holdout_type:
            raise UsageError("--semi-supervised is its own protocol; leave out --query-in-training/--holdout-type")
    if args.finetune and (semi is not None or args.query_in_training):
        raise UsageError("--finetune adapts a reference-only model to its query: leave out --semi-supervised and "
                         "--query-in-training")
    try:
        mask_seeds = parse_seeds(args.mask_seeds) if semi is not None else None
    except UsageError:
        raise UsageError(f"--mask-seeds {args.mask_seeds!r}: give integers separated by commas, e.g. 0,1,2") from None
    if semi is not None and not mask_seeds:
        raise UsageError("--mask-seeds needs at least one seed, e.g. 0 or 0,1,2")
    check_out_dir(args.out)
    seeds = parse_seeds(args.seeds)
    if seeds is not None:
        seeds = list(dict.fromkeys(seeds))  # one method per distinct seed
        if not seeds or "scpermut" not in names:
            raise UsageError("--seeds needs at least one seed and scPermut among --methods")
    methods = {}
    cfg = None
    if "scpermut" in names:
        from scpermut_dist.config import RunConfig

        cfg = RunConfig.from_yaml(args.config, overrides=args.overrides)
        if seeds:
            cfg = cfg.apply_overrides([f"train.seed={seeds[0]}"])
        if semi is not None:
            from scpermut_dist.evaluation.semisupervised import (
                scpermut_semisupervised_method as make,
            )
        else:
            tr = args.query_in_training

            def make(c):
                return evaluate.scpermut_method(c, with_query=tr)
        runs = {"scpermut": cfg, **{f"scpermut_seed{s}": cfg.apply_overrides([f"train.seed={s}"])
                                    for s in (seeds or [])[1:]}}
        for name, c in runs.items():
            if args.finetune:
                keep: dict = {}
                methods[name] = evaluate.scpermut_method(c, keep=keep)
                methods[f"{name}_finetuned"] = evaluate.finetuned_method(c, keep)
            else:
                methods[name] = make(c)
    elif args.finetune:
        raise UsageError("--finetune needs scpermut in --methods")
    elif args.config or args.overrides:
        raise UsageError("--config/--set configure scPermut, which --methods leaves out")
    base = evaluate.baseline_methods()
    methods.update({n: base[n] for n in names if n in base})
    adata = load_filtered(args.h5ad, args.obs_filter, args.layer)
    meta = {"h5ad": str(args.h5ad), "obs_filter": args.obs_filter, "layer": args.layer,
            "config": cfg.model_dump(mode="json") if cfg is not None else None, "overrides": args.overrides,
            "seeds": seeds, "query_in_training": bool(args.query_in_training), "holdout_type": args.holdout_type}
    if semi is not None:
        from scpermut_dist.evaluation.semisupervised import run_semisupervised

        report = run_semisupervised(adata, args.label_key, args.batch_key, args.out, methods=methods, fraction=semi,
                                    mask_seeds=mask_seeds, plots_umap=not args.no_umap, progress=not args.quiet,
                                    meta=meta)
    else:
        report = evaluate.run_lobo(adata, args.label_key, args.batch_key, args.out, methods=methods,
                                   plots_umap=not args.no_umap, progress=not args.quiet, meta=meta,
                                   holdout_type=args.holdout_type)
    print(evaluate.format_table(report))
    print(f"report written to {args.out}")
    return 0
