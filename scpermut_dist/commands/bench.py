"""`scpermut bench <name>`: benchmarks, each in its own module `scpermut_dist.commands.bench_<name>`."""
from __future__ import annotations

import importlib

BENCHMARKS = ("loader", "ablation", "train", "map", "serve", "members")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS),
                              description="Benchmarks that print numbers and write JSON.")
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name in BENCHMARKS:
        try:
            module = importlib.import_module(f"scpermut_dist.commands.bench_{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"scpermut_dist.commands.bench_{name}":
                raise
            continue
        module.add_parser(sub)
