"""`scpermut bench ablation`: focal loss vs cross-entropy (rare types) and DANN vs none (batch mixing)."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "ablation", help="focal vs CE (rare-type F1) and DANN vs none (batch entropy) on generated data",
        description="Trains three scPermut variants (focal+DANN, CE+DANN, focal without DANN; with --only "
                    "alpha_cap: focal+DANN with its class weights unbounded vs capped) on the same "
                    "generated, imbalanced, batch-affected data with the same seeds; scores a held-out query "
                    "split; prints a table and writes OUT/ablation.json.")
    p.add_argument("--out", required=True, help="folder for ablation.json")
    p.add_argument("--quick", action="store_true", help="tiny data and 2-epoch stages (smoke test, minutes)")
    p.add_argument("--seeds", help="comma-separated training seeds (default: 0 quick, 0,1,2 full)")
    p.add_argument("--n-cells", type=int, help="generated cells (default 3000 quick, 10000 full)")
    p.add_argument("--n-genes", type=int, help="generated genes (default 300 quick, 2000 full)")
    p.add_argument("--rare-markers", default=None, metavar="FRAC|distinct",
                   help="planted rare types are subtypes of a common type with this fraction of genes as private "
                        "markers (default 0.08); 'distinct' gives them their own full programs (easy to find)")
    p.add_argument("--batch-strength", type=float, default=None, metavar="S",
                   help="scale of the generated assay/dataset/donor effects (default 2: batches that "
                        "permutation alone does not remove; 1 = the generator's own, mild effects)")
    p.add_argument("--only", choices=["focal", "dann", "alpha_cap"],
                   help="run just the two variants of one comparison (focal: focal vs CE; dann: DANN vs none; "
                        "alpha_cap: the balanced focal alpha unbounded vs capped at --alpha-cap; only run when "
                        "named), e.g. to add seeds to it")
    p.add_argument("--alpha-cap", type=float, default=None, metavar="A",
                   help="with --only alpha_cap: the cap on a class's focal alpha (mean 1) of the capped variant "
                        "(default 10)")
    p.add_argument("--rare-ref-cells", type=int, default=None, metavar="N",
                   help="the reference keeps only N cells of each rare type (< 1 %%), the rest join the query: "
                        "balanced alphas in the hundreds, as an atlas gives a type of a few hundred cells "
                        "among millions (with --only alpha_cap)")
    p.add_argument("--config", help="base scPermut config (YAML) shared by all variants")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every variant, e.g. --set train.max_epochs=10 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scpermut_dist.commands.main import parse_seeds
    from scpermut_dist.errors import UsageError
    from scpermut_dist.evaluation import ablation

    seeds = parse_seeds(args.seeds)
    for name in ("n_cells", "n_genes"):
        if getattr(args, name) is not None and getattr(args, name) < 50:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 50")
    markers = ablation.RARE_SUBTYPE_MARKERS
    if args.rare_markers is not None:
        try:
            markers = None if args.rare_markers == "distinct" else float(args.rare_markers)
        except ValueError:
            raise UsageError(f"--rare-markers {args.rare_markers!r}: give a fraction in (0, 1] or 'distinct'") from None
        if markers is not None and not 0 < markers <= 1:
            raise UsageError(f"--rare-markers {markers}: the fraction of marker genes must be in (0, 1]")
    strength = ablation.BATCH_STRENGTH if args.batch_strength is None else args.batch_strength
    if not strength > 0:
        raise UsageError(f"--batch-strength {strength}: must be > 0")
    cap = ablation.ALPHA_CAP if args.alpha_cap is None else args.alpha_cap
    if not cap > 0:
        raise UsageError(f"--alpha-cap {cap}: must be > 0 (the mean class weight is 1)")
    if args.alpha_cap is not None and args.only != "alpha_cap":
        raise UsageError("--alpha-cap sets the capped variant of --only alpha_cap; add --only alpha_cap")
    if args.rare_ref_cells is not None and args.rare_ref_cells < 1:
        raise UsageError(f"--rare-ref-cells {args.rare_ref_cells}: a rare type needs at least one reference cell")
    tested = {"loss.classifier", "loss.focal_alpha", "loss.dann_w"} | (
        {"loss.focal_alpha_max"} if args.only == "alpha_cap" else set())  # other runs may set a cap for all arms
    clash = [o for o in args.overrides if o.split("=", 1)[0].strip() in tested]
    if clash:
        raise UsageError(f"--set {clash}: these keys are what the ablation varies; leave them to the variants")
    report = ablation.run_ablation(args.out, quick=args.quick, seeds=seeds, n_cells=args.n_cells,
                                   n_genes=args.n_genes, overrides=args.overrides, config_path=args.config,
                                   progress=not args.quiet, rare_subtype_markers=markers,
                                   batch_strength=strength, only=args.only, alpha_cap=cap,
                                   rare_ref_cells=args.rare_ref_cells)
    print(ablation.format_table(report))
    print(f"written {args.out}/ablation.json")
    return 0
