"""What the HTTP services (the agent's endpoint, the result API) share: problem+json
answers (RFC 9457), the Prometheus page, health and readiness answers, serving an aiohttp
app on a TCP port (with malformed requests logged as one warning line), and the small ops
server of the services without an HTTP API of their own (ingest, workers): ``/metrics``,
``/healthz``, ``/readyz``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger
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


# What an aiohttp HTTPException says about its own body: the problem+json answer replaces it.
_BODY_HEADERS = frozenset({hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH, hdrs.CONTENT_ENCODING})


def problem_from(exc: web.HTTPException, request: web.Request) -> web.Response:
    """aiohttp's own refusal (404 no route, 405 wrong method, 413 body too large, ...) as
    problem+json, keeping the headers it carries: ``Allow`` on a 405 (RFC 9110 15.5.6)."""
    headers = {k: v for k, v in exc.headers.items() if k not in _BODY_HEADERS}
    detail = exc.text or exc.reason
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        detail = f"{exc.method} is not allowed on {request.path}; allowed: {allowed}"
    return problem(exc.status, exc.reason, detail, request.path, **headers)


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server log (``aiohttp.server``), except that a request that is not valid HTTP
    (aiohttp answers it 400 itself, before any handler) is one WARNING line, not an ERROR with a
    traceback: it is the client's fault, and the internet sends plenty. Handler failures (500)
    stay ERRORs with their traceback."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            what = " ".join(exc_info.message.split())  # aiohttp's messages span lines
            self.warning(
                f"{msg}: malformed HTTP, answered %d: %s: %.200s",
                *args,
                exc_info.code,
                type(exc_info).__name__,
                what,
                **kwargs,
            )
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


SERVER_LOG = ServerLog(server_logger, {})


def app_runner(app: web.Application) -> web.AppRunner:
    """The runner every service serves ``app`` with: no access log, :class:`ServerLog`."""
    return web.AppRunner(app, access_log=None, logger=SERVER_LOG)


async def metrics_page(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve_tcp(runner: web.AppRunner, host: str, port: int) -> int | None:
    """Start ``runner`` on ``host:port`` (0: any free port); the port it is bound to."""
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = getattr(site, "_server", None)
    return server.sockets[0].getsockname()[1] if server is not None and server.sockets else None


Checks = Callable[[], Awaitable[dict[str, bool]]]


async def healthz(request: web.Request) -> web.Response:
    """The process is up and its event loop answers (liveness)."""
    return web.json_response({"ok": True})


async def readiness(checks: dict[str, bool]) -> web.Response:
    """200 when every check holds, else 503; the checks in the body either way."""
    ok = all(checks.values())
    return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)


class OpsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` (from ``checks``) on ``host:port``."""

    def __init__(self, checks: Checks) -> None:
        self.checks = checks
        self.app = web.Application()
        self.app.add_routes(
            [web.get("/metrics", metrics_page), web.get("/healthz", healthz), web.get("/readyz", self.readyz)]
        )
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def readyz(self, request: web.Request) -> web.Response:
        return await readiness(await self.checks())

    async def start(self, host: str, port: int) -> None:
        self._runner = app_runner(self.app)
        await self._runner.setup()
        self.port = await serve_tcp(self._runner, host, port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @contextlib.asynccontextmanager
    async def serving(self, host: str, port: int | None) -> AsyncIterator[None]:
        """Serve while the block runs (``port`` None: not at all)."""
        try:
            if port is not None:
                await self.start(host, port)
            yield
        finally:
            await self.stop()
