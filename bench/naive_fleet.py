"""The naive contender of bench_fleet: a straightforward per-frame MQTT -> JetStream bridge.

paho delivers each upload to the asyncio loop (one hop per message); each is decoded,
published to JetStream with its upload id as ``Nats-Msg-Id``, the ack awaited, and a
receipt (the pydantic model, JSON-encoded) published back, one message after another.
No high-water marks, no ordering guarantees beyond that: the obvious bridge, for the
CPU-per-frame ratio. Run by bench_fleet as ``python -m bench.naive_fleet --config F``
(the ingest's TOML: its MQTT port and NATS URL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import tomllib
from typing import Any

import nats
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from cloud_ingest.config import IngestConfig
from cloud_ingest.streams import ensure_streams
from edge_tier import topics
from edge_tier.wire import Receipt, ReceiptStatus, decode_frame, encode_receipt


async def bridge(cfg: dict[str, Any]) -> None:
    icfg = IngestConfig.model_validate(cfg)
    nc = await nats.connect(icfg.nats.servers)
    js = nc.jetstream()
    await ensure_streams(js, icfg.streams)
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="naive-fleet", clean_session=True)

    def on_message(c: Any, u: Any, m: Any) -> None:  # one hop to the loop per message
        loop.call_soon_threadsafe(inbox.put_nowait, m)

    client.on_message = on_message
    client.connect("127.0.0.1", cfg["mqtt"]["port"])
    client.subscribe(topics.INGEST_UPLOADS, qos=1)
    client.loop_start()
    # the harness waits for the metrics port and this line
    ops = socket.create_server(("127.0.0.1", cfg["ingest"]["metrics_port"]))
    print("naive ready", file=sys.stderr, flush=True)
    try:
        while True:
            msg = await inbox.get()
            frame = decode_frame(msg.payload)
            ack = await js.publish(
                topics.features_subject(frame.tenant, frame.device),
                msg.payload,
                headers={topics.H_MSG_ID: frame.upload_id},
            )
            r = Receipt(
                upload_id=frame.upload_id,
                status=ReceiptStatus.DUPLICATE if ack.duplicate else ReceiptStatus.COMMITTED,
                first_seq=frame.first_seq,
                last_seq=frame.last_seq,
                stream_seq=ack.seq,
            )
            client.publish(topics.mqtt_topic(frame.tenant, frame.device, "receipt"), encode_receipt(r), qos=1)
    finally:
        ops.close()
        client.loop_stop()
        await nc.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    args = ap.parse_args()
    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(bridge(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
