"""JetStream streams and buckets the cloud side needs, created or updated idempotently."""

from __future__ import annotations

import logging

import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RawStreamMsg,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from cloud_ingest.config import StreamSettings
from cloud_ingest.errors import StreamSetupError
from edge_tier import topics

log = logging.getLogger(__name__)


def _record_stream(
    name: str, subjects: str, s: StreamSettings, age_s: int, max_bytes: int, dedup_s: int
) -> StreamConfig:
    return StreamConfig(
        name=name,
        subjects=[subjects],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=float(age_s),
        max_bytes=max_bytes,
        duplicate_window=float(dedup_s),
        num_replicas=s.replicas,
        discard=DiscardPolicy.OLD,
        allow_direct=True,
    )


def stream_configs(s: StreamSettings) -> list[StreamConfig]:
    return [
        _record_stream(
            topics.FEATURES_STREAM,
            topics.FEATURES_SUBJECTS,
            s,
            s.features_max_age_s,
            s.features_max_bytes,
            s.duplicate_window_s,
        ),
        _record_stream(
            topics.RESULTS_STREAM,
            topics.RESULTS_SUBJECTS,
            s,
            s.results_max_age_s,
            s.results_max_bytes,
            s.results_duplicate_window_s,
        ),
        StreamConfig(
            name=topics.DEADLETTER_STREAM,
            subjects=[topics.DLQ_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=float(s.deadletter_max_age_s),
            num_replicas=s.replicas,
        ),
    ]


async def ensure_streams(js: JetStreamContext, s: StreamSettings) -> KeyValue:
    """Create the streams and buckets, or bring the streams up to date; the marks' bucket."""
    for cfg in stream_configs(s):
        try:
            try:
                await js.stream_info(cfg.name)  # type: ignore[arg-type]
            except nats.js.errors.NotFoundError:
                await js.add_stream(cfg)
                log.info("created stream %s", cfg.name)
            else:
                await js.update_stream(cfg)
        except nats.js.errors.APIError as e:
            raise StreamSetupError(f"stream {cfg.name}: {e}") from e
    devices = "per-device last status (backlog, evictions, model version, online), for the result API"
    await _bucket(js, topics.DEVICES_BUCKET, s, devices)
    return await _bucket(js, topics.HWM_BUCKET, s, "per-device committed high-water mark (last seq)")


async def _bucket(js: JetStreamContext, name: str, s: StreamSettings, description: str) -> KeyValue:
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        kv = await js.create_key_value(
            KeyValueConfig(
                bucket=name, history=1, storage=StorageType.FILE, replicas=s.replicas, description=description
            )
        )
    except nats.js.errors.APIError as e:
        raise StreamSetupError(f"bucket {name}: {e}") from e
    log.info("created bucket %s", name)
    return kv


def clip_header(text: str, max_bytes: int) -> str:
    """At most ``max_bytes`` of UTF-8 on one line (headers share the message's max_payload)."""
    return text.encode()[:max_bytes].decode(errors="ignore").replace("\r", " ").replace("\n", " ")


async def publish_dead_letter(
    nc: NatsClient, js: JetStreamContext, subject: str, payload: bytes, headers: dict[str, str]
) -> None:
    """Store refused input with its reason headers; cut to what the server accepts, saying so."""
    room = nc.max_payload - 4096
    if len(payload) > room:
        headers = {**headers, topics.H_TRUNCATED_FROM: str(len(payload))}
        payload = payload[:room]
    await js.publish(subject, payload, headers=headers)


async def read_all(js: JetStreamContext, stream: str) -> list[RawStreamMsg]:
    """Every message a stream holds, in order (for tools, the demo and tests: small streams)."""
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return []
    out = []
    if info.state.messages:
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                out.append(await js.get_msg(stream, seq))
            except nats.js.errors.NotFoundError:
                continue  # deleted or aged out
    return out
