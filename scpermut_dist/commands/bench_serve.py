"""`scpermut bench serve`: requests/s and cells/s of `scpermut serve` with concurrent clients."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="server throughput (requests/s, cells/s) with concurrent clients",
        description="Starts `scpermut serve --models DIR` on a free local port (or uses --url), posts the first "
                    "--cells cells of --query as h5ad bytes from --clients threads, and prints throughput and "
                    "latency beside the in-process Reference.map rate.")
    p.add_argument("--models", default=None, help="checkpoint folders to serve (one subfolder per model)")
    p.add_argument("--url", default=None, help="an already running server instead (token: $SCPERMUT_TOKEN)")
    p.add_argument("--model", default=None, help="model name (default: the first the server lists)")
    p.add_argument("--query", required=True, help="query h5ad with raw counts")
    p.add_argument("--cells", type=int, default=1000, help="cells per request (default 1000)")
    p.add_argument("--clients", type=int, default=4, help="concurrent client threads (default 4)")
    p.add_argument("--requests", type=int, default=25, help="requests per client (default 25)")
    p.add_argument("--replicas", type=int, default=1, help="mapper replicas of the local server")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--json", dest="json_out", default=None, help="also write the numbers here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import contextlib
    import os
    from pathlib import Path

    from scpermut_dist.errors import UsageError
    from scpermut_dist.json_report import write_json
    from scpermut_dist.evaluation.bench_serve import check_answer, local_rate, local_server, measure, query_cells
    from scpermut_dist.mapping.output import read_h5ad
    from scpermut_dist.serve.client import ScpermutClient, h5ad_bytes

    if (args.models is None) == (args.url is None):
        raise UsageError("give --models DIR (a local server is started) or --url URL (a running one)")
    if min(args.cells, args.clients, args.requests) < 1:
        raise UsageError("--cells, --clients and --requests must be >= 1")
    query = query_cells(read_h5ad(args.query, where=f"query {args.query}"), args.cells)
    body = h5ad_bytes(query)
    local = round(local_rate(Path(args.models) / args.model, query), 1) if args.models and args.model else None
    server = (local_server(args.models, args.replicas, args.cpus_per_replica) if args.models
              else contextlib.nullcontext((args.url.rstrip("/"), os.environ.get("SCPERMUT_TOKEN", ""))))
    with server as (url, token):
        model = args.model or ScpermutClient(url, token).models()[0]["name"]
        numbers = measure(url, token, model, body, query.n_obs, args.clients, args.requests)
    first = numbers.pop("first_answer")
    if args.models:
        check_answer(first, Path(args.models) / model, query)
        numbers["local_reference_map_cells_per_s"] = local or round(local_rate(Path(args.models) / model, query), 1)
    numbers.update({"model": model, "replicas": args.replicas, "cpus_per_replica": args.cpus_per_replica,
                    "server": "local subprocess" if args.models else args.url})
    print(f"{numbers['clients']} clients x {args.requests} requests of {query.n_obs} cells on {model}: "
          f"{numbers['requests_per_s']} requests/s, {numbers['cells_per_s']:.0f} cells/s "
          f"(latency p50 {numbers['latency_p50_s']} s, p95 {numbers['latency_p95_s']} s, "
          f"{numbers['upload_mib']} MiB per upload)")
    if "local_reference_map_cells_per_s" in numbers:
        print(f"in-process Reference.map on the same cells: {numbers['local_reference_map_cells_per_s']:.0f} cells/s")
    if args.json_out:
        write_json(args.json_out, numbers)
        print(f"wrote {args.json_out}")
    return 0
