"""``edge-provision``: the fleet's identities and credentials.

So far: API tokens for the result API (``token add|list|revoke``), kept hashed in the
fleet registry (``--fleet DIR``, file ``registry.db``). Device certificates, broker
config and model signing come with issue 5.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

from edge_tier.tokens import TokenError, TokenStore
from edge_tier.wire import WireError

REGISTRY = "registry.db"


def _fleet(args: argparse.Namespace) -> Path:
    return Path(args.fleet or os.environ.get("EDGE_PROVISION_FLEET", ".")) / REGISTRY


def _when(ms: int | None) -> str:
    return "-" if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_token_add(args: argparse.Namespace) -> int:
    info, token = TokenStore(_fleet(args)).add(args.tenant, args.name or "")
    print(token)
    print(f"token {info.id} for tenant {info.tenant}: shown once, store it now", file=sys.stderr)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    print(f"{'id':<14}{'tenant':<20}{'name':<20}{'created':<22}revoked")
    for t in TokenStore(_fleet(args)).list(args.tenant):
        print(f"{t.id:<14}{t.tenant:<20}{t.name:<20}{_when(t.created_ms):<22}{_when(t.revoked_ms)}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    t = TokenStore(_fleet(args)).revoke(args.id)
    print(f"token {t.id} of tenant {t.tenant} revoked at {_when(t.revoked_ms)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-provision", description="edge-tier provisioning")
    p.add_argument(
        "--fleet", help="fleet directory holding registry.db (default: $EDGE_PROVISION_FLEET or .)"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    tok = sub.add_parser("token", help="API tokens for the result API").add_subparsers(
        dest="sub", required=True
    )
    a = tok.add_parser("add", help="a new token for TENANT (printed once; stored hashed)")
    a.add_argument("tenant")
    a.add_argument("--name", help="what it is for")
    a.set_defaults(fn=cmd_token_add)
    ls = tok.add_parser("list", help="tokens (ids, never the secrets)")
    ls.add_argument("tenant", nargs="?")
    ls.set_defaults(fn=cmd_token_list)
    r = tok.add_parser("revoke", help="revoke a token by id (the API stops taking it within seconds)")
    r.add_argument("id")
    r.set_defaults(fn=cmd_token_revoke)
    args = p.parse_args(argv)
    try:
        return int(args.fn(args))
    except (TokenError, WireError, OSError) as e:
        print(f"edge-provision: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
