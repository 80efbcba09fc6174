"""Rescued frames: records told apart by seq against what ET_FEATURES holds.

Real mosquitto, real nats-server, ingest as a child process, a plain MQTT client as the
device. The device's chain is committed first (its mark then lies above every rescued
seq); rescued frames then bring records some of which the stream already has.
"""

from __future__ import annotations

import asyncio
import time

import nats
import numpy as np

from edge_tier import topics
from edge_tier.wire import Frame, decode_frame, encode_frame
from tests.support import (
    DEVICE,
    DIM,
    TENANT,
    RawClient,
    frame,
    running_worker,
    stream_messages,
    wait_for_rows,
)


def rescued(seqs: list[int]) -> bytes:
    n = len(seqs)
    now = int(time.time() * 1000)
    return encode_frame(
        Frame(
            tenant=TENANT,
            device=DEVICE,
            prev_seq=0,
            stream="vibration",
            model="pf",
            model_version="1",
            schema_version=1,
            created_ms=now,
            seqs=np.array(seqs, dtype="<u8"),
            scores=np.full(n, 0.5, dtype="<f4"),
            times_ms=np.full(n, now, dtype="<u8"),
            features=np.random.default_rng(seqs[0]).standard_normal((n, DIM)).astype("<f4"),
            rescued=True,
        )
    )


def by_subject(url: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for m in stream_messages(url, topics.FEATURES_STREAM):
        out.setdefault(m.subject, []).extend(int(s) for s in decode_frame(m.data).seqs)
    return out


def test_rescued_records_are_stored_once_and_only_those_the_stream_lacks(ingest_only) -> None:
    p = ingest_only(streams={"duplicate_window_s": 1})
    c = RawClient(p.mosquitto.port)
    chain = topics.features_subject(TENANT, DEVICE)
    side = topics.features_subject(TENANT, DEVICE, rescued=True)
    for f in (frame(1, 10, 0, dim=DIM), frame(11, 10, 10, dim=DIM), frame(1000, 10, 20, dim=DIM)):
        c.publish(f)  # the old queue's frames, then the fresh queue's: the mark is 1009
    assert [r["status"] for r in c.wait_receipts(3)] == ["committed"] * 3

    c.publish(rescued(list(range(5, 26))))  # 5-20 are stored already, 21-25 are not
    r = c.wait_receipts(4)[-1]
    assert (r["status"], r.get("set_aside")) == ("committed", None), r
    time.sleep(1.2)  # past the duplicate window: only the sorting by seq can tell
    c.publish(rescued(list(range(5, 26))))
    c.publish(rescued([15, 22, 30]))  # held on the chain, held as rescued, new
    rs = c.wait_receipts(6)
    assert [x["status"] for x in rs[4:]] == ["duplicate", "committed"], rs
    got = by_subject(p.nats.url)
    assert got[chain] == [*range(1, 21), *range(1000, 1010)]
    assert got[side] == [21, 22, 23, 24, 25, 30]

    async def purge_the_old_chain() -> None:
        nc = await nats.connect(p.nats.url)
        try:  # what retention does to old messages: the stream has let some go
            await nc.jetstream().purge_stream(topics.FEATURES_STREAM, subject=chain, keep=1)
        finally:
            await nc.close()

    asyncio.run(purge_the_old_chain())
    c.publish(rescued([2, 3, 40, 2000]))  # below all that is kept (unknown), above the mark (new)
    c.publish(rescued([22]))  # the rescued subject still has it
    rs = c.wait_receipts(8)
    assert (rs[6]["status"], rs[6]["set_aside"], rs[6]["v"]) == ("committed", 3, 3), rs[6]
    assert rs[7]["status"] == "duplicate"
    assert by_subject(p.nats.url)[side] == [21, 22, 23, 24, 25, 30, 2000]
    dlq = stream_messages(p.nats.url, topics.DEADLETTER_STREAM)
    assert [list(decode_frame(m.data).seqs) for m in dlq] == [[2, 3, 40]]
    assert "cannot tell whether they were stored" in dlq[0].headers[topics.H_REASON]
    c.close()

    async def answered() -> list[int]:
        async with running_worker(p.nats.url):
            rows = await wait_for_rows(p.nats.url, 17)
        return sorted(s for b in rows for s in b.seqs)

    # tier two reads the rescued subject like the chain's
    assert asyncio.run(answered()) == [*range(21, 26), 30, *range(1000, 1010), 2000]
