"""The local enqueue endpoint: how producers on the device hand records to the agent.

HTTP on localhost (and optionally a Unix socket), two body forms:

* ``application/json``: ``{"stream": "vibration", "dtype": "float32",
  "records": [{"features": [...], "score": 0.93, "meta": {"site": "a"}}]}``
* ``application/x-edge-tier-features``: query ``stream``, ``dim``, ``dtype``;
  body = ``n`` float32 scores, then ``n x dim`` feature values, little-endian.

Both wait until the records are durable (``?durable=0`` returns as soon as
they are queued for the next group commit). Only allow-listed metadata keys
are accepted: anything else could carry raw data off the device.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web

from edge_agent import metrics
from edge_agent.config import AgentConfig
from edge_agent.errors import BadRecord, DiskFull, QueueFull, RecordTooLarge, StoreError
from edge_agent.prefilter import Prefilter, WindowRefused
from edge_agent.store import AsyncQueue, NewRecord, RecordBatch, RecordKind
from edge_agent.stream_models import StreamModels
from edge_tier.http import app_runner, healthz, metrics_page, problem, readiness, serve_tcp
from edge_tier.wire import Dtype, WireError, check_meta

log = logging.getLogger(__name__)

BINARY_TYPE = "application/x-edge-tier-features"
WINDOWS_TYPE = "application/x-edge-tier-windows"
_DTYPES = {"float32": Dtype.FLOAT32, "float16": Dtype.FLOAT16, "int8": Dtype.INT8}
_SCALARS = (str, int, float, bool, type(None))


class StreamWithoutModel(BadRecord):
    """Windows posted to a stream that has no model."""


@web.middleware
async def _answer_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """What a handler refuses becomes a problem+json answer, in one place."""
    try:
        return await handler(request)
    except StreamWithoutModel as e:
        return problem(404, "Not Found", str(e))
    except BadRecord as e:
        return problem(400, "Bad Request", str(e))
    except RecordTooLarge as e:
        return problem(413, "Record Too Large", str(e))
    except QueueFull as e:
        return problem(503, "Queue Full", str(e), **{"Retry-After": "1"})
    except DiskFull as e:
        return problem(503, "Disk Full", str(e), **{"Retry-After": "5"})
    except StoreError as e:
        log.error("enqueue failed: %s", e)
        return problem(500, "Queue Error", str(e))


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError as e:
        raise BadRecord(f"body is not valid JSON: {e}") from None


def _field(body: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, types):
        raise BadRecord(f"{name!r} must be {_TYPE_NAMES.get(types, 'of another type')}, not {value!r:.40}")
    return value


_TYPE_NAMES: dict[Any, str] = {str: "a string", int: "an integer", (int, float): "a number"}


def _kind(body: dict[str, Any], dim: int) -> RecordKind:
    """What the request's records share; refused here if a frame header could not carry it."""
    if not 1 <= dim <= 65536:
        raise BadRecord(f"'dim' must be 1..65536, not {dim}")
    dtype = body.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise BadRecord(f"'dtype' must be one of {sorted(_DTYPES)}, not {dtype!r:.40}")
    try:
        kind = RecordKind(
            stream=_field(body, "stream", str, None),
            dtype=_DTYPES[dtype],
            dim=dim,
            model=_field(body, "model", str, ""),
            model_version=_field(body, "model_version", str, ""),
            schema_version=_field(body, "schema_version", int, 1),
            scale=float(_field(body, "scale", (int, float), 1.0)),
        )
        kind.check()
    except (WireError, OverflowError) as e:
        raise BadRecord(str(e)) from None
    return kind


def _score(i: int, value: Any) -> float:
    try:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError
        return float(value)
    except (ValueError, OverflowError):
        raise BadRecord(f"records[{i}].score must be a finite number, not {value!r:.40}") from None


async def _no_checks() -> dict[str, bool]:
    return {}


class Endpoint:
    def __init__(self, config: AgentConfig, queue: AsyncQueue, models: StreamModels | None = None) -> None:
        self.cfg = config.endpoint
        self.queue = queue
        self.models = models
        self._model_locks: dict[int, asyncio.Lock] = {}  # one interpreter: one inference at a time
        self.status_fields: Callable[[], dict[str, Any]] = dict  # what the agent adds to /v1/status
        self.checks: Callable[[], Awaitable[dict[str, bool]]] = _no_checks  # the agent's, for /readyz
        self.allow = set(self.cfg.metadata_allow)
        self.app = web.Application(client_max_size=self.cfg.max_body_bytes, middlewares=[_answer_errors])
        self.app.add_routes(
            [
                web.post("/v1/records", self.post_records),
                web.post("/v1/windows", self.post_windows),
                web.get("/v1/status", self.get_status),
                web.get("/healthz", healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", metrics_page),
            ]
        )
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        self._runner = app_runner(self.app)
        await self._runner.setup()
        self.port = await serve_tcp(self._runner, self.cfg.host, self.cfg.port)
        if self.cfg.unix_socket is not None:
            await web.UnixSite(self._runner, str(self.cfg.unix_socket)).start()
        log.info(
            "enqueue endpoint on http://%s:%s%s",
            self.cfg.host,
            self.port,
            f" and {self.cfg.unix_socket}" if self.cfg.unix_socket else "",
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- handlers ---------------------------------------------------------

    async def post_records(self, request: web.Request) -> web.Response:
        durable = request.query.get("durable", "1") not in ("0", "false", "no")
        records: RecordBatch | list[NewRecord]
        if request.content_type == BINARY_TYPE:
            kind, records = self._parse_binary(request.query, await request.read())
        elif request.content_type == "application/json":
            body = await _json_body(request)
            kind, records = self._parse_json(body)
        else:
            return problem(
                415,
                "Unsupported Media Type",
                f"send application/json or {BINARY_TYPE}, not {request.content_type}",
            )
        result = await self.queue.enqueue(kind, records, durable=durable)
        metrics.ENQUEUED.inc(len(records))
        if result is None:
            return web.json_response({"accepted": len(records), "durable": False}, status=202)
        return web.json_response(
            {
                "accepted": len(records),
                "durable": True,
                "first_seq": result.first_seq,
                "last_seq": result.last_seq,
                "evicted": result.evicted,
            }
        )

    async def post_windows(self, request: web.Request) -> web.Response:
        """Raw sensor windows: the stream's model keeps some, and only their embeddings are queued.

        Body: ``application/x-edge-tier-windows`` (query ``stream``; n windows of float32
        samples, little-endian, row-major in the model's window shape) or JSON
        ``{"stream": ..., "windows": [...]}`` (n windows, nested or flat). The raw windows
        live only in this request's memory; a batch the model cannot take is refused whole.
        """
        if request.content_type == WINDOWS_TYPE:
            stream = request.query.get("stream", "")
            pf = self._model_of(stream)
            raw = await request.read()
            if not raw or len(raw) % (4 * pf.window):
                raise WindowRefused(
                    f"stream {stream!r}: body of {len(raw)} bytes is not n windows of "
                    f"{list(pf.window_shape)} float32 samples ({4 * pf.window} bytes each)"
                )
            windows = np.frombuffer(raw, dtype="<f4").reshape(-1, *pf.window_shape)
        elif request.content_type == "application/json":
            body = await _json_body(request)
            if not isinstance(body, dict) or not isinstance(body.get("windows"), list) or not body["windows"]:
                raise BadRecord("body must be an object with a non-empty 'windows' list")
            stream = body.get("stream", request.query.get("stream", ""))
            if not isinstance(stream, str):
                raise BadRecord(f"'stream' must be a string, not {stream!r:.40}")
            pf = self._model_of(stream)
            try:
                windows = np.asarray(body["windows"], dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise WindowRefused(f"stream {stream!r}: 'windows' must be n windows of "
                                    f"{list(pf.window_shape)} numbers ({e})") from None  # fmt: skip
        else:
            return problem(
                415,
                "Unsupported Media Type",
                f"send application/json or {WINDOWS_TYPE}, not {request.content_type}",
            )
        windows = pf.check_windows(windows)
        if not np.isfinite(windows).all():
            raise BadRecord(f"stream {stream!r}: window samples must be finite")
        dtype = pf.upload_dtype
        kind = _kind(
            {
                "stream": stream,
                "model": pf.name,
                "model_version": pf.version,
                "dtype": dtype.name.lower(),
                "scale": pf.embedding_scale if dtype is Dtype.INT8 else 1.0,
            },
            pf.embedding_dim,
        )
        async with self._model_locks.setdefault(id(pf), asyncio.Lock()):
            kept = await asyncio.to_thread(pf.keep, windows)
        result = None
        if len(kept.index):
            features, _ = pf.encode(kept.embeddings, dtype)
            result = await self.queue.enqueue(kind, RecordBatch(features=features, scores=kept.scores))
        metrics.WINDOWS.inc(len(windows))
        metrics.ENQUEUED.inc(len(kept.index))
        answer: dict[str, Any] = {
            "windows": len(windows),
            "kept": len(kept.index),
            "kept_index": kept.index.tolist(),
            "queued_bytes": len(kept.index) * kind.record_bytes,
            "model": pf.name,
            "model_version": pf.version,
        }
        if result is not None:
            answer.update(first_seq=result.first_seq, last_seq=result.last_seq, evicted=result.evicted)
        return web.json_response(answer)

    def _model_of(self, stream: str) -> Prefilter:
        pf = None if self.models is None else self.models.for_stream(stream)
        if pf is not None:
            return pf
        if self.models is not None and stream in self.models.cfg.streams:
            raise StreamWithoutModel(
                f"stream {stream!r} has no model ([streams.{stream}] manifest is unset): it takes "
                "feature vectors at POST /v1/records"
            )
        raise StreamWithoutModel(
            f"no model for stream {stream!r}: configure [prefilter] manifest, or [streams.{stream or 'NAME'}]"
        )

    def _parse_json(self, body: Any) -> tuple[RecordKind, list[NewRecord]]:
        if not isinstance(body, dict) or not isinstance(body.get("records"), list) or not body["records"]:
            raise BadRecord("body must be an object with a non-empty 'records' list")
        recs = body["records"]
        first = recs[0].get("features") if isinstance(recs[0], dict) else None
        if not isinstance(first, list) or not first:
            raise BadRecord("records[0].features must be a non-empty list of numbers")
        kind = _kind(body, len(first))
        out = []
        for i, r in enumerate(recs):
            if not isinstance(r, dict):
                raise BadRecord(f"records[{i}] must be an object")
            feats = r.get("features")
            if not isinstance(feats, list) or len(feats) != kind.dim:
                raise BadRecord(f"records[{i}].features must be a list of {kind.dim} numbers")
            for j, x in enumerate(feats):
                if isinstance(x, bool) or not isinstance(x, int | float):
                    raise BadRecord(f"records[{i}].features[{j}] must be a number, not {x!r:.40}")
            try:
                arr = np.asarray(feats, dtype=kind.dtype.np_dtype)
            except (TypeError, ValueError, OverflowError) as e:
                raise BadRecord(f"records[{i}].features: {e}") from None
            if kind.dtype is not Dtype.INT8 and not np.isfinite(arr).all():
                raise BadRecord(f"records[{i}].features: values must be finite in {kind.dtype.name.lower()}")
            created = r.get("created_ms")
            if created is not None and (
                isinstance(created, bool) or not isinstance(created, int) or not 0 <= created < 2**63
            ):
                raise BadRecord(f"records[{i}].created_ms must be milliseconds since the epoch")
            out.append(
                NewRecord(
                    arr.tobytes(), _score(i, r.get("score", 1.0)), self._meta(i, r.get("meta")), created
                )
            )
        return kind, out

    def _meta(self, i: int, meta: Any) -> dict[str, Any] | None:
        if meta is None:
            return None
        if not isinstance(meta, dict):
            raise BadRecord(f"records[{i}].meta must be an object")
        for k, v in meta.items():
            if k not in self.allow:
                raise BadRecord(
                    f"records[{i}].meta: key {k!r} is not allow-listed (endpoint.metadata_allow = "
                    f"{sorted(self.allow)})"
                )
            if not isinstance(v, _SCALARS):
                raise BadRecord(f"records[{i}].meta[{k!r}] must be a string, number, boolean or null")
        try:
            check_meta(meta)
        except WireError as e:
            raise BadRecord(f"records[{i}].meta: {e}") from None
        return meta

    def _parse_binary(self, q: Any, data: bytes) -> tuple[RecordKind, RecordBatch]:
        body: dict[str, Any] = dict(q)
        try:
            dim = int(q.get("dim", ""))
            for name, conv in (("schema_version", int), ("scale", float)):
                if name in body:
                    body[name] = conv(body[name])
        except ValueError:
            raise BadRecord(
                "query parameters 'dim' (required) and 'schema_version' must be integers, 'scale' a number"
            ) from None
        kind = _kind(body, dim)
        rb = kind.record_bytes
        n, rest = divmod(len(data), 4 + rb)
        if rest or n == 0:
            raise BadRecord(f"body of {len(data)} bytes is not n x (4 score bytes + {rb} feature bytes)")
        scores = np.frombuffer(data, dtype="<f4", count=n)
        if not np.isfinite(scores).all():
            raise BadRecord("scores must be finite")
        features = memoryview(data)[4 * n :]
        if (
            kind.dtype is not Dtype.INT8
            and not np.isfinite(np.frombuffer(features, kind.dtype.np_dtype)).all()
        ):
            raise BadRecord(f"features must be finite {kind.dtype.name.lower()} values")
        return kind, RecordBatch(features=bytes(features), scores=scores)

    async def get_status(self, request: web.Request) -> web.Response:
        st = await self.queue.call(self.queue.store.stats)
        metrics.observe_queue(st)
        return web.json_response({**st.as_dict(), **self.status_fields()})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready to take records: the queue is open and the agent runs. A broker being away
        is no reason to refuse them (store and forward), so the uplink is not a check."""
        return await readiness(await self.checks())
