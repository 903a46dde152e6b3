"""Bearer-token authentication: where the token comes from, and a constant-time check of a request's.

The server keeps only the token's SHA-256 digest: that is what travels in Ray Serve's application
arguments (stored by its controller), never the token itself.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from scpermut_dist.errors import UsageError

TOKEN_ENV = "SCPERMUT_TOKEN"
MIN_TOKEN_CHARS = 16


def read_token(token_file: str | Path | None = None, env: str = TOKEN_ENV) -> str:
    """The token from `token_file` (first line) or else the environment variable; refused if weak or absent."""
    if token_file:
        p = Path(token_file)
        try:
            token = p.read_text().strip()
        except OSError as exc:
            raise UsageError(f"--token-file {p}: cannot be read ({exc.strerror or exc})") from exc
        where = f"--token-file {p}"
    else:
        token = os.environ.get(env, "").strip()
        where = f"${env}"
    if not token:
        raise UsageError(f"no API token: set ${env} or pass --token-file FILE (e.g. `openssl rand -hex 32 > FILE`)")
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise UsageError(f"{where}: the token must be at least {MIN_TOKEN_CHARS} characters without spaces "
                         "(e.g. `openssl rand -hex 32`)")
    return token


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authorized(header: str | None, digest: str) -> bool:
    """True when an `Authorization: Bearer <token>` header carries the token whose SHA-256 is `digest`."""
    if not header:
        return False
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return False
    return hmac.compare_digest(token_digest(presented.strip()), digest)
