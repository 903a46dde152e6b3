"""Errors a user can fix: raised anywhere, turned into an `error:` line and exit code 2 by the CLI."""
from __future__ import annotations


class UsageError(ValueError):
    """A bad option or configuration value; the message says how to fix it."""
