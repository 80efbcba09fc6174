"""The result API (``cloud-ingest api``): what application developers read.

aiohttp, bearer tokens per tenant (``edge-provision token add``), a token sees
only its own tenant. JetStream's ET_RESULTS is the source of truth; a follower
keeps a rebuildable index of it (``results_index.py``), hands each message to an
in-memory cache of pre-encoded records (``results_cache.py``: a page is a join of
bytes; what the cache lacks is read from the stream in batched direct gets) and
fans new results out to server-sent-event clients. Every refusal is problem+json
(RFC 9457).

  GET /v1/devices                                 the tenant's devices and their status
  GET /v1/devices/{device}/results                cursor pages of per-record results
  GET /v1/uploads/{upload_id}                     the results of one upload
  GET /v1/stream[?device=]                        SSE of new results, resumable (Last-Event-ID)
  GET /healthz, /readyz, /metrics, /openapi.json
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from aiohttp import web
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DEFAULT_PREFIX, ConsumerConfig, DeliverPolicy
from prometheus_client import Counter, Histogram

from cloud_ingest.config import IngestConfig
from cloud_ingest.errors import IngestError
from cloud_ingest.nats_client import connect_nats
from cloud_ingest.openapi import SINCE_MS_PATTERN, document
from cloud_ingest.results_cache import ResultsCache, Rows
from cloud_ingest.results_index import Entry, ResultsIndex
from cloud_ingest.streams import ensure_streams
from edge_tier import topics
from edge_tier.http import app_runner, healthz, metrics_page, problem, problem_from, readiness, serve_tcp
from edge_tier.ratelimit import TokenBucket
from edge_tier.tasks import running
from edge_tier.tokens import TokenError, TokenStore
from edge_tier.wire import (
    UPLOAD_ID_PATTERN,
    ResultBatch,
    WireError,
    decode_results,
    parse_upload_id,
    validate_id,
)

log = logging.getLogger(__name__)

REQUESTS = Counter("et_api_requests_total", "API requests, by route and status", ["route", "status"])
SSE_EVENTS = Counter("et_api_sse_events_total", "Result events sent to SSE clients")
SSE_LAG = Histogram(
    "et_api_sse_lag_seconds",
    "From a result's production (produced_ms) to its SSE event being written",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Pre-encoded result messages held in memory (about 1.3 kB per 5-record message): the newest
# ~100k messages of a 5-record fleet. Not yet a setting of ApiSettings.
CACHE_BYTES = 128 * 2**20
# How often the stream's first sequence and deletions are checked, so that what retention
# removed leaves the index and the cache (and pages) at most this late.
RETENTION_CHECK_S = 2.0
# Messages one batched direct get asks for (nats-server 2.11+).
FETCH_BATCH = 256


class ApiError(Exception):
    def __init__(self, status: int, title: str, detail: str, **headers: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.headers = status, title, detail, headers


def bad_request(detail: str) -> ApiError:
    return ApiError(400, "Bad Request", detail)


def not_found(detail: str) -> ApiError:
    return ApiError(404, "Not Found", detail)


# -- cursors and parameters ------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """Where a page starts: a result message, the row inside it, and the page's order and filter."""

    seq: int
    row: int
    newest_first: bool
    since_ms: int

    def encode(self) -> str:
        raw = json.dumps([self.seq, self.row, int(self.newest_first), self.since_ms], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            seq, row, newest, since = raw
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in raw):
                raise ValueError
            return cls(seq, row, bool(newest), since)
        except (ValueError, TypeError):
            raise bad_request("cursor: not a cursor this API gave out; start again without one") from None


def _int_param(q: Any, name: str, default: int, lo: int, hi: int) -> int:
    text = q.get(name)
    if text is None:
        return default
    try:
        v = int(text)
    except ValueError:
        raise bad_request(f"{name}: {text[:40]!r} is not an integer") from None
    if not lo <= v <= hi:
        raise bad_request(f"{name}: {v} is outside {lo}..{hi}")
    return v


def _since(text: str | None) -> int:
    """``since``: milliseconds since the epoch, or an ISO 8601 time with a zone."""
    if text is None:
        return 0
    if re.fullmatch(SINCE_MS_PATTERN, text):
        return int(text)
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise bad_request(f"since: {text[:40]!r} is neither milliseconds nor an ISO 8601 time") from None
    if t.tzinfo is None:
        raise bad_request(f"since: {text[:40]!r} has no time zone (add Z or +hh:mm)")
    return max(0, int(t.timestamp() * 1000))


def _device(name: str) -> str:
    try:
        return validate_id("device", name)
    except WireError as e:
        raise bad_request(str(e)) from None


def records(batch: ResultBatch, stream_seq: int) -> list[dict[str, Any]]:
    """One result message as per-record objects (a regressor's with its ``value``)."""
    out = [
        {
            "device": batch.device,
            "seq": seq,
            "time_ms": t,
            "score": score,
            "label": label,
            "confidence": conf,
            "upload_id": batch.upload_id,
            "produced_ms": batch.produced_ms,
            "model": batch.model,
            "model_version": batch.model_version,
            "event_id": str(stream_seq),
        }
        for seq, t, score, label, conf in zip(
            batch.seqs, batch.times_ms, batch.scores, batch.labels, batch.confidences, strict=True
        )
    ]
    if batch.values is not None:
        for rec, value in zip(out, batch.values, strict=True):
            rec["value"] = value
    return out


def _json_text(doc: str) -> web.Response:
    """A JSON document already written (ASCII), with the headers ``web.json_response`` gives."""
    return web.Response(body=doc.encode("ascii"), content_type="application/json", charset="utf-8")


# -- the service ---------------------------------------------------------------------------


@dataclass(eq=False)  # each listener is itself, hashable by identity
class _Listener:
    tenant: str
    device: str | None
    queue: asyncio.Queue[tuple[int, bytes, int]]  # (stream seq, result JSON, produced_ms)
    overflowed: bool = False


class ResultApi:
    def __init__(self, cfg: IngestConfig) -> None:
        self.cfg = cfg
        self.a = cfg.api
        if self.a.registry is None:
            raise IngestError("api.registry is not set: the API needs the fleet registry with its tokens")
        try:
            self.tokens = TokenStore(self.a.registry, readonly=True, cache_s=self.a.token_cache_s)
        except TokenError as e:
            raise IngestError(str(e)) from None
        self.index = ResultsIndex(self.a.index_path)
        self.cache = ResultsCache(CACHE_BYTES)
        self._first_seq = 0  # the stream's, as last seen: anything before it is gone
        self._num_deleted = 0  # the stream's interior deletions, as last seen
        self._direct_get = f"{DEFAULT_PREFIX}.DIRECT.GET.{topics.RESULTS_STREAM}"
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self.devices: dict[tuple[str, str], dict[str, Any]] = {}
        self.listeners: set[_Listener] = set()
        self.buckets: dict[str, TokenBucket] = {}
        self.caught_up = asyncio.Event()
        self.ready = asyncio.Event()
        self.port: int | None = None
        self._openapi = document(self.a.page_max)
        self.app = web.Application(middlewares=[self._errors, self._auth])
        self.app.add_routes(
            [
                web.get("/v1/devices", self.get_devices),
                web.get("/v1/devices/{device}/results", self.get_results),
                web.get("/v1/uploads/{upload_id}", self.get_upload),
                web.get("/v1/stream", self.get_stream),
                web.get("/healthz", healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", metrics_page),
                web.get("/openapi.json", self.openapi),
            ]
        )

    async def run(self) -> None:
        self.nc = await connect_nats(self.cfg, topics.service_client_id("api"))
        self.js = self.nc.jetstream(timeout=self.cfg.ingest.publish_timeout_s)
        await ensure_streams(self.js, self.cfg.streams)
        runner = app_runner(self.app)
        await runner.setup()
        self.port = await serve_tcp(runner, self.a.host, self.a.port)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._follow(), name="api-follow")
                tg.create_task(self._watch_devices(), name="api-devices")
                tg.create_task(self._watch_retention(), name="api-retention")
                await self.caught_up.wait()
                self.ready.set()
                log.info(
                    "api ready: http://%s:%s (index at stream seq %d)",
                    self.a.host,
                    self.port,
                    self.index.last_seq(),
                )
        finally:
            await runner.cleanup()
            with contextlib.suppress(Exception):
                await self.nc.close()
            self.index.close()

    # -- following ET_RESULTS and the devices bucket ----------------------

    async def _follow(self) -> None:
        """Index every result message and hand new ones to SSE listeners."""
        assert self.js is not None
        start = self.index.last_seq() + 1
        info = await self.js.stream_info(topics.RESULTS_STREAM)
        self._retained(info.state.first_seq, info.state.num_deleted or 0)
        target = info.state.last_seq
        if target < start:
            self.caught_up.set()
        sub = await self.js.subscribe(
            topics.RESULTS_SUBJECTS,
            stream=topics.RESULTS_STREAM,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start),
        )
        loop = asyncio.get_running_loop()
        while running():
            try:
                first = await sub.next_msg(timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            # Index (and fan out) what arrives within a few ms together: one SQLite
            # transaction per batch, at most a few ms added to an event's latency.
            pending, deadline = [first], loop.time() + 0.005
            while len(pending) < 1000 and (left := deadline - loop.time()) > 0:
                try:
                    pending.append(await sub.next_msg(timeout=left))
                except (nats.errors.TimeoutError, TimeoutError):
                    break
            self._index(pending)
            if pending[-1].metadata.sequence.stream >= target:
                self.caught_up.set()

    def _index(self, msgs: list[Msg]) -> None:
        entries = []
        for m in msgs:
            h = m.headers or {}
            seq = m.metadata.sequence.stream
            try:
                tenant, device, _, _ = parse_upload_id(h[topics.H_UPLOAD_ID])
                e = Entry(
                    seq,
                    tenant,
                    device,
                    h[topics.H_UPLOAD_ID],
                    int(h.get(topics.H_PART, 0)),
                    int(h[topics.H_RECORDS]),
                    int(h[topics.H_FIRST]),
                    int(h[topics.H_LAST]),
                    int(h[topics.H_PRODUCED_MS]),
                )
            except (KeyError, ValueError, WireError) as err:
                log.warning("result message at stream seq %d lacks index headers (%r); skipped", seq, err)
                continue
            entries.append(e)
            self.cache.keep(seq, m.data)
            for ls in list(self.listeners):
                if ls.tenant == tenant and ls.device in (None, device):
                    try:
                        ls.queue.put_nowait((seq, m.data, e.produced_ms))
                    except asyncio.QueueFull:
                        ls.overflowed = True  # the client reconnects with Last-Event-ID and loses nothing
        self.index.add(entries)

    async def _watch_devices(self) -> None:
        assert self.js is not None
        kv = await self.js.key_value(topics.DEVICES_BUCKET)
        watcher = await kv.watchall()
        while running():
            try:
                entry = await watcher.updates(timeout=5.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            if entry is None or entry.value is None:
                continue
            with contextlib.suppress(ValueError):  # a TopicError is a ValueError too
                self.devices[topics.parse_device_key(entry.key)] = json.loads(entry.value)

    async def _watch_retention(self) -> None:
        assert self.js is not None
        while running():
            await asyncio.sleep(RETENTION_CHECK_S)
            try:
                info = await self.js.stream_info(topics.RESULTS_STREAM)
            except (nats.errors.Error, TimeoutError) as e:
                log.debug("stream info of %s: %r; retention checked next time", topics.RESULTS_STREAM, e)
                continue
            self._retained(info.state.first_seq, info.state.num_deleted or 0)

    def _retained(self, first_seq: int, num_deleted: int) -> None:
        """What the stream holds now: drop what it no longer does from the index and the cache."""
        if first_seq > self._first_seq:
            self.index.forget_before(first_seq)
            self.cache.drop_before(first_seq)
            self._first_seq = first_seq
        if num_deleted != self._num_deleted:
            # Which messages went is not said (and holes the first sequence passed count too):
            # read everything from the stream again, where a gone message is forgotten.
            self.cache.clear()
            self._num_deleted = num_deleted

    async def _rows(self, tenant: str, device: str, seqs: list[int]) -> dict[int, Rows]:
        """The result messages at these stream sequences, from the cache or else the stream; those
        the stream no longer holds, or that do not validate, are forgotten and left out."""
        got: dict[int, Rows] = {}
        missing: list[int] = []
        bad: list[int] = []
        for s in seqs:
            try:
                r = self.cache.get(s)
            except WireError as e:
                log.warning("result message at stream seq %d does not validate (%s); skipped", s, e)
                bad.append(s)
                continue
            if r is None:
                missing.append(s)
            else:
                got[s] = r
        if missing:
            found = await self._fetch(topics.results_subject(tenant, device), sorted(missing))
            for s in missing:
                data = found.get(s)
                if data is None:
                    bad.append(s)  # the stream no longer holds it
                    continue
                try:
                    got[s] = self.cache.put(s, data)
                except WireError as e:
                    log.warning("result message at stream seq %d does not validate (%s); skipped", s, e)
                    bad.append(s)
        if bad:
            self.index.forget(bad)
        return got

    async def _fetch(self, subject: str, seqs: list[int]) -> dict[int, bytes]:
        """The data of the messages at these ascending stream sequences that the stream still
        holds: batched direct gets along the device's subject (what comes along unasked is kept
        in the cache: a walk's next pages), then one direct get for each the batches did not
        bring (a message on another subject, a hole)."""
        assert self.nc is not None and self.js is not None
        want, out = set(seqs), {}
        timeout = self.cfg.ingest.publish_timeout_s
        start, more = seqs[0], True
        while want and more and start <= seqs[-1]:
            # The subject has at most this many messages up to the last one wanted.
            n = min(FETCH_BATCH, seqs[-1] - start + 1)
            inbox = self.nc.new_inbox()
            sub = await self.nc.subscribe(inbox)
            last = None
            try:
                req = json.dumps({"seq": start, "next_by_subj": subject, "batch": n}).encode()
                await self.nc.publish(self._direct_get, req, reply=inbox)
                for _ in range(n + 1):  # n messages, then the end of the batch
                    m = await sub.next_msg(timeout=timeout)
                    h = m.headers or {}
                    if "Status" in h:
                        # 204 EOB: the batch is over, more follow if some are pending;
                        # 404: nothing more on the subject; anything else: ask one by one
                        more = h["Status"] == "204" and h.get("Nats-Num-Pending", "0") != "0"
                        break
                    last = int(h["Nats-Sequence"])
                    if last in want:
                        want.discard(last)
                        out[last] = m.data
                    else:
                        self.cache.keep(last, m.data)
            finally:
                await sub.unsubscribe()
            if last is None:
                break
            start = last + 1
        for s in sorted(want):
            try:
                got = await self.js.get_msg(topics.RESULTS_STREAM, s, direct=True)
            except nats.js.errors.NotFoundError:
                continue
            out[s] = got.data or b""
        return out

    async def _read(self, seqs: list[int]) -> list[tuple[int, ResultBatch]]:
        """The result messages at these stream sequences (those retention dropped are skipped)."""
        assert self.js is not None

        async def one(seq: int) -> tuple[int, ResultBatch] | None:
            assert self.js is not None
            try:
                m = await self.js.get_msg(topics.RESULTS_STREAM, seq, direct=True)
            except nats.js.errors.NotFoundError:
                self.index.forget([seq])
                return None
            return seq, decode_results(m.data or b"")

        got = await asyncio.gather(*(one(s) for s in seqs))
        return [g for g in got if g is not None]

    # -- middleware ---------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "?"
        try:
            resp = await handler(request)
        except ApiError as e:
            resp = problem(e.status, e.title, e.detail, request.path, **e.headers)
        except web.HTTPException as e:
            resp = problem_from(e, request)
        except (nats.errors.Error, TimeoutError) as e:
            log.warning("%s: JetStream unavailable: %r", request.path, e)
            resp = problem(503, "Service Unavailable", "JetStream is not reachable; retry", request.path)
        REQUESTS.labels(route, str(resp.status)).inc()
        return resp

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        tenant = self.tokens.tenant_of(token.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise ApiError(
                401,
                "Unauthorized",
                "send Authorization: Bearer <token> with a token of your tenant (edge-provision token add)",
                **{"WWW-Authenticate": 'Bearer realm="edge-tier"'},
            )
        bucket = self.buckets.get(token)
        if bucket is None:
            bucket = self.buckets[token] = TokenBucket(self.a.rate_per_token, self.a.burst_per_token)
        wait = bucket.wait_s()
        if wait > 0:
            raise ApiError(
                429,
                "Too Many Requests",
                f"this token may make {self.a.rate_per_token:g} requests/s; retry in {wait:.2f}s",
                **{"Retry-After": str(max(1, math.ceil(wait)))},
            )
        bucket.take(1)
        request["tenant"] = tenant
        return await handler(request)

    # -- handlers -----------------------------------------------------------

    async def get_devices(self, request: web.Request) -> web.Response:
        tenant = request["tenant"]
        with_results = self.index.devices(tenant)
        names = {d for (t, d) in self.devices if t == tenant} | set(with_results)
        out = []
        for d in sorted(names):
            st = self.devices.get((tenant, d), {})
            n, last_result = with_results.get(d, (0, None))
            out.append(
                {
                    "device": d,
                    "online": st.get("state") == "online",
                    "last_seen_ms": st.get("seen_ms"),
                    "backlog_records": st.get("backlog_records"),
                    "backlog_bytes": st.get("backlog_bytes"),
                    "oldest_age_s": st.get("oldest_age_s"),
                    "evictions": st.get("evictions", {}),
                    "model_version": st.get("model_version"),
                    "control": st.get("control"),  # the device's acknowledgement of its control document
                    "results": n,
                    "last_result_ms": last_result,
                }
            )
        return web.json_response({"devices": out})

    async def get_results(self, request: web.Request) -> web.Response:
        tenant = request["tenant"]
        device = _device(request.match_info["device"])
        q = request.query
        limit = _int_param(q, "limit", self.a.page_default, 1, self.a.page_max)
        if q.get("cursor"):  # an empty cursor is no cursor: the first page, as in a loop's first turn
            cur = Cursor.decode(q["cursor"])
        else:
            order = q.get("order", "oldest")
            if order not in ("oldest", "newest"):
                raise bad_request(f"order: {order[:40]!r} must be 'oldest' or 'newest'")
            newest = order == "newest"
            cur = Cursor(2**62 if newest else 0, 2**31 if newest else 0, newest, _since(q.get("since")))
        if (tenant, device) not in self.devices and not self.index.has_device(tenant, device):
            raise not_found(f"device {device!r}: no such device of this tenant")
        rows: list[str] = []
        nxt: Cursor | None = None
        start = cur.seq
        while nxt is None:
            # every message holds at least one record: never more than limit + 1 messages needed
            refs = self.index.page(
                tenant,
                device,
                start=start,
                newest_first=cur.newest_first,
                since_ms=cur.since_ms,
                limit=min(FETCH_BATCH, limit - len(rows) + 1),
            )
            if not refs:
                break
            got = await self._rows(tenant, device, [s for s, _ in refs])
            for seq, _ in refs:
                if (held := got.get(seq)) is None:
                    continue  # gone from the stream
                recs = held.rows[::-1] if cur.newest_first else held.rows  # newest: row i is record n-1-i
                n = len(recs)
                if cur.newest_first:
                    first = n - min(cur.row, n) if seq == cur.seq else 0
                else:
                    first = cur.row if seq == cur.seq else 0
                if n - first > (room := limit - len(rows)):  # one more exists: the next page starts at it
                    rows += recs[first : first + room]
                    i = first + room
                    nxt = Cursor(seq, n - i if cur.newest_first else i, cur.newest_first, cur.since_ms)
                    break
                rows += recs[first:]
            start = refs[-1][0] - 1 if cur.newest_first else refs[-1][0] + 1
        # The document json_response would write, joined from the pre-encoded records.
        tail = f'"{nxt.encode()}"' if nxt else "null"
        return _json_text(f'{{"results": [{", ".join(rows)}], "next_cursor": {tail}}}')

    async def get_upload(self, request: web.Request) -> web.Response:
        tenant = request["tenant"]
        text = request.match_info["upload_id"]
        try:
            owner, device, first, last = parse_upload_id(text)
        except WireError as e:
            if re.fullmatch(UPLOAD_ID_PATTERN, text) is None:
                raise bad_request(f"upload_id: {e}") from None
            # well formed (the document's pattern), but a range no upload has (first > last)
            raise not_found(f"upload {text!r}: no upload has this id ({e})") from None
        seqs = self.index.upload(text) if owner == tenant else []
        if not seqs:
            # Another tenant's upload reads exactly like one that does not exist.
            raise not_found(f"upload {text!r}: no results (not answered yet, or not of this tenant)")
        got = await self._rows(owner, device, seqs)
        found = [got[s] for s in seqs if s in got]
        parts = found[0].parts if found else 0
        head = json.dumps(
            {
                "upload_id": text,
                "device": device,
                "first_seq": first,
                "last_seq": last,
                "complete": len(found) == parts,
            }
        )
        rows = ", ".join(r for f in found for r in f.rows)
        return _json_text(f'{head[:-1]}, "results": [{rows}]}}')

    async def get_stream(self, request: web.Request) -> web.StreamResponse:
        tenant = request["tenant"]
        device = _device(request.query["device"]) if "device" in request.query else None
        last_id = request.headers.get("Last-Event-ID", request.query.get("last_event_id"))
        after = None
        if last_id is not None:
            if not last_id.isdigit():
                raise bad_request(f"Last-Event-ID: {last_id[:40]!r} is not an event id this API sent")
            after = int(last_id)
        listener = _Listener(tenant, device, asyncio.Queue(self.a.stream_queue))
        self.listeners.add(listener)  # before the replay, so nothing falls between the two
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
            }
        )
        try:
            await resp.prepare(request)
            await resp.write(b"retry: 2000\n\n")
            sent = after if after is not None else self.index.last_seq()
            if after is not None:
                while True:
                    seqs = self.index.after(tenant, device, sent, 256)
                    if not seqs:
                        break
                    for seq, batch in await self._read(seqs):
                        await self._event(resp, seq, batch.model_dump_json().encode(), batch.produced_ms)
                    sent = seqs[-1]
            while not listener.overflowed:
                try:
                    seq, data, produced = await asyncio.wait_for(listener.queue.get(), self.a.keepalive_s)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                if seq > sent:
                    await self._event(resp, seq, data, produced)
                    sent = seq
            log.info(
                "SSE client of %s fell %d events behind; closing (it resumes)", tenant, self.a.stream_queue
            )
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.listeners.discard(listener)
        return resp

    async def _event(self, resp: web.StreamResponse, seq: int, data: bytes, produced_ms: int) -> None:
        await resp.write(b"id: %d\nevent: result\ndata: %s\n\n" % (seq, data))
        SSE_EVENTS.inc()
        SSE_LAG.observe(max(0.0, time.time() - produced_ms / 1000))

    async def readyz(self, request: web.Request) -> web.Response:
        checks = {
            "nats": bool(self.nc and self.nc.is_connected),
            "index_caught_up": self.caught_up.is_set(),
        }
        if checks["nats"] and self.js is not None:
            try:
                await self.js.stream_info(topics.RESULTS_STREAM)
                checks["streams"] = True
            except (nats.errors.Error, TimeoutError):
                checks["streams"] = False
        checks.setdefault("streams", False)
        return await readiness(checks)

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(self._openapi)
