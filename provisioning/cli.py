"""``edge-provision``: device identities, credentials and broker ACLs (see issue 5; not yet built)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="edge-provision",
        description="edge-tier provisioning: fleet CA, device bundles, broker config, API tokens "
        "(not implemented yet; this release ships the store-and-forward spine)",
    )
    p.parse_args(argv)
    p.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
