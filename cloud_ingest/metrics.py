"""Ingest's Prometheus metrics."""

from prometheus_client import Counter, Histogram

FRAMES = Counter("et_ingest_frames_total", "Upload frames handled, by outcome", ["outcome"])
RECORDS = Counter("et_ingest_records_committed_total", "Records committed to JetStream")
DEADLETTERED = Counter("et_ingest_deadletter_total", "Messages sent to the dead-letter stream")
JS_RETRIES = Counter("et_ingest_jetstream_retries_total", "Handling attempts retried for JetStream errors")
PUBLISH_SECONDS = Histogram(
    "et_ingest_publish_seconds",
    "JetStream publish latency per frame",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
