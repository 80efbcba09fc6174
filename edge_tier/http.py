"""What the HTTP services (the agent's endpoint, the result API) share: problem+json
answers (RFC 9457), the Prometheus page, and serving an aiohttp app on a TCP port."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


def problem(
    status: int, title: str, detail: str, instance: str | None = None, **headers: str
) -> web.Response:
    body: dict[str, object] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if instance is not None:
        body["instance"] = instance
    return web.json_response(
        body, status=status, content_type="application/problem+json", headers=headers or None
    )


async def metrics_page(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve_tcp(runner: web.AppRunner, host: str, port: int) -> int | None:
    """Start ``runner`` on ``host:port`` (0: any free port); the port it is bound to."""
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = getattr(site, "_server", None)
    return server.sockets[0].getsockname()[1] if server is not None and server.sockets else None
