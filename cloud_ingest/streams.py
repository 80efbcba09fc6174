"""JetStream streams and buckets the cloud side needs, created or updated idempotently."""

from __future__ import annotations

import logging

import nats.js.errors
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


def stream_configs(s: StreamSettings) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=topics.FEATURES_STREAM,
            subjects=[topics.FEATURES_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=float(s.features_max_age_s),
            max_bytes=s.features_max_bytes,
            duplicate_window=float(s.duplicate_window_s),
            num_replicas=s.replicas,
            discard=DiscardPolicy.OLD,
            allow_direct=True,
        ),
        StreamConfig(
            name=topics.RESULTS_STREAM,
            subjects=[topics.RESULTS_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=float(s.results_max_age_s),
            max_bytes=s.results_max_bytes,
            duplicate_window=float(s.results_duplicate_window_s),
            num_replicas=s.replicas,
            discard=DiscardPolicy.OLD,
            allow_direct=True,
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
    """Create the streams and the high-water-mark bucket, or bring them up to date."""
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
    try:
        return await js.key_value(topics.HWM_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        kv = await js.create_key_value(
            KeyValueConfig(
                bucket=topics.HWM_BUCKET,
                history=1,
                storage=StorageType.FILE,
                replicas=s.replicas,
                description="per-device committed high-water mark (last committed seq)",
            )
        )
    except nats.js.errors.APIError as e:
        raise StreamSetupError(f"bucket {topics.HWM_BUCKET}: {e}") from e
    log.info("created bucket %s", topics.HWM_BUCKET)
    return kv


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
