"""``cloud-ingest``: the cloud services: ``run`` (ingest), ``worker`` (tier two), ``api`` (results);
``model check`` tries a tier-two model as a worker would load it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable

from cloud_ingest import model_tool
from cloud_ingest.config import load_ingest_config
from cloud_ingest.errors import IngestError
from edge_tier.cli import run_service
from edge_tier.config import ConfigError
from edge_tier.logs import setup_logging


def _serve(args: argparse.Namespace, service: str) -> int:
    cfg = load_ingest_config(args.config)
    setup_logging(cfg.log_level, cfg.log_format)
    main: Callable[[], Awaitable[None]]
    # each serves /metrics, /healthz and /readyz itself (the API on its own port)
    if service == "worker":
        from cloud_ingest.worker import Worker

        main = Worker(cfg).run
    elif service == "api":
        from cloud_ingest.api import ResultApi

        main = ResultApi(cfg).run
    else:
        from cloud_ingest.ingest import Ingest

        main = Ingest(cfg).run
    return run_service(main)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cloud-ingest", description="edge-tier cloud services")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="MQTT uploads -> JetStream, with receipts to devices")
    r.add_argument("--config", "-c", help="ingest.toml (defaults and CLOUD_INGEST_* env if omitted)")
    r.set_defaults(fn=lambda a: _serve(a, "ingest"))
    w = sub.add_parser("worker", help="tier-two inference: JetStream features -> results, batched")
    w.add_argument("--config", "-c", help="ingest.toml ([worker] section; CLOUD_INGEST_WORKER__* env)")
    w.set_defaults(fn=lambda a: _serve(a, "worker"))
    api = sub.add_parser("api", help="the result API: devices, result pages, uploads, SSE (aiohttp)")
    api.add_argument("--config", "-c", help="ingest.toml ([api] section; CLOUD_INGEST_API__* env)")
    api.set_defaults(fn=lambda a: _serve(a, "api"))
    model_tool.add_parser(sub)
    args = p.parse_args(argv)
    if args.cmd == "model":
        setup_logging("WARNING")  # a provider this host lacks, a fixed batch: said on stderr
    try:
        return int(args.fn(args))
    except (ConfigError, IngestError) as e:
        print(f"cloud-ingest: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
