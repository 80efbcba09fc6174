"""``cloud-ingest``: the cloud services: ``run`` (ingest), ``worker`` (tier two), ``api`` (results)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable

from cloud_ingest.config import load_ingest_config
from cloud_ingest.errors import IngestError
from edge_tier.cli import run_service, setup_logging
from edge_tier.config import ConfigError


def _serve(args: argparse.Namespace, service: str) -> int:
    cfg = load_ingest_config(args.config)
    setup_logging(cfg.log_level)
    main: Callable[[], Awaitable[None]]
    if service == "worker":
        from cloud_ingest.worker import Worker

        main, port = Worker(cfg).run, cfg.worker.metrics_port
    elif service == "api":
        from cloud_ingest.api import ResultApi

        main, port = ResultApi(cfg).run, None  # it serves /metrics on its own port
    else:
        from cloud_ingest.ingest import Ingest

        main, port = Ingest(cfg).run, cfg.ingest.metrics_port
    if port is not None:
        from prometheus_client import start_http_server

        start_http_server(port, addr="127.0.0.1")
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
    args = p.parse_args(argv)
    try:
        return int(args.fn(args))
    except (ConfigError, IngestError) as e:
        print(f"cloud-ingest: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
