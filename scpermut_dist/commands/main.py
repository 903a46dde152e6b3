"""The `scpermut` command: each sub-command lives in `scpermut_dist.commands.<name>`.

A command module exposes `add_parser(subparsers)` (registering its arguments and `func`) and keeps
its imports lazy, so `scpermut --help` stays fast.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading

from loaders.errors import DataError
from scpermut_dist.errors import UsageError

COMMANDS = ("train", "map", "evaluate", "demo", "ingest", "synth", "bench", "launch", "serve")


def parse_seeds(text: str | None) -> list[int] | None:
    """`--seeds 0,1,2` -> [0, 1, 2]; None when the option is absent."""
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: give integers separated by commas, e.g. 0,1,2") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scpermut", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"scpermut_dist.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"scpermut_dist.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, Kubernetes, Slurm) turned into an exception in the main thread, so that `finally`
    blocks run: member worker processes are killed (train.parallel) and no half-written output is left."""


@contextlib.contextmanager
def _sigterm_raises():
    """While a command runs, SIGTERM raises `Terminated` in the main thread (by default it kills the process
    outright: no cleanup, and loky workers keep training as orphans). A second SIGTERM during the cleanup
    kills at once. A command with its own handler (`scpermut serve`) replaces this one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(levelname)s %(message)s")
    try:
        with _sigterm_raises():
            return int(args.func(args) or 0)
    except (DataError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        sig = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        print(f"error: {args.command} stopped by {sig.name} before it finished", file=sys.stderr)
        return 128 + int(sig)


if __name__ == "__main__":
    sys.exit(main())
