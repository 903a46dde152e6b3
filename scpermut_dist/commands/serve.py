"""`scpermut serve`: host every checkpoint under a folder over HTTP (Ray Serve), behind a bearer token."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the references under a folder over HTTP (Ray Serve)",
                              description=__doc__.splitlines()[0],
                              epilog="Endpoints: GET /healthz; GET /v1/models; POST /v1/models/NAME/map with an "
                                     "h5ad file's bytes or JSON sparse counts as the body (?format=parquet for "
                                     "parquet). Every endpoint but /healthz needs `Authorization: Bearer TOKEN`.")
    p.add_argument("--models", required=True, metavar="DIR",
                   help="folder whose subfolders are checkpoints (`scpermut train --out DIR/NAME`); NAME is the model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--token-file", default=None, metavar="F",
                   help="file holding the API token (default: the SCPERMUT_TOKEN environment variable)")
    p.add_argument("--max-upload-mb", type=float, default=256.0, metavar="N",
                   help="largest request body accepted, in MiB (default 256); larger ones get 413")
    p.add_argument("--replicas", type=int, default=1, help="mapper replicas (default 1)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs (and torch threads) per mapper replica")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading

    from scpermut_dist.errors import UsageError
    from scpermut_dist.serve.auth import read_token, token_digest

    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: give a TCP port between 1 and 65535")
    digest = token_digest(read_token(args.token_file))
    try:
        import ray
        from ray import serve

        from scpermut_dist.serve.app import APP_NAME, build_app
    except ModuleNotFoundError as exc:
        raise UsageError(f"`scpermut serve` needs Ray Serve ({exc.name} is missing): "
                         'pip install "scpermut-dist[ray]"') from None
    application = build_app({"models": args.models, "token_sha256": digest, "max_upload_mb": args.max_upload_mb,
                             "mapper_replicas": args.replicas, "mapper_cpus": args.cpus_per_replica})
    ray.init(address=args.ray_address or os.environ.get("RAY_ADDRESS"), configure_logging=not args.quiet,
             logging_level="WARNING" if args.quiet else "INFO")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application, name=APP_NAME, route_prefix="/")
        if not args.quiet:
            print(f"serving the models under {args.models} at http://{args.host}:{args.port} "
                  "(GET /v1/models lists them); Ctrl-C stops", flush=True)
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
