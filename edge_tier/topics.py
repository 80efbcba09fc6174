"""The topic and subject scheme, in one place (see docs/topics.md).

MQTT:  et/{tenant}/{device}/{up|receipt|status|control|results}
       et/{tenant}/_models/{sha256}/{index}   (retained model chunks, shared by a tenant)
NATS:  et.features.{tenant}.{device}   (stream ET_FEATURES)
       et.features.{tenant}.{device}.rescued (the same stream: records rescued from a
                                         set-aside queue file, outside the device's chain)
       et.results.{tenant}.{device}    (stream ET_RESULTS)
       et.dlq.{source}.{tenant}.{device} (stream ET_DEADLETTER)
Ids are restricted (see ``wire.validate_id``) so they are safe in both schemes.
"""

from __future__ import annotations

from typing import Literal

ROOT = "et"
Channel = Literal["up", "receipt", "status", "control", "results"]
CHANNELS: tuple[str, ...] = ("up", "receipt", "status", "control", "results")


def mqtt_topic(tenant: str, device: str, channel: Channel) -> str:
    return f"{ROOT}/{tenant}/{device}/{channel}"


def mqtt_filter(channel: Channel, tenant: str = "+", device: str = "+") -> str:
    return f"{ROOT}/{tenant}/{device}/{channel}"


def parse_mqtt_topic(topic: str) -> tuple[str, str, str]:
    """``et/T/D/channel`` -> (T, D, channel); ValueError for anything else."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != ROOT or parts[3] not in CHANNELS or not parts[1] or not parts[2]:
        raise ValueError(f"topic {topic!r} is not et/{{tenant}}/{{device}}/{{channel}}")
    return parts[1], parts[2], parts[3]


MODELS = "_models"  # chunks are five levels deep, a device's topics four: they never meet


def model_chunk_topic(tenant: str, sha256: str, index: int) -> str:
    """One retained chunk of a model update; chunks are shared by a tenant's devices."""
    return f"{ROOT}/{tenant}/{MODELS}/{sha256}/{index}"


def model_chunks_filter(tenant: str) -> str:
    """Every chunk of a tenant's models: exactly two levels below ``_models``, so not the
    four-level topics of a device that happens to be named ``_models``."""
    return f"{ROOT}/{tenant}/{MODELS}/+/+"


FEATURES_STREAM = "ET_FEATURES"
DEADLETTER_STREAM = "ET_DEADLETTER"
HWM_BUCKET = "et_hwm"
DEVICES_BUCKET = "et_devices"  # key {tenant}.{device}: the device's last status, as ingest saw it


RESCUED = "rescued"


def features_subject(tenant: str, device: str, *, rescued: bool = False) -> str:
    """A device's uploads; ``rescued``: its rescued records, kept off the chain's subject so
    that the last message there is always the chain's last commit (the high-water mark)."""
    return f"{ROOT}.features.{tenant}.{device}" + (f".{RESCUED}" if rescued else "")


FEATURES_SUBJECTS = f"{ROOT}.features.>"


def tenant_features(tenant: str) -> str:
    return f"{ROOT}.features.{tenant}.>"


def parse_features_subject(subject: str) -> tuple[str, str, bool] | None:
    """``et.features.T.D[.rescued]`` -> (T, D, rescued); None for anything else."""
    parts = subject.split(".")
    if parts[:2] != [ROOT, "features"] or len(parts) not in (4, 5) or not parts[2] or not parts[3]:
        return None
    if len(parts) == 5 and parts[4] != RESCUED:
        return None
    return parts[2], parts[3], len(parts) == 5


def tenant_of_features_subject(subject: str) -> str | None:
    parsed = parse_features_subject(subject)
    return parsed[0] if parsed else None


# Headers ingest sets on every ET_FEATURES message (docs/topics.md).
H_FIRST, H_LAST, H_PREV, H_RECORDS = "Et-First-Seq", "Et-Last-Seq", "Et-Prev-Seq", "Et-Records"

RESULTS_STREAM = "ET_RESULTS"
RESULTS_SUBJECTS = f"{ROOT}.results.>"


def results_subject(tenant: str, device: str) -> str:
    return f"{ROOT}.results.{tenant}.{device}"


def worker_consumer(tenant: str, prefix: str = "et-tier2") -> str:
    """The durable pull consumer tier-two workers share for one tenant's features."""
    return f"{prefix}-{tenant}"


def dlq_subject(source: str, tenant: str | None = None, device: str | None = None) -> str:
    return f"{ROOT}.dlq.{source}.{tenant or '_'}.{device or '_'}"


DLQ_SUBJECTS = f"{ROOT}.dlq.>"


def hwm_key(tenant: str, device: str) -> str:
    return f"{tenant}.{device}"


device_key = hwm_key
