"""Every protocol name, in one place (docs/topics.md): MQTT topics, NATS subjects, header
names, stream, bucket, consumer and client names. Pure vocabulary, like nats.py's
``js/api.py``: no I/O, no imports of the services.

MQTT:  et/{tenant}/{device}/{up|receipt|status|control|results}
       et/{tenant}/_models/{sha256}/{index}   (retained model chunks, shared by a tenant)
NATS:  et.features.{tenant}.{device}   (stream ET_FEATURES)
       et.features.{tenant}.{device}.rescued (the same stream: records rescued from a
                                         set-aside queue file, outside the device's chain)
       et.results.{tenant}.{device}    (stream ET_RESULTS)
       et.dlq.{source}.{tenant}.{device} (stream ET_DEADLETTER)
KV:    et_hwm, et_devices, keys {tenant}.{device}

Each topic and subject is one :class:`Pattern`: its builder fills the template, its
parser reads the same template back (the builder's inverse) and raises
:class:`TopicError` naming what it was given. Ids are restricted (see
``wire.validate_id``: ``[A-Za-z0-9_-]``, no ``/`` or ``.``) so they are safe in both schemes.
``CATALOGUE`` lists every name by kind; tests/edge_tier/test_topics.py holds it to the doc.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache, partial
from typing import Literal, get_args


class TopicError(ValueError):
    """A topic, subject or name that is not of the scheme; the message names it."""


class Pattern:
    """One name scheme, read off its builder: ``template`` is the builder's output for
    ``{field}`` placeholders, ``parse`` is the builder's inverse, compiled from that template.

    ``build`` is the builder itself (a plain f-string function: it is on the hot path, and
    ids are validated where they enter). ``parse`` gives the field values back, or raises
    :class:`TopicError` naming the text. A field is a whole level between ``sep``; it
    matches a non-empty level without ``sep``, or one of its ``choices``, or the regular
    expression in ``shapes``."""

    __slots__ = ("_regex", "build", "fields", "sep", "template", "what")

    def __init__(
        self,
        what: str,
        sep: str,
        build: Callable[..., str],
        *fields: str,
        choices: Mapping[str, tuple[str, ...]] | None = None,
        shapes: Mapping[str, str] | None = None,
    ) -> None:
        self.what, self.sep, self.build, self.fields = what, sep, build, fields
        self.template = build(*(f"{{{f}}}" for f in fields))
        rx, found = [], []
        for level in self.template.split(sep):
            name = level[1:-1] if level.startswith("{") and level.endswith("}") else None
            if name not in fields:
                rx.append(re.escape(level))
            elif choices and name in choices:
                rx.append("(" + "|".join(map(re.escape, choices[name])) + ")")
            else:
                rx.append(f"({(shapes or {}).get(name, f'[^{re.escape(sep)}]+')})")
            found += [name] if name in fields else []
        if tuple(found) != fields:
            raise ValueError(f"{self.template!r}: the fields {fields} are not whole levels, in order")
        self._regex = re.compile(re.escape(sep).join(rx))

    def parse(self, text: str) -> tuple[str, ...]:
        m = self._regex.fullmatch(text)
        if m is None:
            raise TopicError(f"{self.what} {text!r} is not {self.template}")
        return m.groups()

    def __repr__(self) -> str:
        return f"Pattern({self.template!r})"


ROOT = "et"
UNKNOWN = "_"  # the tenant or device level of a dead letter whose sender is not known
ID_SHAPE = "[A-Za-z0-9_-]{1,64}"  # wire.validate_id's ids, where a level alone cannot tell

# -- MQTT ----------------------------------------------------------------------------

Channel = Literal["up", "receipt", "status", "control", "results"]
CHANNELS: tuple[str, ...] = get_args(Channel)
MODELS = "_models"  # chunks are five levels deep, a device's topics four: they never meet


def mqtt_topic(tenant: str, device: str, channel: Channel) -> str:
    return f"{ROOT}/{tenant}/{device}/{channel}"


def mqtt_filter(channel: Channel, tenant: str = "+", device: str = "+") -> str:
    return f"{ROOT}/{tenant}/{device}/{channel}"


def model_chunk_topic(tenant: str, sha256: str, index: int) -> str:
    """One retained chunk of a model update; chunks are shared by a tenant's devices."""
    return f"{ROOT}/{tenant}/{MODELS}/{sha256}/{index}"


def model_chunks_filter(tenant: str) -> str:
    """Every chunk of a tenant's models: exactly two levels below ``_models``, so not the
    four-level topics of a device that happens to be named ``_models``."""
    return f"{ROOT}/{tenant}/{MODELS}/+/+"


def mqtt_as_nats(topic_filter: str) -> str:
    """The subject (or filter) nats-server's MQTT listener uses for an MQTT topic (or filter):
    levels joined by ``.``, ``+`` as ``*``, ``#`` as ``>``. Its permissions are on these."""
    return ".".join({"+": "*", "#": ">"}.get(level, level) for level in topic_filter.split("/"))


DEVICE_TOPIC = Pattern("topic", "/", mqtt_topic, "tenant", "device", "channel", choices={"channel": CHANNELS})
MODEL_CHUNK_TOPIC = Pattern(
    "topic", "/", model_chunk_topic, "tenant", "sha256", "index", shapes={"index": "0|[1-9][0-9]*"}
)


def parse_mqtt_topic(topic: str) -> tuple[str, str, str]:
    """``et/T/D/channel`` -> (T, D, channel); :class:`TopicError` (a ValueError) otherwise."""
    tenant, device, channel = DEVICE_TOPIC.parse(topic)
    return tenant, device, channel


def parse_model_chunk_topic(topic: str) -> tuple[str, str, int]:
    """``et/T/_models/SHA/I`` -> (T, SHA, I); :class:`TopicError` otherwise."""
    tenant, sha256, index = MODEL_CHUNK_TOPIC.parse(topic)
    return tenant, sha256, int(index)


SHARED = "$share"
INGEST_SHARED_GROUP = "et-ingest"  # the default of ingest.shared_group
INGEST_UPLOADS = mqtt_filter("up")  # ingest subscribes to every device's uploads
INGEST_STATUSES = mqtt_filter("status")  # ... and statuses (never shared: retained ones)


def shared_subscription(group: str, topic_filter: str) -> str:
    """An MQTT 5 shared subscription: the group's subscribers split the messages."""
    return f"{SHARED}/{group}/{topic_filter}"


def agent_client_id(tenant: str, device: str) -> str:
    """The agent's MQTT client id (a persistent session: receipts wait for it)."""
    return f"{ROOT}-{tenant}-{device}"


def service_client_id(service: str, instance: str | None = None) -> str:
    """A cloud service's MQTT client id and NATS connection name: ``et-ingest-0``, ``et-api``."""
    return f"{ROOT}-{service}" + (f"-{instance}" if instance is not None else "")


# -- NATS subjects -------------------------------------------------------------------

# Ingest processes tell each other the marks they commit (core NATS, no stream), so the
# next frame of a device, which a shared subscription may hand to another process, is
# not a cache miss there. Outside ``et.>``: in the embedded broker a device's MQTT topic
# ``et/...`` is a subject under ``et.``, and no device may reach this one.
INGEST_MARKS = "_et.ingest.marks"


def ingest_marks_subject(instance: str) -> str:
    return f"{INGEST_MARKS}.{instance}"


INGEST_MARKS_SUBJECT = Pattern("subject", ".", ingest_marks_subject, "instance")
INGEST_MARKS_FILTER = ingest_marks_subject("*")

RESCUED = "rescued"
FEATURES_SUBJECTS = f"{ROOT}.features.>"
RESULTS_SUBJECTS = f"{ROOT}.results.>"
DLQ_SUBJECTS = f"{ROOT}.dlq.>"
DLQ_SOURCES: tuple[str, ...] = ("ingest", "worker")
SOURCE_INGEST, SOURCE_WORKER = DLQ_SOURCES


def features_subject(tenant: str, device: str, *, rescued: bool = False) -> str:
    """A device's uploads; ``rescued``: its rescued records, kept off the chain's subject so
    that the last message there is always the chain's last commit (the high-water mark)."""
    return f"{ROOT}.features.{tenant}.{device}" + (f".{RESCUED}" if rescued else "")


def tenant_features(tenant: str) -> str:
    """Every features subject of one tenant (its worker consumer's filter)."""
    return f"{ROOT}.features.{tenant}.>"


def results_subject(tenant: str, device: str) -> str:
    return f"{ROOT}.results.{tenant}.{device}"


def dlq_subject(source: str, tenant: str | None = None, device: str | None = None) -> str:
    """Where ``source`` (``ingest`` or ``worker``) dead-letters; an unknown sender is ``_``."""
    return f"{ROOT}.dlq.{source}.{tenant or UNKNOWN}.{device or UNKNOWN}"


FEATURES_SUBJECT = Pattern("subject", ".", features_subject, "tenant", "device")
RESCUED_SUBJECT = Pattern("subject", ".", partial(features_subject, rescued=True), "tenant", "device")
TENANT_FEATURES = Pattern("subject filter", ".", tenant_features, "tenant")
RESULTS_SUBJECT = Pattern("subject", ".", results_subject, "tenant", "device")
DLQ_SUBJECT = Pattern("subject", ".", dlq_subject, "source", "tenant", "device")


def parse_features_subject(subject: str) -> tuple[str, str, bool]:
    """``et.features.T.D[.rescued]`` -> (T, D, rescued); :class:`TopicError` otherwise."""
    for pattern, rescued in ((FEATURES_SUBJECT, False), (RESCUED_SUBJECT, True)):
        with contextlib.suppress(TopicError):
            tenant, device = pattern.parse(subject)
            return tenant, device, rescued
    raise TopicError(f"subject {subject!r} is not {FEATURES_SUBJECT.template}[.{RESCUED}]")


def tenant_of_features_subject(subject: str) -> str | None:
    """The tenant of a features subject; None for anything else."""
    try:
        return parse_features_subject(subject)[0]
    except TopicError:
        return None


def parse_results_subject(subject: str) -> tuple[str, str]:
    """``et.results.T.D`` -> (T, D); :class:`TopicError` otherwise."""
    tenant, device = RESULTS_SUBJECT.parse(subject)
    return tenant, device


def parse_dlq_subject(subject: str) -> tuple[str, str | None, str | None]:
    """``et.dlq.S.T.D`` -> (S, T, D), ``_`` read back as None; :class:`TopicError` otherwise."""
    source, tenant, device = DLQ_SUBJECT.parse(subject)
    return source, None if tenant == UNKNOWN else tenant, None if device == UNKNOWN else device


# -- headers -------------------------------------------------------------------------

# NATS's own, set by ingest and workers
H_MSG_ID = "Nats-Msg-Id"  # JetStream drops a second message with the id (duplicate window)
H_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"  # else refused: 10071
# ET_FEATURES (ingest); ET_RESULTS carries H_FIRST, H_LAST and H_RECORDS too, for the result API
H_FIRST, H_LAST, H_PREV, H_RECORDS = "Et-First-Seq", "Et-Last-Seq", "Et-Prev-Seq", "Et-Records"
# ET_RESULTS (workers)
H_UPLOAD_ID, H_PART, H_PARTS, H_PRODUCED_MS = "Et-Upload-Id", "Et-Part", "Et-Parts", "Et-Produced-Ms"
# ET_DEADLETTER (ingest and workers; H_UPLOAD_ID too where the upload is known)
H_REASON, H_SOURCE, H_TRUNCATED_FROM = "Et-Reason", "Et-Source", "Et-Truncated-From"
H_TOPIC = "Et-Topic"  # ingest's: the MQTT topic it came on
H_SUBJECT, H_STREAM_SEQ, H_DELIVERIES = "Et-Subject", "Et-Stream-Seq", "Et-Deliveries"  # workers'

FEATURES_HEADERS = (H_MSG_ID, H_EXPECTED_LAST_SUBJECT_SEQ, H_FIRST, H_LAST, H_PREV, H_RECORDS)
RESULTS_HEADERS = (H_MSG_ID, H_UPLOAD_ID, H_PART, H_PARTS, H_RECORDS, H_FIRST, H_LAST, H_PRODUCED_MS)
DEADLETTER_HEADERS = (
    H_MSG_ID, H_REASON, H_SOURCE, H_UPLOAD_ID, H_TRUNCATED_FROM, H_TOPIC, H_SUBJECT, H_STREAM_SEQ,
    H_DELIVERIES,
)  # fmt: skip


def rescued_msg_id(upload_id: str) -> str:
    """The ``Nats-Msg-Id`` of a rescued frame's new records: never a chain frame's id."""
    return f"{RESCUED}.{upload_id}"


def result_msg_id(upload_id: str, part: int) -> str:
    """The ``Nats-Msg-Id`` of one part of an upload's results: the upload id, then ``#part``."""
    return upload_id if part == 0 else f"{upload_id}#{part}"


def ingest_dlq_msg_id(topic: str, payload: bytes) -> str:
    """Ingest's dead letters are told apart by content: a redelivered one is stored once."""
    return "dlq." + hashlib.sha256(topic.encode() + payload).hexdigest()


def worker_dlq_msg_id(stream_seq: int) -> str:
    """A worker's dead letter of the features message at ``stream_seq``: stored once."""
    return f"dlq.{SOURCE_WORKER}.{stream_seq}"


# -- streams, buckets, consumers -----------------------------------------------------

FEATURES_STREAM = "ET_FEATURES"
RESULTS_STREAM = "ET_RESULTS"
DEADLETTER_STREAM = "ET_DEADLETTER"
HWM_BUCKET = "et_hwm"
DEVICES_BUCKET = "et_devices"  # key {tenant}.{device}: the device's last status, as ingest saw it

RESULTS_RELAY_CONSUMER = "et-results-mqtt"  # ingest processes share it to relay results to MQTT
DEMO_CONSUMER = "demo-watch"  # edge-tier-demo's count of the answers (edge_tier_harness.demo)
WORKER_CONSUMER_PREFIX = "et-tier2"  # the default of worker.consumer_prefix


def hwm_key(tenant: str, device: str) -> str:
    return f"{tenant}.{device}"


device_key = hwm_key
DEVICE_KEY = Pattern("key", ".", device_key, "tenant", "device")


def parse_device_key(key: str) -> tuple[str, str]:
    """``T.D`` (a key of et_hwm or et_devices) -> (T, D); :class:`TopicError` otherwise."""
    tenant, device = DEVICE_KEY.parse(key)
    return tenant, device


parse_hwm_key = parse_device_key


def worker_consumer(tenant: str, prefix: str = WORKER_CONSUMER_PREFIX) -> str:
    """The durable pull consumer tier-two workers share for one tenant's features."""
    return f"{prefix}-{tenant}"


@cache
def worker_consumer_pattern(prefix: str = WORKER_CONSUMER_PREFIX) -> Pattern:
    return Pattern(
        "consumer", "-", partial(worker_consumer, prefix=prefix), "tenant", shapes={"tenant": ID_SHAPE}
    )


def parse_worker_consumer(name: str, prefix: str = WORKER_CONSUMER_PREFIX) -> str:
    """``{prefix}-T`` -> T; :class:`TopicError` otherwise."""
    (tenant,) = worker_consumer_pattern(prefix).parse(name)
    return tenant


# -- the catalogue: every name above, by kind; docs/topics.md lists the same -----------


@dataclass(frozen=True, slots=True)
class Stream:
    name: str
    filter: str  # the stream's subjects
    subjects: tuple[Pattern, ...]  # what is published there
    headers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Bucket:
    name: str
    key: Pattern


@dataclass(frozen=True, slots=True)
class Consumer:
    name: str  # a pattern where there is one per tenant
    stream: str
    filter: str


STREAMS = (
    Stream(FEATURES_STREAM, FEATURES_SUBJECTS, (FEATURES_SUBJECT, RESCUED_SUBJECT), FEATURES_HEADERS),
    Stream(RESULTS_STREAM, RESULTS_SUBJECTS, (RESULTS_SUBJECT,), RESULTS_HEADERS),
    Stream(DEADLETTER_STREAM, DLQ_SUBJECTS, (DLQ_SUBJECT,), DEADLETTER_HEADERS),
)
BUCKETS = (Bucket(HWM_BUCKET, DEVICE_KEY), Bucket(DEVICES_BUCKET, DEVICE_KEY))
CONSUMERS = (
    Consumer(RESULTS_RELAY_CONSUMER, RESULTS_STREAM, RESULTS_SUBJECTS),
    Consumer(worker_consumer_pattern().template, FEATURES_STREAM, TENANT_FEATURES.template),
    Consumer(DEMO_CONSUMER, RESULTS_STREAM, RESULTS_SUBJECTS),
)
MQTT_TOPICS = (
    *(DEVICE_TOPIC.build("{tenant}", "{device}", c) for c in CHANNELS),
    MODEL_CHUNK_TOPIC.template,
)
MQTT_FILTERS = (
    INGEST_UPLOADS,
    INGEST_STATUSES,
    shared_subscription("{group}", INGEST_UPLOADS),
    model_chunks_filter("{tenant}"),
)
CLIENT_IDS = (
    agent_client_id("{tenant}", "{device}"),
    service_client_id("ingest", "{instance}"),
    service_client_id("worker", "{instance}"),
    service_client_id("api"),
)

Kind = Literal["mqtt scheme", "mqtt topic", "mqtt filter", "subject", "subject filter", "header",
               "stream", "bucket", "key", "consumer", "client id", "shared group"]  # fmt: skip


def _catalogue() -> dict[str, Kind]:
    kinds: list[tuple[Kind, Iterable[str]]] = [
        ("mqtt scheme", (DEVICE_TOPIC.template,)),  # its channels are the first five topics
        ("mqtt topic", MQTT_TOPICS),
        ("mqtt filter", MQTT_FILTERS),
        ("subject", (*(p.template for s in STREAMS for p in s.subjects), INGEST_MARKS_SUBJECT.template)),
        ("subject filter", (*(s.filter for s in STREAMS), TENANT_FEATURES.template)),
        ("header", (h for s in STREAMS for h in s.headers)),
        ("stream", (s.name for s in STREAMS)),
        ("bucket", (b.name for b in BUCKETS)),
        ("key", (b.key.template for b in BUCKETS)),
        ("consumer", (c.name for c in CONSUMERS)),
        ("client id", CLIENT_IDS),
        ("shared group", (INGEST_SHARED_GROUP,)),
    ]
    return {name: kind for kind, names in kinds for name in names}


CATALOGUE: Mapping[str, Kind] = _catalogue()
