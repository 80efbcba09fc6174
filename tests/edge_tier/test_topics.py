"""edge_tier.topics: every name in it is in docs/topics.md and every name there is in it;
each topic and subject parses back to what built it, and a malformed one is refused."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_tier import topics

DOC = Path(__file__).resolve().parents[2] / "docs" / "topics.md"

# -- the doc and the module agree --------------------------------------------------------

# A backticked span that names something of the scheme (the doc's other spans are config
# keys, paths and values): a topic or subject, a header, a stream, a bucket, a client id.
NAME_LIKE = re.compile(r"^(\$share/|_?et[./_-]|ET_|Et-|Nats-)")
HEADER = re.compile(r"^(Et|Nats)-[A-Za-z-]+$")
KINDS = {"stream": "stream", "KV bucket": "bucket"}  # the JetStream table's kind column


def ticks(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def table(doc: str, heading: str) -> list[list[str]]:
    """The rows (cells as text) of the first table under ``## heading``."""
    section = doc.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]


def doc_kind(cell: str) -> str:
    return "consumer" if "consumer" in cell else KINDS.get(cell, cell)


def first_tick(cell: str) -> list[str]:
    return ticks(cell)[:1]


def _names(doc: str, catalogue: Mapping[str, str], js_rows: Mapping[str, list[str]]) -> list[str]:
    named = {t for t in ticks(doc) if NAME_LIKE.match(t)} | set(js_rows)
    named |= {t for r in js_rows.values() if r[1] == "KV bucket" for t in ticks(r[2])}
    return [f"the doc names {n!r}, topics does not" for n in sorted(named - set(catalogue))] + [
        f"topics defines {n!r} ({k}), the doc does not name it"
        for n, k in catalogue.items()
        if n not in named
    ]


def _mqtt_table(doc: str, catalogue: Mapping[str, str]) -> list[str]:
    in_table = {t for r in table(doc, "MQTT") for t in first_tick(r[0])}
    want = {n for n, k in catalogue.items() if k == "mqtt topic"}
    return [f"MQTT table: {t!r} is not an MQTT topic of topics" for t in sorted(in_table - want)] + [
        f"MQTT table lacks {t!r}" for t in sorted(want - in_table)
    ]


def _jetstream_table(
    js_rows: Mapping[str, list[str]],
    catalogue: Mapping[str, str],
    streams: Iterable[topics.Stream],
    buckets: Iterable[topics.Bucket],
    consumers: Iterable[topics.Consumer],
) -> list[str]:
    out = [
        f"the JetStream table has no row for the {kind} {name!r}"
        for name, kind in catalogue.items()
        if kind in ("stream", "bucket", "consumer") and name not in js_rows
    ]
    out += [
        f"the doc's {name!r} is a {doc_kind(row[1])}, topics' a {catalogue[name]}"
        for name, row in js_rows.items()
        if name in catalogue and catalogue[name] != doc_kind(row[1])
    ]
    for s in (s for s in streams if s.name in js_rows):
        row = js_rows[s.name]
        subjects, headers = set(ticks(row[2])), {t for t in ticks(row[3]) if HEADER.match(t)}
        if subjects != {s.filter, *(p.template for p in s.subjects)}:
            out.append(f"{s.name}: the doc's subjects {sorted(subjects)} are not topics' {s}")
        if headers != set(s.headers):
            out.append(f"{s.name}: the doc's headers {sorted(headers)} are not topics' {sorted(s.headers)}")
    for b in (b for b in buckets if b.name in js_rows):
        if ticks(js_rows[b.name][2]) != [b.key.template]:
            out.append(f"{b.name}: the doc's key {ticks(js_rows[b.name][2])} is not {b.key.template!r}")
    for c in (c for c in consumers if c.name in js_rows):
        if (ticks(js_rows[c.name][1]), ticks(js_rows[c.name][2])) != ([c.stream], [c.filter]):
            out.append(f"{c.name}: the doc's stream and filter are not {c.stream} {c.filter}")
    return out


def problems(
    doc: str,
    catalogue: Mapping[str, str],
    streams: Iterable[topics.Stream] = topics.STREAMS,
    buckets: Iterable[topics.Bucket] = topics.BUCKETS,
    consumers: Iterable[topics.Consumer] = topics.CONSUMERS,
) -> list[str]:
    """Every disagreement between the doc and the vocabulary; [] when they agree."""
    js_rows = {t: r for r in table(doc, "NATS JetStream") for t in first_tick(r[0])}
    return (
        _names(doc, catalogue, js_rows)
        + _mqtt_table(doc, catalogue)
        + _jetstream_table(js_rows, catalogue, streams, buckets, consumers)
    )


def uncatalogued(module: ModuleType | Mapping[str, Any]) -> list[str]:
    """Names the module defines that its catalogue lacks: a header, stream, bucket or
    consumer constant, a subject filter, or a pattern added without a place there."""
    names = vars(module) if isinstance(module, ModuleType) else module
    catalogue = names["CATALOGUE"]
    found: list[str] = []
    for attr, value in names.items():
        if isinstance(value, names["Pattern"]):
            value = value.template
        elif not (isinstance(value, str) and re.search(r"^H_|_(STREAM|BUCKET|CONSUMER|SUBJECTS)$", attr)):
            continue
        if value not in catalogue:
            found.append(f"{attr} = {value!r}")
    return found


def test_the_doc_lists_every_name_and_nothing_else() -> None:
    assert problems(DOC.read_text(), topics.CATALOGUE) == []


def test_every_name_of_the_module_is_in_its_catalogue() -> None:
    assert uncatalogued(topics) == []
    assert set(topics.CATALOGUE.values()) <= set(get_args(topics.Kind))


def test_a_name_on_one_side_only_is_found() -> None:
    """The checks above would fail: each kind of one-sided change is caught."""
    doc = DOC.read_text()
    with_extra = {**topics.CATALOGUE, "Et-Bogus": "header"}
    assert problems(doc, with_extra) == ["topics defines 'Et-Bogus' (header), the doc does not name it"]
    assert any("'et_bogus'" in p for p in problems(doc, {**topics.CATALOGUE, "et_bogus": "bucket"}))
    assert problems(doc + "\nalso `Et-Bogus`\n", topics.CATALOGUE) == [
        "the doc names 'Et-Bogus', topics does not"
    ]
    row = "| `et-bogus` | durable pull consumer on `ET_RESULTS` | `et.results.>` | x |\n"
    extra_row = doc.replace("| `demo-watch` |", row + "| `demo-watch` |")
    assert problems(extra_row, topics.CATALOGUE) == ["the doc names 'et-bogus', topics does not"]
    # a header dropped from a stream's row, though still named elsewhere on the page
    dropped = doc.replace("`Et-Parts`, ", "", 1)
    assert any(
        "ET_RESULTS: the doc's headers" in p for p in problems(dropped + "`Et-Parts`", topics.CATALOGUE)
    )
    # a stream that gains a header in topics only
    results = topics.STREAMS[1]
    more = topics.Stream(results.name, results.filter, results.subjects, (*results.headers, "Et-Bogus"))
    grown = [topics.STREAMS[0], more, *topics.STREAMS[2:]]
    catalogue = {**topics.CATALOGUE, "Et-Bogus": "header"}
    assert any("ET_RESULTS: the doc's headers" in p for p in problems(doc, catalogue, streams=grown))
    # an MQTT topic missing from the table, a kind that disagrees
    assert "MQTT table lacks 'et/{tenant}/{device}/results'" in problems(
        doc.replace("| `et/{tenant}/{device}/results` |", "| results |"), topics.CATALOGUE
    )
    assert any("'et_hwm' is a stream" in p for p in problems(doc.replace("| `et_hwm` | KV bucket |",
                                                                         "| `et_hwm` | stream |"),
                                                             topics.CATALOGUE))  # fmt: skip
    # a constant added to the module without a place in the catalogue
    assert uncatalogued({**vars(topics), "H_BOGUS": "Et-Bogus"}) == ["H_BOGUS = 'Et-Bogus'"]
    assert uncatalogued({**vars(topics), "BOGUS_STREAM": "ET_BOGUS"}) == ["BOGUS_STREAM = 'ET_BOGUS'"]
    bogus = topics.Pattern("subject", ".", lambda t: f"et.bogus.{t}", "tenant")
    assert uncatalogued({**vars(topics), "BOGUS": bogus}) == ["BOGUS = 'et.bogus.{tenant}'"]


# -- build, then parse ---------------------------------------------------------------------

ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
known = ids.filter(lambda s: s != topics.UNKNOWN)
channels = st.sampled_from(topics.CHANNELS)
shas = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)


@given(ids, ids, channels)
def test_mqtt_topic_round_trip(tenant: str, device: str, channel: Any) -> None:
    assert topics.parse_mqtt_topic(topics.mqtt_topic(tenant, device, channel)) == (tenant, device, channel)


@given(ids, shas, st.integers(0, 10**6))
def test_model_chunk_topic_round_trip(tenant: str, sha: str, index: int) -> None:
    topic = topics.model_chunk_topic(tenant, sha, index)
    assert topics.parse_model_chunk_topic(topic) == (tenant, sha, index)
    with pytest.raises(topics.TopicError):
        topics.parse_mqtt_topic(topic)  # five levels: never a device's topic


@given(ids, ids, st.booleans())
def test_features_subject_round_trip(tenant: str, device: str, rescued: bool) -> None:
    subject = topics.features_subject(tenant, device, rescued=rescued)
    assert topics.parse_features_subject(subject) == (tenant, device, rescued)
    assert topics.tenant_of_features_subject(subject) == tenant


@given(ids, ids)
def test_results_subject_round_trip(tenant: str, device: str) -> None:
    assert topics.parse_results_subject(topics.results_subject(tenant, device)) == (tenant, device)


@given(st.sampled_from(topics.DLQ_SOURCES), st.none() | known, st.none() | known)
def test_dlq_subject_round_trip(source: str, tenant: str | None, device: str | None) -> None:
    assert topics.parse_dlq_subject(topics.dlq_subject(source, tenant, device)) == (source, tenant, device)


@given(ids, ids)
def test_device_key_round_trip(tenant: str, device: str) -> None:
    assert topics.parse_device_key(topics.device_key(tenant, device)) == (tenant, device)
    assert topics.parse_hwm_key(topics.hwm_key(tenant, device)) == (tenant, device)


@given(ids, st.none() | ids)
def test_worker_consumer_round_trip(tenant: str, prefix: str | None) -> None:
    if prefix is None:
        assert topics.parse_worker_consumer(topics.worker_consumer(tenant)) == tenant
    else:
        assert topics.parse_worker_consumer(topics.worker_consumer(tenant, prefix), prefix) == tenant


def _values(pattern: topics.Pattern) -> st.SearchStrategy[tuple[str, ...]]:
    """Valid values for each field of a pattern: its channel choices, its shapes, or ids."""
    by_field: dict[str, st.SearchStrategy[str]] = {"channel": channels, "index": st.integers(0, 99).map(str)}
    return st.tuples(*(by_field.get(f, ids) for f in pattern.fields))


PATTERNS = [v for v in vars(topics).values() if isinstance(v, topics.Pattern)]
PATTERNS.append(topics.worker_consumer_pattern())


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.template)
@given(data=st.data())
def test_every_pattern_parses_what_it_builds(pattern: topics.Pattern, data: st.DataObject) -> None:
    values = data.draw(_values(pattern))
    assert pattern.parse(pattern.build(*values)) == values


# -- malformed ones are refused, by name -------------------------------------------------

PARSERS: list[tuple[Callable[[str], tuple[Any, ...] | str], Callable[..., str], str]] = [
    (topics.parse_mqtt_topic, topics.mqtt_topic, "/"),
    (topics.parse_model_chunk_topic, topics.model_chunk_topic, "/"),
    (topics.parse_features_subject, lambda t, d, r: topics.features_subject(t, d, rescued=r), "."),
    (topics.parse_results_subject, topics.results_subject, "."),
    (topics.parse_dlq_subject, topics.dlq_subject, "."),
    (topics.parse_device_key, topics.device_key, "."),
    (topics.parse_worker_consumer, topics.worker_consumer, "-"),
]
LEVELS = ["et", "features", "results", "dlq", "rescued", "_models", "up", "status", "a", "b", "_", "", "0",
          "01", "ingest", "tier2", "a.b", "a/b", "+", ">"]  # fmt: skip


@pytest.mark.parametrize(("parse", "build", "sep"), PARSERS, ids=lambda x: getattr(x, "__name__", ""))
@given(levels=st.lists(st.sampled_from(LEVELS) | st.text(max_size=4), max_size=7))
def test_a_parser_takes_only_what_its_builder_makes(
    parse: Callable[[str], tuple[Any, ...] | str], build: Callable[..., str], sep: str, levels: list[str]
) -> None:
    """Whatever the text: refused with its name in the message, or the exact inverse."""
    text = sep.join(levels)
    try:
        parts = parse(text)
    except topics.TopicError as e:
        assert repr(text) in str(e)
        return
    assert build(*(parts if isinstance(parts, tuple) else (parts,))) == text


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (topics.parse_mqtt_topic, "et/acme/press-7/bogus"),
        (topics.parse_mqtt_topic, "et/acme/press-7"),
        (topics.parse_mqtt_topic, "et//press-7/up"),
        (topics.parse_mqtt_topic, "xx/acme/press-7/up"),
        (topics.parse_mqtt_topic, "et/acme/press-7/up/more"),
        (topics.parse_model_chunk_topic, "et/acme/_models/ab/01"),
        (topics.parse_model_chunk_topic, "et/acme/models/ab/1"),
        (topics.parse_features_subject, "et.features.acme"),
        (topics.parse_features_subject, "et.features.acme.press-7.other"),
        (topics.parse_features_subject, "et.results.acme.press-7"),
        (topics.parse_results_subject, "et.results.acme.press-7.x"),
        (topics.parse_dlq_subject, "et.dlq.ingest.acme"),
        (topics.parse_device_key, "acme"),
        (topics.parse_device_key, "acme.press-7.x"),
        (topics.parse_worker_consumer, "et-tier2-"),
        (topics.parse_worker_consumer, "other-acme"),
    ],
)
def test_malformed_names_are_refused_by_name(parse: Callable[[str], object], text: str) -> None:
    with pytest.raises(topics.TopicError, match=re.escape(repr(text))):
        parse(text)
    assert issubclass(topics.TopicError, ValueError)  # callers that caught ValueError still do


def test_the_old_names_still_answer() -> None:
    """What edge_agent, edge_provision and the cloud used before the vocabulary grew."""
    assert topics.mqtt_filter("up") == "et/+/+/up" == topics.INGEST_UPLOADS
    assert topics.model_chunks_filter("acme") == "et/acme/_models/+/+"
    assert topics.tenant_features("acme") == "et.features.acme.>"
    assert topics.device_key is topics.hwm_key and topics.worker_consumer("acme") == "et-tier2-acme"
    assert (topics.H_FIRST, topics.H_LAST, topics.H_PREV, topics.H_RECORDS) == (
        "Et-First-Seq", "Et-Last-Seq", "Et-Prev-Seq", "Et-Records")  # fmt: skip
    assert topics.tenant_of_features_subject("et.results.acme.d") is None
    assert topics.shared_subscription("g", topics.INGEST_UPLOADS) == "$share/g/et/+/+/up"
    assert topics.agent_client_id("acme", "d") == "et-acme-d"
    assert (
        topics.service_client_id("ingest", "0") == "et-ingest-0"
        and topics.service_client_id("api") == "et-api"
    )
    assert topics.result_msg_id("u", 0) == "u" and topics.result_msg_id("u", 2) == "u#2"
    assert topics.rescued_msg_id("u") == "rescued.u" and topics.worker_dlq_msg_id(7) == "dlq.worker.7"
    assert (
        topics.ingest_dlq_msg_id("t", b"p").startswith("dlq.")
        and len(topics.ingest_dlq_msg_id("t", b"")) == 68
    )


def test_mqtt_names_map_to_the_subjects_nats_servers_mqtt_listener_uses() -> None:
    assert topics.mqtt_as_nats(topics.mqtt_topic("acme", "press-7", "up")) == "et.acme.press-7.up"
    assert topics.mqtt_as_nats(topics.mqtt_filter("results", "acme")) == "et.acme.*.results"
    assert topics.mqtt_as_nats(topics.model_chunks_filter("+")) == "et.*._models.*.*"
    assert topics.mqtt_as_nats("et/#") == "et.>"
