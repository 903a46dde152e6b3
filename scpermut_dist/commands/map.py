"""`scpermut map`: annotate a query (h5ad, or a SOMA Experiment / Census streamed in chunks) with a trained reference."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("map", help="map a query (h5ad, SOMA Experiment or Census) onto a trained reference",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint folder written by `scpermut train`")
    p.add_argument("--query", required=True,
                   help="query with raw counts (no label or batch needed): an h5ad file, a SOMA Experiment or a "
                        "Census-shaped collection (streamed in chunks)")
    p.add_argument("--out", required=True,
                   help="output .h5ad, or .parquet (SOMA queries of any size, keyed by soma_joinid); written atomically")
    store = p.add_argument_group("SOMA / Census queries")
    store.add_argument("--obs-filter", default=None,
                       help="SOMA value_filter selecting the query cells, e.g. \"dataset_id == 'abc'\"")
    store.add_argument("--organism", default=None, help="with a Census-shaped --query: e.g. 'Homo sapiens' (default)")
    store.add_argument("--chunk-cells", type=int, default=None, help="cells read and mapped at a time (default 8192)")
    store.add_argument("--no-probabilities", action="store_true", help="parquet output: omit the p_<class> columns")
    p.add_argument("--layer", default=None, help="layer holding raw counts (default: X; raw: an h5ad's .raw, a SOMA store's X 'raw')")
    p.add_argument("--gene-key", default=None, metavar="COL",
                   help="var column naming the query's genes (Ensembl ids and/or symbols); default: var_names and "
                        "the usual id/symbol columns, matched gene by gene")
    p.add_argument("--min-gene-fraction", type=float, default=0.5, metavar="F",
                   help="refuse a query holding fewer than this fraction of the model's genes (default 0.5)")
    unknown = p.add_argument_group("abstention (\"unknown\"; thresholds fitted at training, in the checkpoint)")
    unknown.add_argument("--unknown-confidence", type=float, default=None, metavar="C",
                         help="label a cell 'unknown' below this calibrated confidence (0 disables this test)")
    unknown.add_argument("--unknown-quantile", type=float, default=None, metavar="Q",
                         help="label a cell 'unknown' beyond the Q quantile of validation cells' distance to the "
                              "reference neighbours (and, unless --unknown-confidence, below their 1-Q confidence "
                              "quantile); default 0.99")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    p.add_argument("--finetune", action="store_true",
                   help="first adapt the encoder to the query's batches (new DANN classes, classifier frozen) and map "
                        "with the adapted model, saved as a new checkpoint (the reference is never changed)")
    p.add_argument("--query-batch-key", default=None,
                   help="--finetune: query obs column of its batches (default: the whole query is one new batch)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="--finetune: epochs (default 10)")
    p.add_argument("--finetune-out", default=None,
                   help="--finetune: folder of the adapted checkpoint (default: <out stem>.finetuned_model next to --out)")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="also write an HTML report with plots to this folder (written atomically)")
    remote = p.add_argument_group("mapping on a server (`scpermut serve`)")
    remote.add_argument("--server", default=None, metavar="URL",
                        help="map on this scpermut server instead; --model is then the server's model name")
    remote.add_argument("--token-file", default=None,
                        help="--server: file holding the API token (default: $SCPERMUT_TOKEN)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from scpermut_dist.api import load_reference
    from scpermut_dist.errors import UsageError
    from scpermut_dist.mapping.output import read_h5ad, write_h5ad_atomic

    if not 0.0 <= args.min_gene_fraction <= 1.0:
        raise UsageError(f"--min-gene-fraction {args.min_gene_fraction}: give a fraction between 0 and 1")
    from scpermut_dist.mapping.unknown import check_confidence, check_quantile

    if args.unknown_confidence is not None:
        check_confidence(args.unknown_confidence)
    if args.unknown_quantile is not None:
        check_quantile(args.unknown_quantile)
    if getattr(args, "server", None):
        return _run_server(args)
    from scpermut_dist.cpu import set_torch_threads

    set_torch_threads()  # torch's count capped at a container's CPU quota
    if not (Path(args.query).is_file() or args.query.lower().endswith(".h5ad")):
        return _run_store(args)
    if args.obs_filter is not None or args.organism is not None:
        raise UsageError("--obs-filter and --organism apply to a SOMA Experiment / Census --query, not an h5ad file")
    out = Path(args.out)
    if out.suffix.lower() == ".parquet":
        raise UsageError("--out .parquet is for a SOMA Experiment / Census --query; an h5ad query writes an .h5ad")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give an .h5ad file path")
    if out.suffix.lower() != ".h5ad":
        raise UsageError(f"--out {out}: an h5ad query is written back annotated, as .h5ad; give a path ending in "
                         ".h5ad (the labels as a table: `adata.obs.filter(like='scpermut_').to_csv(...)`)")
    if args.report:
        from scpermut_dist.mapping.report import check_report_dir

        check_report_dir(args.report)
    if not args.finetune and (args.query_batch_key or args.finetune_epochs or args.finetune_out):
        raise UsageError("--query-batch-key, --finetune-epochs and --finetune-out need --finetune")
    if args.finetune:
        from scpermut_dist.mapping.finetune import (
            check_finetune_out,
            default_finetune_out,
        )

        finetune_out = check_finetune_out(args.finetune_out or default_finetune_out(out), args.model)
    ref = load_reference(args.model)
    query = read_h5ad(args.query, where=f"query {args.query}")
    if args.finetune:
        from scpermut_dist.mapping.finetune import finetune_for_map

        ref = finetune_for_map(ref, query, finetune_out, args.query_batch_key, args.finetune_epochs, args.layer,
                               where=f"query {args.query}", quiet=args.quiet, gene_key=args.gene_key,
                               min_gene_fraction=args.min_gene_fraction)
    t0 = time.perf_counter()
    result = ref.map(query, layer=args.layer, where=f"query {args.query}", gene_key=args.gene_key,
                     min_gene_fraction=args.min_gene_fraction, unknown_confidence=args.unknown_confidence,
                     unknown_quantile=args.unknown_quantile)
    seconds = time.perf_counter() - t0
    ref.annotate(query, result)
    write_h5ad_atomic(query, out)
    if args.report:
        from scpermut_dist.mapping.report import write_report

        write_report(args.report, result, ref, query_name=str(args.query))
    if not args.quiet:
        _print_mapped(query, out, f"mapped {query.n_obs} cells in {seconds:.2f} s "
                      f"({query.n_obs / max(seconds, 1e-9):.0f} cells/s); {result.n_genes_found}/"
                      f"{result.n_genes_model} model genes found by {result.matched_by}")
    return 0


def _print_mapped(query, out, headline: str) -> None:
    """The summary both h5ad paths (local and --server) print: headline, predicted-type counts, output."""
    counts = query.obs["scpermut_label"].value_counts()
    print(headline)
    print("predicted types: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    print(f"wrote {out}")


def _run_store(args: argparse.Namespace) -> int:
    """--query is a SOMA Experiment or Census-shaped collection: streamed (mapping/stream.py)."""
    import time

    from scpermut_dist.api import load_reference
    from scpermut_dist.errors import UsageError
    from scpermut_dist.mapping.stream import (
        DEFAULT_CHUNK_CELLS,
        check_output_path,
        map_store,
    )

    if args.chunk_cells is not None and args.chunk_cells < 1:
        raise UsageError("--chunk-cells must be >= 1")
    if args.finetune or args.report:
        raise UsageError("--finetune and --report need an h5ad --query (a SOMA query is streamed)")
    out = check_output_path(args.out)
    ref = load_reference(args.model)
    t0 = time.perf_counter()
    s = map_store(ref, args.query, out, obs_filter=args.obs_filter, organism=args.organism, layer=args.layer,
                  chunk_cells=args.chunk_cells or DEFAULT_CHUNK_CELLS, probabilities=not args.no_probabilities,
                  progress=not args.quiet, gene_key=args.gene_key, min_gene_fraction=args.min_gene_fraction,
                  unknown_confidence=getattr(args, "unknown_confidence", None),
                  unknown_quantile=getattr(args, "unknown_quantile", None))
    seconds = time.perf_counter() - t0
    if not args.quiet:
        print(f"mapped {s.n_cells} cells of {s.where} in {seconds:.2f} s ({s.n_cells / max(seconds, 1e-9):.0f} "
              f"cells/s); {s.n_genes_found}/{s.n_genes_model} model genes found by {s.matched_by}")
        print("predicted types: " + ", ".join(f"{k} {v}" for k, v in s.label_counts.items() if v))
        print(f"wrote {s.out}")
    return 0


def _run_server(args: argparse.Namespace) -> int:
    """--server: send the h5ad query to `scpermut serve`, write its answer into the query (serve/client.py)."""
    import time
    from pathlib import Path

    from scpermut_dist.errors import UsageError
    from scpermut_dist.mapping.output import read_h5ad, write_h5ad_atomic
    from scpermut_dist.serve.auth import read_token
    from scpermut_dist.serve.client import ScpermutClient, annotate_from_frame

    out = Path(args.out)
    if out.suffix.lower() != ".h5ad" or out.is_dir():
        raise UsageError(f"--out {out}: with --server give an .h5ad file path")
    if args.finetune or args.report or args.obs_filter or args.organism:
        raise UsageError("--finetune, --report, --obs-filter and --organism run locally; drop --server for them")
    client = ScpermutClient(args.server, read_token(args.token_file))
    query = read_h5ad(args.query, where=f"query {args.query}")
    t0 = time.perf_counter()
    frame = client.map(args.model, Path(args.query), layer=args.layer)
    seconds = time.perf_counter() - t0
    annotate_from_frame(query, frame, args.server, args.model)
    write_h5ad_atomic(query, out)
    if not args.quiet:
        _print_mapped(query, out, f"mapped {query.n_obs} cells on {args.server} ({args.model}) in {seconds:.2f} s; "
                      f"{frame.attrs.get('n_genes_found')}/{frame.attrs.get('n_genes_model')} model genes found")
    return 0
