"""The uplink's receipt logic against scripted receipts (a unit test: the bridge is a stand-in).

The whole path with real brokers is in tests/system; here the receipts come in
orders that are hard to provoke there: stale duplicates, GAPs in one batch.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.config import AgentConfig
from edge_agent.store import AsyncQueue, NewRecord, RecordKind, Store
from edge_agent.uplink import Uplink
from edge_tier.wire import Dtype, Receipt, ReceiptStatus, decode_frame, upload_id

KIND = RecordKind("vib", Dtype.FLOAT32, 4)


class ScriptedBridge:
    """Just enough of MqttBridge: records what is published, is always connected."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.connected.set()
        self.connections = 1
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        self.sent: list[tuple[int, int, int]] = []  # (first, last, prev) of each upload sent

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        if topic.endswith("/up"):
            f = decode_frame(payload)
            self.sent.append((f.first_seq, f.last_seq, f.prev_seq))
        return True


def receipt(first: int, last: int, status: ReceiptStatus, **kw: Any) -> Receipt:
    if status is ReceiptStatus.REJECTED:
        kw.setdefault("reason", "test")
    return Receipt(
        upload_id=upload_id("demo", "device-1", first, last),
        status=status,
        first_seq=first,
        last_seq=last,
        **kw,
    )


async def _run(tmp_path: Path, script: Any, timeout_s: float = 0.3) -> tuple[ScriptedBridge, Uplink]:
    cfg = AgentConfig(
        store={"path": str(tmp_path / "q.db"), "synchronous": "NORMAL", "budget_bytes": 1 << 20},
        uplink={
            "window": 4,
            "frame_max_records": 1,
            "frame_max_bytes": 4096,
            "receipt_timeout_s": timeout_s,
            "status_interval_s": 60,
        },
    )
    queue = AsyncQueue(Store(cfg.store, frame_max_records=1))
    bridge = ScriptedBridge()
    uplink = Uplink(cfg, queue, bridge)  # type: ignore[arg-type]
    committer = asyncio.create_task(queue.run())
    runner = asyncio.create_task(uplink.run())
    try:
        await queue.enqueue(KIND, [NewRecord(np.full(4, i, np.float32).tobytes(), 0.5) for i in range(2)])
        # one record per chunk and per frame: two frames, A then B
        deadline = time.monotonic() + 5
        while len(bridge.sent) < 2 and time.monotonic() < deadline:  # noqa: ASYNC110 - polling a stand-in
            await asyncio.sleep(0.01)
        await script(bridge, uplink)
    finally:
        runner.cancel()
        committer.cancel()
        await asyncio.gather(runner, committer, return_exceptions=True)
        await queue.close()
    return bridge, uplink


def test_duplicate_gaps_for_the_oldest_frame_do_not_stall_it(tmp_path: Path) -> None:
    async def script(bridge: ScriptedBridge, uplink: Uplink) -> None:
        (a_first, a_last, _), (b_first, b_last, b_prev) = bridge.sent[:2]
        assert b_prev == a_last, bridge.sent
        # A is rejected; B was sent twice and both copies come back GAP in one batch.
        await uplink.handle_receipts(
            [
                receipt(a_first, a_last, ReceiptStatus.REJECTED),
                receipt(b_first, b_last, ReceiptStatus.GAP, expected_prev=0),
                receipt(b_first, b_last, ReceiptStatus.GAP, expected_prev=0),
            ]
        )
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and (b_first, b_last, 0) not in bridge.sent:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        assert (b_first, b_last, 0) in bridge.sent, f"B was not re-sent re-chained: {bridge.sent}"

    asyncio.run(_run(tmp_path, script))


def test_a_held_frame_is_sent_again_when_its_predecessors_resend_is_lost(tmp_path: Path) -> None:
    async def script(bridge: ScriptedBridge, uplink: Uplink) -> None:
        _, (b_first, b_last, _) = bridge.sent[:2]
        await uplink.handle_receipts([receipt(b_first, b_last, ReceiptStatus.GAP, expected_prev=0)])
        sent_before = len(bridge.sent)
        await asyncio.sleep(1.0)  # > 2 receipt timeouts, and no receipt for A ever comes
        again = [s for s in bridge.sent[sent_before:] if s[0] == b_first]
        assert again, "the held frame must not wait forever for a receipt that never comes"
        assert uplink.in_flight[b_first].sends >= 2

    asyncio.run(_run(tmp_path, script))
