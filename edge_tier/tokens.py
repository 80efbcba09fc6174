"""API bearer tokens: how they look, how they are stored (hashed), how the API checks them.

A token is ``et_{id}_{secret}``: ``id`` (12 hex) finds the row, ``secret`` (32 random
bytes, url-safe) is never stored; the store keeps the SHA-256 of the whole token,
which is enough for a random 256-bit secret (a slow KDF is for guessable passwords).
``edge-provision token add`` writes the store (the fleet registry, SQLite); the
result API reads it, so a revoked token stops working within ``cache_s``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from edge_tier.errors import TokenError
from edge_tier.wire import validate_id

_TOKEN_RE = re.compile(r"et_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    sha256 TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
"""


@dataclass(frozen=True)
class TokenInfo:
    id: str
    tenant: str
    name: str
    created_ms: int
    revoked_ms: int | None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """The ``api_tokens`` table of a fleet registry (created on first write)."""

    def __init__(self, path: str | Path, *, readonly: bool = False, cache_s: float = 5.0) -> None:
        self.path = Path(path)
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, str | None]] = {}
        if readonly:
            if not self.path.exists():
                raise TokenError(f"{self.path}: no token registry (create one with edge-provision token add)")
            uri = f"file:{self.path}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            self._db.executescript(SCHEMA)
            self.path.chmod(0o600)

    def close(self) -> None:
        self._db.close()

    def add(self, tenant: str, name: str = "") -> tuple[TokenInfo, str]:
        """A new token for ``tenant``: its row, and the token itself (shown once, never stored)."""
        validate_id("tenant", tenant)
        token_id = secrets.token_hex(6)
        token = f"et_{token_id}_{secrets.token_urlsafe(32)}"
        now = int(time.time() * 1000)
        with self._db:
            self._db.execute(
                "INSERT INTO api_tokens (id, tenant, name, sha256, created_ms) VALUES (?, ?, ?, ?, ?)",
                (token_id, tenant, name, _digest(token), now),
            )
        return TokenInfo(token_id, tenant, name, now, None), token

    def revoke(self, token_id: str) -> TokenInfo:
        with self._db:
            cur = self._db.execute(
                "UPDATE api_tokens SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL",
                (int(time.time() * 1000), token_id),
            )
        if cur.rowcount == 0 and not any(t.id == token_id for t in self.list()):
            raise TokenError(f"{self.path}: no token with id {token_id!r}")
        return next(t for t in self.list() if t.id == token_id)

    def list(self, tenant: str | None = None) -> list[TokenInfo]:
        rows = self._db.execute(
            "SELECT id, tenant, name, created_ms, revoked_ms FROM api_tokens "
            "WHERE ? IS NULL OR tenant = ? ORDER BY created_ms",
            (tenant, tenant),
        ).fetchall()
        return [TokenInfo(*r) for r in rows]

    def tenant_of(self, token: str) -> str | None:
        """The tenant a valid, unrevoked token belongs to; None for anything else."""
        m = _TOKEN_RE.fullmatch(token)
        if m is None:
            return None
        now = time.monotonic()
        hit = self._cache.get(token)
        if hit is not None and now - hit[0] < self.cache_s:
            return hit[1]
        row = self._db.execute(
            "SELECT tenant, sha256, revoked_ms FROM api_tokens WHERE id = ?", (m.group(1),)
        ).fetchone()
        tenant = None
        if row is not None and row[2] is None and hmac.compare_digest(row[1], _digest(token)):
            tenant = str(row[0])
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[token] = (now, tenant)
        return tenant
