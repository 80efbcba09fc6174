"""The agent's Prometheus metrics (served on the local endpoint at /metrics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from edge_agent.store import QueueStats

ENQUEUED = Counter("et_agent_enqueued_records_total", "Records accepted into the queue")
WINDOWS = Counter("et_agent_windows_total", "Raw windows seen by the prefilter (kept or not)")
DELIVERED = Counter("et_agent_delivered_records_total", "Records receipted by the cloud and deleted")
FRAMES_SENT = Counter("et_agent_frames_sent_total", "Upload frames published (including re-sends)")
FRAMES_RESENT = Counter("et_agent_frames_resent_total", "Upload frames published again")
BYTES_SENT = Counter("et_agent_upload_bytes_total", "Bytes of upload frames published")
FRAMES_IN_FLIGHT = Gauge("et_agent_frames_in_flight", "Frames sent and not yet receipted")
RECEIPT_LATENCY = Histogram(
    "et_agent_receipt_seconds",
    "Time from a frame's first send to its receipt",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
QUEUE_RECORDS = Gauge("et_agent_queue_records", "Records in the queue")
QUEUE_BYTES = Gauge("et_agent_queue_bytes", "Bytes charged to the queue's budget")
QUEUE_OLDEST_AGE = Gauge("et_agent_queue_oldest_age_seconds", "Age of the oldest queued record")
EVICTED = Gauge("et_agent_evicted_records", "Records lost by policy, cumulative", ["reason"])
CONTROL_GENERATION = Gauge("et_agent_control_generation", "Generation of the control document applied")
CONTROL_REFUSED = Counter(
    "et_agent_control_refused_total",
    "Control documents refused: malformed, unsigned, forged, replayed, expired",
)
UPLOADS_PAUSED = Gauge("et_agent_uploads_paused", "1 while the control channel holds uploads")
MODEL_INFO = Gauge(
    "et_agent_model_info", "Each stream model running (1), by version and key", ["version", "stream"]
)


def observe_queue(st: QueueStats) -> None:
    QUEUE_RECORDS.set(st.records)
    QUEUE_BYTES.set(st.bytes)
    age = st.as_dict()["oldest_age_s"]
    QUEUE_OLDEST_AGE.set(age or 0.0)
    for reason, n in st.evictions.items():
        EVICTED.labels(reason).set(n)
