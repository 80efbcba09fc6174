"""The result API as a child process on a real nats-server: tokens and tenants, pages, uploads,
the event stream, bad parameters, rate limits, and a schemathesis run against its OpenAPI."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import schemathesis.engine
from hypothesis import given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.engine import events

pytest.importorskip("onnxruntime", reason="pip install onnxruntime")

from cloud_ingest.api import records
from cloud_ingest.results_cache import ResultsCache, encode_rows
from edge_tier.tokens import TokenStore
from edge_tier.wire import UPLOAD_ID_PATTERN, ResultBatch, WireError, parse_upload_id, upload_id
from edge_tier_harness.brokers import NatsServer
from edge_tier_harness.services import ApiProcess, WorkerProcess
from tests.support import frame, publish_features, wait_for_rows, wait_until, worker_config

DIM = 16


@dataclass
class Api:
    proc: ApiProcess
    nats_url: str
    tokens: dict[str, str]  # tenant -> token
    store: TokenStore

    def get(self, path: str, tenant: str | None = "acme", **headers: str) -> tuple[int, dict[str, str], Any]:
        return self.call("GET", path, tenant, **headers)

    def call(
        self, method: str, path: str, tenant: str | None = "acme", **headers: str
    ) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.proc.port, timeout=10)
        if tenant is not None:
            headers["Authorization"] = f"Bearer {self.tokens[tenant]}"
        try:
            conn.request(method, path, headers=headers)
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


def test_an_empty_cursor_is_the_first_page(api: Api) -> None:
    """``cursor=`` is what a paging loop sends on its first turn: no cursor, not a bad one."""
    for q in ("limit=5", "limit=5&order=newest", "limit=5&since=0"):
        status, _, body = api.get(f"/v1/devices/press-1/results?{q}&cursor=")
        assert status == 200, body
        assert body == api.get(f"/v1/devices/press-1/results?{q}")[2]
        assert len(body["results"]) == 5 and body["next_cursor"]
    doc = api.get("/openapi.json", tenant=None)[2]
    [cursor] = [
        p for p in doc["paths"]["/v1/devices/{device}/results"]["get"]["parameters"] if p["name"] == "cursor"
    ]
    assert re.fullmatch(cursor["schema"]["pattern"], "") and "empty" in cursor["description"]


def test_upload_ids_are_checked_by_the_documents_pattern(api: Api) -> None:
    """The served pattern is edge_tier.wire's; an id of that shape naming no possible upload (first > last)
    is not found, a malformed one a 400."""
    doc = api.get("/openapi.json", tenant=None)[2]
    [param] = doc["paths"]["/v1/uploads/{upload_id}"]["get"]["parameters"]
    assert param["schema"]["pattern"] == UPLOAD_ID_PATTERN
    for good in ("acme.press-1.1-7", "acme.press-1.9-1", "acme.press-1.1-99999999999999999999"):
        assert re.fullmatch(UPLOAD_ID_PATTERN, good)
    status, _, body = api.get("/v1/uploads/acme.press-1.9-1")
    assert status == 404 and "no upload has this id" in body["detail"], body
    for bad in ("acme.press-1.01-7", "acme.press-1.1-7#2", "acme.press+1.1-7", "acme..1-7"):
        assert not re.fullmatch(UPLOAD_ID_PATTERN, bad)
        assert api.get(f"/v1/uploads/{bad.replace('#', '%23').replace('+', '%2B')}")[0] == 400, bad


@given(st.from_regex(UPLOAD_ID_PATTERN, fullmatch=True))
def test_what_the_upload_id_pattern_admits_parses_but_for_its_range(text: str) -> None:
    try:
        parsed = parse_upload_id(text)
    except WireError as e:
        assert "bad seq range" in str(e)  # first > last, or last > U64_MAX: beyond a regex
    else:
        assert upload_id(*parsed) == text


@given(st.text(alphabet="ab.-0123456789#_", max_size=24))
def test_what_parses_as_an_upload_id_matches_the_pattern(text: str) -> None:
    try:
        parse_upload_id(text)
    except WireError:
        return
    assert re.fullmatch(UPLOAD_ID_PATTERN, text)


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        ("/v1/devices", {"GET", "HEAD"}),
        ("/v1/uploads/acme.press-1.1-7", {"GET", "HEAD"}),
        ("/healthz", {"GET", "HEAD"}),
    ],
)
def test_a_method_not_allowed_says_which_are(api: Api, path: str, allow: set[str]) -> None:
    status, headers, body = api.call("DELETE", path)
    assert status == 405 and headers["Content-Type"].startswith("application/problem+json"), body
    assert {m.strip() for m in headers["Allow"].split(",")} == allow
    assert body["status"] == 405 and "DELETE is not allowed" in body["detail"]


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


def walk(api: Api, query: str) -> list[dict[str, Any]]:
    """Every record of press-1's pages with this query, cursor after cursor."""
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        status, _, body = api.get(
            f"/v1/devices/press-1/results?{query}" + (f"&cursor={cursor}" if cursor else "")
        )
        assert status == 200, body
        out += body["results"]
        if (cursor := body["next_cursor"]) is None:
            return out


def test_a_restarted_api_reads_its_pages_from_the_stream(api: Api, tmp_path: Path) -> None:
    """An index on disk is followed on from where it was: the cache holds nothing, every record
    comes from batched direct gets, and pages, uploads and order are what the warm API serves."""
    cfg = api_config(api.nats_url, tmp_path / "fleet" / "registry.db", index_path=str(tmp_path / "index.db"))
    proc = ApiProcess(tmp_path / "cold", cfg, name="api-cold")
    proc.start(timeout=30)
    proc.stop()
    proc.start(timeout=30)
    try:
        cold = Api(proc, api.nats_url, api.tokens, api.store)
        for query in ("limit=25", "limit=33&order=newest", "limit=1000"):
            want = walk(api, query)
            assert len(want) == 210 and walk(cold, query) == want, query
        assert cold.get("/v1/uploads/acme.press-1.8-14")[2] == api.get("/v1/uploads/acme.press-1.8-14")[2]
    finally:
        proc.stop()


@given(
    st.lists(
        st.tuples(
            st.floats(allow_nan=True, allow_infinity=True),
            st.text(max_size=8),
            st.floats(0, 1),
            st.floats(allow_nan=False, allow_infinity=False),
        ),
        min_size=1,
        max_size=6,
    ),
    st.booleans(),
    st.integers(1, 2**53),
)
def test_pre_encoded_records_are_what_json_dumps_writes(
    cols: list[tuple[float, str, float, float]], regressor: bool, stream_seq: int
) -> None:
    n = len(cols)
    b = ResultBatch(
        v=2 if regressor else 1,
        upload_id=upload_id("acme", "press-1", 1, n),
        tenant="acme",
        device="press-1",
        stream="vibration",
        model="m\u00e9",
        model_version='1"0',
        worker="w",
        produced_ms=5,
        seqs=list(range(1, n + 1)),
        times_ms=[7] * n,
        scores=[c[0] for c in cols],
        labels=[c[1] for c in cols],
        confidences=[c[2] for c in cols],
        values=[c[3] for c in cols] if regressor else None,
    )
    assert list(encode_rows(b, stream_seq)) == [json.dumps(r) for r in records(b, stream_seq)]
    cache = ResultsCache(max_bytes=1)  # holds one, however big
    cache.keep(1, b.model_dump_json().encode())
    cache.keep(2, b"{}")
    assert cache.get(1) is None and len(cache) == 1
    with pytest.raises(WireError):
        cache.get(2)  # held raw, decoded when read: a message that does not validate says so
    assert len(cache) == 0


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


# Cases per operation in the fuzzing phase, on top of the examples, coverage (boundary values, empty
# strings, every undeclared method for the 405/Allow check) and stateful phases: about 1,200 requests,
# 45 s on 2 idle cores (70 s when busy; most of it the coverage and stateful phases). The 500 of the
# run that found the mismatches of issue 12 adds time but no kind of case the coverage phase misses.
FUZZ_EXAMPLES = 200
# A cursor is opaque: the schema says its alphabet, not which strings this API gave out, so a
# made-up one is rightly refused although schema-valid. Only that refusal is excused.
FORGED_CURSOR = b"cursor: not a cursor this API gave out"


@pytest.mark.timeout(300)
def test_the_openapi_document_matches_the_server_under_fuzzing(api: Api) -> None:
    """What ``schemathesis run`` does, every phase and every built-in check: no 5xx, declared
    status codes, content types and response schemas, valid parameters accepted (an empty cursor, a
    well-formed upload id) and invalid ones rejected, undeclared methods answered 405 with ``Allow``."""
    status, _, served = api.get("/openapi.json", tenant=None)
    assert status == 200
    schema = schemathesis.openapi.from_dict(served).exclude(path="/v1/stream")  # endless: the SSE tests
    schema.config.update(
        base_url=f"http://127.0.0.1:{api.proc.port}",
        headers={"Authorization": f"Bearer {api.tokens['acme']}"},
        continue_on_failure=True,
    )
    schema.config.generation.update(max_examples=FUZZ_EXAMPLES, modes=list(GenerationMode))
    failures: set[str] = set()
    tested: set[str] = set()
    cases = 0
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.NonFatalError | events.FatalError):
            failures.add(f"error: {event!r}")
        if not isinstance(event, events.ScenarioFinished):
            continue
        rec = event.recorder
        tested.add(rec.label)
        cases += len(rec.cases)
        for case_id, checks in rec.checks.items():
            answer = rec.interactions[case_id].response if case_id in rec.interactions else None
            for check in checks:
                if check.failure_info is None:
                    continue
                forged = answer is not None and answer.status_code == 400 and FORGED_CURSOR in answer.content
                if check.name == "positive_data_acceptance" and forged:
                    continue
                case = rec.cases[case_id].value
                failures.add(
                    f"{check.name}: {case.method} {case.formatted_path} {case.query}: "
                    f"{check.failure_info.failure.title}"
                )
    assert not failures, "\n".join(sorted(failures))
    assert {"GET /v1/devices", "GET /v1/devices/{device}/results", "GET /v1/uploads/{upload_id}"} <= tested
    assert cases >= 3 * FUZZ_EXAMPLES  # every phase ran (a crashed engine thread reports nothing)
