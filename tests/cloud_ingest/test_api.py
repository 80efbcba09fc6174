"""The result API as a child process on a real nats-server: tokens and tenants, pages, uploads,
the event stream, bad parameters, rate limits, and a schemathesis run against its OpenAPI."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnxruntime", reason="pip install onnxruntime")

from edge_tier.brokers import NatsServer
from edge_tier.services import ApiProcess, WorkerProcess
from edge_tier.tokens import TokenStore
from tests.support import frame, publish_features, wait_for_rows, wait_until, worker_config

DIM = 16


@dataclass
class Api:
    proc: ApiProcess
    nats_url: str
    tokens: dict[str, str]  # tenant -> token
    store: TokenStore

    def get(self, path: str, tenant: str | None = "acme", **headers: str) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.proc.port, timeout=10)
        if tenant is not None:
            headers["Authorization"] = f"Bearer {self.tokens[tenant]}"
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            ctype = resp.getheader("Content-Type", "")
            return resp.status, dict(resp.getheaders()), json.loads(body) if "json" in ctype else body
        finally:
            conn.close()


def uploads(tenant: str, device: str, n: int, per: int = 7, start: int = 0) -> list[bytes]:
    return [
        frame(1 + (start + i) * per, per, (start + i) * per, tenant=tenant, device=device, dim=DIM)
        for i in range(n)
    ]


def answer(url: str, frames: list[bytes], total_rows: int) -> None:
    """Features in; back once the fixture's worker made ET_RESULTS hold ``total_rows`` rows."""

    async def go() -> None:
        await publish_features(url, frames)
        got = await wait_for_rows(url, total_rows, within=60)
        assert sum(len(b.seqs) for b in got) >= total_rows

    asyncio.run(go())


def api_config(nats_url: str, registry: Path, **api: Any) -> dict[str, Any]:
    return {"log_level": "INFO", "nats": {"servers": [nats_url]}, "api": {"registry": str(registry), **api}}


@pytest.fixture
def api(nats_server: NatsServer, tmp_path: Path) -> Iterator[Api]:
    store = TokenStore(tmp_path / "fleet" / "registry.db")
    tokens = {t: store.add(t, "test")[1] for t in ("acme", "globex")}
    worker = WorkerProcess(tmp_path / "worker", worker_config(nats_server.url), name="worker")
    worker.start(timeout=30)
    answer(
        nats_server.url,
        uploads("acme", "press-1", 30) + uploads("acme", "press-2", 3) + uploads("globex", "mill-1", 4),
        (30 + 3 + 4) * 7,
    )
    proc = ApiProcess(
        tmp_path / "api",
        api_config(nats_server.url, tmp_path / "fleet" / "registry.db", token_cache_s=0.2, keepalive_s=0.5),
        name="api",
    )
    proc.start(timeout=30)
    try:
        yield Api(proc, nats_server.url, tokens, store)
    finally:
        proc.stop()
        worker.stop()


def test_a_token_sees_only_its_own_tenant(api: Api) -> None:
    status, _, body = api.get("/v1/devices")
    assert status == 200
    assert {d["device"]: d["results"] for d in body["devices"]} == {"press-1": 210, "press-2": 21}
    status, _, body = api.get("/v1/devices", tenant="globex")
    assert [d["device"] for d in body["devices"]] == ["mill-1"]
    # every endpoint, with the other tenant's ids: not found, nothing leaks
    status, _, body = api.get("/v1/devices/mill-1/results")
    assert status == 404 and body["status"] == 404 and "mill-1" in body["detail"]
    status, _, body = api.get("/v1/uploads/globex.mill-1.1-7")
    assert status == 404 and body["title"] == "Not Found"
    status, _, body = api.get("/v1/uploads/acme.press-1.1-7", tenant="globex")
    assert status == 404
    status, _, body = api.get("/v1/uploads/acme.press-1.1-7")
    assert status == 200 and [r["seq"] for r in body["results"]] == list(range(1, 8)) and body["complete"]
    events = read_events(api, "/v1/stream?device=mill-1", tenant="acme", want=1, within=1.5)
    assert events == []


def test_no_bad_or_revoked_token_gets_in(api: Api) -> None:
    status, headers, body = api.get("/v1/devices", tenant=None)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert headers["Content-Type"].startswith("application/problem+json") and "Bearer" in body["detail"]
    assert api.get("/v1/devices", tenant=None, Authorization="Bearer et_000000000000_" + "x" * 43)[0] == 401
    assert api.get("/v1/devices", tenant=None, Authorization="Basic YTpi")[0] == 401
    token_id = next(t.id for t in api.store.list("globex"))
    api.store.revoke(token_id)
    wait_until(lambda: api.get("/v1/devices", tenant="globex")[0] == 401, 5, "the revocation to apply")
    assert api.get("/healthz", tenant=None)[0] == 200 and api.get("/openapi.json", tenant=None)[0] == 200


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("/v1/devices/press-1/results?limit=0", "limit: 0 is outside 1..1000"),
        ("/v1/devices/press-1/results?limit=many", "limit: 'many' is not an integer"),
        ("/v1/devices/press-1/results?order=sideways", "order: 'sideways' must be 'oldest' or 'newest'"),
        ("/v1/devices/press-1/results?since=yesterday", "since: 'yesterday' is neither"),
        ("/v1/devices/press-1/results?since=2026-01-01T00:00:00", "has no time zone"),
        ("/v1/devices/press-1/results?cursor=bm9wZQ", "cursor: not a cursor this API gave out"),
        ("/v1/devices/a.b/results", "device id 'a.b'"),
        ("/v1/uploads/acme.press-1", "upload_id:"),
        ("/v1/stream?device=a%2Bb", "device id 'a+b'"),
    ],
)
def test_bad_parameters_get_400_saying_which_and_why(api: Api, path: str, needle: str) -> None:
    status, headers, body = api.get(path)
    assert status == 400, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert needle in body["detail"]


def test_pages_have_no_gaps_or_repeats_while_results_arrive(api: Api) -> None:
    more = threading.Thread(
        target=answer, args=(api.nats_url, uploads("acme", "press-1", 20, start=30), 37 * 7 + 140)
    )
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        q = "limit=25" + (f"&cursor={cursor}" if cursor else "")
        status, _, body = api.get(f"/v1/devices/press-1/results?{q}")
        assert status == 200, body
        seen += [r["seq"] for r in body["results"]]
        pages += 1
        if pages == 2:
            more.start()  # new results land while we page
        cursor = body["next_cursor"]
        if cursor is None:
            break
    more.join()
    assert len(seen) == len(set(seen)), "a record came twice"
    assert set(range(1, 211)) <= set(seen), "a record that existed before paging was skipped"
    assert pages >= 9
    # newest first: the same records, in the reverse order of the stream
    newest: list[int] = []
    cursor = None
    while True:
        q = "limit=40&order=newest" + (f"&cursor={cursor}" if cursor else "")
        body = api.get(f"/v1/devices/press-1/results?{q}")[2]
        newest += [r["seq"] for r in body["results"]]
        if (cursor := body["next_cursor"]) is None:
            break
    oldest = []
    cursor = None
    while True:
        body = api.get("/v1/devices/press-1/results?limit=1000" + (f"&cursor={cursor}" if cursor else ""))[2]
        oldest += [r["seq"] for r in body["results"]]
        if (cursor := body["next_cursor"]) is None:
            break
    assert len(oldest) == 350 and newest == oldest[::-1]
    # since: only what was produced at or after a time
    later = api.get(f"/v1/devices/press-1/results?limit=1000&since={int(time.time() * 1000) + 60_000}")[2]
    assert later == {"results": [], "next_cursor": None}


def read_events(
    api: Api,
    path: str,
    *,
    tenant: str = "acme",
    want: int,
    within: float,
    last_id: str | None = None,
    connected: threading.Event | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """(id, result) of SSE events until ``want`` arrived or ``within`` seconds passed; then drop.
    ``connected`` is set once the stream has begun (the server is listening for us)."""
    sock = socket.create_connection(("127.0.0.1", api.proc.port), timeout=within)
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api.tokens[tenant]}\r\n"
    if last_id is not None:
        head += f"Last-Event-ID: {last_id}\r\n"
    sock.sendall((head + "\r\n").encode())
    buf = b""
    events: list[tuple[str, dict[str, Any]]] = []
    deadline = time.monotonic() + within
    try:
        while len(events) < want and time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            if connected is not None and b"retry:" in buf + chunk:
                connected.set()
            buf += chunk
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                lines = dict(
                    line.split(": ", 1)
                    for line in block.decode().splitlines()
                    if ": " in line and line[0] != ":"
                )
                if "data" in lines:
                    events.append((lines["id"], json.loads(lines["data"])))
    finally:
        sock.close()
    return events


def test_the_event_stream_resumes_after_a_drop_and_loses_nothing(api: Api) -> None:
    first = read_events(api, "/v1/stream?device=press-2", want=10, within=3.0, last_id="0")
    assert [b["upload_id"] for _, b in first] == [f"acme.press-2.{1 + 7 * i}-{7 * (i + 1)}" for i in range(3)]
    last = first[-1][0]
    # dropped; meanwhile more results arrive
    answer(api.nats_url, uploads("acme", "press-2", 5, start=3), 37 * 7 + 35)
    resumed = read_events(api, "/v1/stream?device=press-2", want=5, within=10, last_id=last)
    assert [b["upload_id"] for _, b in resumed] == [
        f"acme.press-2.{1 + 7 * i}-{7 * (i + 1)}" for i in range(3, 8)
    ]
    ids = [int(i) for i, _ in first + resumed]
    assert ids == sorted(set(ids))
    # live: a client without Last-Event-ID gets what is new
    got: list[Any] = []
    live = threading.Event()
    t = threading.Thread(
        target=lambda: got.extend(read_events(api, "/v1/stream", want=2, within=30, connected=live))
    )
    t.start()
    assert live.wait(10), "the stream did not begin"
    answer(api.nats_url, uploads("acme", "press-3", 2), 37 * 7 + 35 + 14)
    t.join()
    assert [b["device"] for _, b in got] == ["press-3", "press-3"]


def test_keep_alive_comments_hold_an_idle_stream_open(api: Api) -> None:
    sock = socket.create_connection(("127.0.0.1", api.proc.port), timeout=3)
    sock.sendall(
        f"GET /v1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api.tokens['acme']}\r\n\r\n".encode()
    )
    data = b""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and data.count(b": keep-alive") < 2:
        data += sock.recv(4096)
    sock.close()
    assert b"text/event-stream" in data and data.count(b": keep-alive") >= 2


def test_a_token_over_its_rate_gets_429_with_retry_after(nats_server: NatsServer, tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "registry.db")
    token = store.add("acme")[1]
    proc = ApiProcess(
        tmp_path / "api",
        api_config(nats_server.url, tmp_path / "registry.db", rate_per_token=1, burst_per_token=3),
        name="api",
    )
    proc.start(timeout=30)
    try:
        api = Api(proc, nats_server.url, {"acme": token}, store)
        statuses = [api.get("/v1/devices")[0] for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        status, headers, body = api.get("/v1/devices")
        assert status == 429 and int(headers["Retry-After"]) >= 1 and "1 requests/s" in body["detail"]
        assert api.get("/healthz", tenant=None)[0] == 200  # probes are not rate limited
    finally:
        proc.stop()


@dataclass
class _Fuzz:
    api: Api | None = None
    failures: list[str] = field(default_factory=list)


def test_the_openapi_document_matches_the_server_under_fuzzing(api: Api) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    status, _, served = api.get("/openapi.json", tenant=None)
    assert status == 200
    schema = schemathesis.openapi.from_dict(served)
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    base = f"http://127.0.0.1:{api.proc.port}"
    auth = {"Authorization": f"Bearer {api.tokens['acme']}"}
    ran = []
    for op in schema.get_all_operations():
        operation = op.ok()
        if operation.path == "/v1/stream":
            continue  # an endless stream: covered by the SSE tests

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            case.call_and_validate(base_url=base, headers=auth, checks=checks)

        run()
        ran.append(operation.path)
    assert {"/v1/devices", "/v1/devices/{device}/results", "/v1/uploads/{upload_id}"} <= set(ran)
