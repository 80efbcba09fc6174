"""Ingest's Prometheus metrics."""

from prometheus_client import Counter, Gauge, Histogram

FRAMES = Counter("et_ingest_frames_total", "Upload frames handled, by outcome", ["outcome"])
RECORDS = Counter("et_ingest_records_committed_total", "Records committed to JetStream")
DEADLETTERED = Counter("et_ingest_deadletter_total", "Messages sent to the dead-letter stream")
RESULTS_RELAYED = Counter("et_ingest_results_relayed_total", "Result messages relayed to MQTT")
JS_RETRIES = Counter("et_ingest_jetstream_retries_total", "Handling attempts retried for JetStream errors")
PUBLISH_SECONDS = Histogram(
    "et_ingest_publish_seconds",
    "JetStream publish latency per frame",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)

# tier-two workers
WORKER_MESSAGES = Counter(
    "et_worker_messages_total", "Features messages handled, by outcome", ["tenant", "outcome"]
)
WORKER_RECORDS = Counter("et_worker_records_total", "Records with a result written", ["tenant"])
WORKER_DEADLETTERED = Counter("et_worker_deadletter_total", "Messages dead-lettered by workers", ["reason"])
BATCH_RECORDS = Histogram(
    "et_worker_batch_records",
    "Records per inference call",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
)
INFER_SECONDS = Histogram(
    "et_worker_inference_seconds",
    "Time per inference call",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)
RESULT_PUBLISH_SECONDS = Histogram(
    "et_worker_result_publish_seconds",
    "From a batch's inference to its results acknowledged by JetStream",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
CONSUMER_PENDING = Gauge(
    "et_worker_consumer_pending", "Features messages not yet delivered, per tenant consumer", ["tenant"]
)
LOCAL_QUEUE = Gauge("et_worker_local_messages", "Messages fetched and waiting for a batch", ["tenant"])
