"""Ingest against a device that misbehaves: raw frames from a plain MQTT client.

Real mosquitto, real nats-server, ingest as a child process. Each test checks
the receipt the device gets, what JetStream holds, and that ingest keeps going.
"""

from __future__ import annotations

import http.client
import time

from edge_tier import topics
from edge_tier_harness.services import IngestProcess
from tests.support import (
    DEVICE,
    TENANT,
    Pipeline,
    RawClient,
    assert_exactly_once,
    frame,
    ingest_config,
    stream_messages,
    stream_seqs,
    wait_until,
)


def statuses(client: RawClient) -> list[str]:
    return [r["status"] for r in client.receipts]


def test_frames_commit_in_chain_order_and_gaps_are_answered(ingest_only) -> None:
    p = ingest_only()
    c = RawClient(p.mosquitto.port)
    c.publish(frame(101, 10, prev=100))  # fresh device, chain starts at 100? no: prev must be <= mark (0)
    c.publish(frame(1, 10, prev=0))
    c.publish(frame(11, 10, prev=10))
    c.publish(frame(101, 10, prev=100))  # still ahead of the mark (20)
    rs = c.wait_receipts(4)
    assert [r["status"] for r in rs] == ["gap", "committed", "committed", "gap"]
    assert rs[0]["expected_prev"] == 0 and rs[3]["expected_prev"] == 20
    assert_exactly_once(stream_seqs(p.nats.url), set(range(1, 21)))
    c.close()


def test_resend_is_dropped_inside_and_after_the_duplicate_window(ingest_only) -> None:
    p = ingest_only(streams={"duplicate_window_s": 1})
    c = RawClient(p.mosquitto.port)
    f1 = frame(1, 10, prev=0)
    c.publish(f1)
    c.publish(f1)  # inside the window
    c.wait_receipts(2)
    time.sleep(1.5)
    c.publish(f1)  # after the window: only the high-water mark can catch it
    rs = c.wait_receipts(3)
    assert statuses(c) == ["committed", "duplicate", "duplicate"], rs
    assert stream_seqs(p.nats.url) == list(range(1, 11))
    c.close()


def test_mark_survives_the_stream_losing_the_devices_messages(ingest_only) -> None:
    """Retention may age a device's frames out; the KV copy of the mark still stops re-sends."""
    import asyncio

    import nats

    p = ingest_only(streams={"duplicate_window_s": 1})
    c = RawClient(p.mosquitto.port)
    c.publish(frame(1, 10, prev=0))
    c.wait_receipts(1)

    async def mark() -> int:
        nc = await nats.connect(p.nats.url)
        try:
            kv = await nc.jetstream().key_value(topics.HWM_BUCKET)
            return int((await kv.get(topics.hwm_key(TENANT, DEVICE))).value or b"0")
        except nats.js.errors.KeyNotFoundError:
            return 0
        finally:
            await nc.close()

    async def purge() -> None:
        nc = await nats.connect(p.nats.url)
        await nc.jetstream().purge_stream(topics.FEATURES_STREAM)
        await nc.close()

    wait_until(lambda: asyncio.run(mark()) == 10, 10, "the mark to reach the KV bucket")
    time.sleep(1.0)  # past the duplicate window
    asyncio.run(purge())
    p.ingest.kill()  # forget the cached mark too
    p.ingest.start(timeout=20)
    c.publish(frame(1, 10, prev=0))
    c.wait_receipts(2)
    assert statuses(c) == ["committed", "duplicate"]
    assert stream_seqs(p.nats.url) == []
    c.close()


def test_bad_frames_go_to_the_dead_letter_stream_and_ingest_keeps_going(ingest_only) -> None:
    p = ingest_only(ingest={"max_frame_bytes": 64 * 1024})
    c = RawClient(p.mosquitto.port)
    good = frame(1, 10, prev=0)
    corrupt = bytearray(frame(1, 10, prev=0))
    corrupt[200] ^= 0xFF  # in the body: header still readable -> REJECTED receipt
    c.publish(b"\x00garbage\xff" * 10)
    c.publish(bytes(corrupt))
    c.publish(frame(1, 3000, prev=0, dim=8))  # ~ 120 KB > 64 KiB limit
    c.publish(frame(1, 10, prev=0, device="someone-else"))  # topic says press-7
    c.publish(good)
    rs = c.wait_receipts(3)  # corrupt -> rejected, oversize -> too_large (cut it), good -> committed
    assert [r["status"] for r in rs] == ["rejected", "too_large", "committed"], rs
    assert "checksum" in rs[0]["reason"].lower() or "crc" in rs[0]["reason"].lower()
    assert "limit" in rs[1]["reason"].lower()
    assert all(r["v"] == 2 and r["limits"]["max_frame_bytes"] == 64 * 1024 for r in rs), rs
    dlq = stream_messages(p.nats.url, topics.DEADLETTER_STREAM)
    reasons = [m.headers[topics.H_REASON] for m in dlq]
    assert len(dlq) == 3, reasons  # an oversize frame is not bad data: the device cuts it again
    assert any("someone-else" in r for r in reasons), "topic/frame mismatch must be dead-lettered"
    assert all(m.headers[topics.H_TOPIC] == topics.mqtt_topic(TENANT, DEVICE, "up") for m in dlq)
    assert dlq[0].data.startswith(b"\x00garbage"), "the raw bytes are kept for inspection"
    assert stream_seqs(p.nats.url) == list(range(1, 11))
    assert p.ingest.running
    c.close()


def test_a_device_cannot_commit_for_another(ingest_only) -> None:
    p = ingest_only()
    mallory = RawClient(p.mosquitto.port, device="mallory")
    victim = RawClient(p.mosquitto.port)  # press-7, listening for its receipts
    mallory.publish(frame(1, 10, prev=0), topic=topics.mqtt_topic(TENANT, "mallory", "up"))
    time.sleep(1.0)
    assert victim.receipts == [] and mallory.receipts == []
    assert stream_seqs(p.nats.url) == []
    assert len(stream_messages(p.nats.url, topics.DEADLETTER_STREAM)) == 1
    mallory.close()
    victim.close()


def _committed(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/metrics")
    body = conn.getresponse().read().decode()
    conn.close()
    for line in body.splitlines():
        if line.startswith('et_ingest_frames_total{outcome="committed"}'):
            return float(line.split()[-1])
    return 0.0


def test_two_ingest_processes_share_the_load_exactly_once(make_pipeline, tmp_path) -> None:
    p: Pipeline = make_pipeline(agent={"uplink": {"frame_max_records": 25, "window": 8}})
    second = IngestProcess(
        tmp_path / "ingest2",
        ingest_config(p.mosquitto.port, p.nats.url, ingest={"instance": "1", "publish_timeout_s": 2.0}),
        name="cloud-ingest-2",
    )
    second.start(timeout=20)
    try:
        p.producer.run(batches=20, size=100)
        p.wait_drained()
        assert_exactly_once(stream_seqs(p.nats.url), set(p.producer.acked))
        wait_until(
            lambda: _committed(second.port) > 0 and _committed(p.ingest.port) > 0,
            5,
            "both ingest processes to have committed frames",
        )
    finally:
        second.stop()


def test_a_mark_told_by_another_process_is_checked_before_it_answers(ingest_only) -> None:
    """Marks other ingest processes tell (``_et.ingest.marks.*``) are hearsay: a forged one
    neither answers DUPLICATE for records never stored (the device would delete them) nor
    names a stream sequence JetStream takes."""
    import asyncio

    import nats

    p = ingest_only()
    c = RawClient(p.mosquitto.port)

    async def tell(line: str) -> None:
        nc = await nats.connect(p.nats.url)
        try:
            await nc.publish(topics.ingest_marks_subject("forger"), line.encode())
            await nc.flush()
        finally:
            await nc.close()

    asyncio.run(tell(f"{TENANT} {DEVICE} 1000 1"))  # "the device is committed up to 1000"
    time.sleep(0.3)
    c.publish(frame(1, 10, prev=0))
    assert c.wait_receipts(1)[0]["status"] == "committed"
    asyncio.run(tell(f"{TENANT} {DEVICE} 10 9999"))  # the right mark, a wrong stream sequence
    time.sleep(0.3)
    c.publish(frame(11, 10, prev=10))
    assert [r["status"] for r in c.wait_receipts(2)] == ["committed", "committed"]
    assert_exactly_once(stream_seqs(p.nats.url), set(range(1, 21)))
    c.close()


def test_frames_over_the_nats_max_payload_are_too_large_not_retried_forever(mosquitto, tmp_path) -> None:
    from edge_tier_harness.brokers import NatsServer

    small = NatsServer(tmp_path / "nats-small", max_payload=64 * 1024)
    small.start()
    ingest = IngestProcess(tmp_path / "ingest", ingest_config(mosquitto.port, small.url), name="cloud-ingest")
    try:
        ingest.start(timeout=20)
        c = RawClient(mosquitto.port)
        c.publish(frame(1, 3000, prev=0))  # ~ 120 KB: over the server's max_payload
        c.publish(frame(1, 10, prev=0))
        rs = c.wait_receipts(2)
        assert [r["status"] for r in rs] == ["too_large", "committed"], rs
        assert all(r["limits"]["max_frame_bytes"] == 64 * 1024 - 4096 for r in rs), rs
        assert "max_payload" in ingest.log_path.read_text()
        assert stream_seqs(small.url) == list(range(1, 11))
        c.close()
    finally:
        ingest.stop()
        small.stop()
