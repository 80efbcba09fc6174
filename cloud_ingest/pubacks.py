"""Many JetStream publishes in flight at once, their PubAcks gathered by one inbox subscription.

``js.publish_async`` makes a future, a done callback, a random token (a ``getrandom`` call)
and a pydantic-free but still field-by-field PubAck per message. Here a batch of messages
is written with one reply subject each (``{inbox}.{n}``) and one future for the whole
batch, resolved when every PubAck is in or at the deadline.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

_EXPECTED_STREAM = "Nats-Expected-Stream"


@dataclass(frozen=True, slots=True)
class Stored:
    """JetStream holds the message (``duplicate``: it held it already, by ``Nats-Msg-Id``)."""

    duplicate: bool


# Stored, or why the message is not known to be stored
PubResult = Stored | str


@dataclass(slots=True)
class _Batch:
    results: list[PubResult]
    left: int
    done: asyncio.Future[None]
    replies: list[str] = field(default_factory=list)
    written: bool = False  # every message is out: the last PubAck may resolve ``done``


class Publisher:
    """Publishes batches of messages to one stream and tells, per message, whether it is stored."""

    def __init__(self, nc: NatsClient, stream: str) -> None:
        self.nc = nc
        self.stream = stream
        self._inbox = nc.new_inbox()
        self._waiting: dict[str, tuple[_Batch, int]] = {}  # reply subject -> (batch, index)
        self._count = 0
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)

    async def publish(
        self, messages: Sequence[tuple[str, bytes, dict[str, str]]], within: float
    ) -> list[PubResult]:
        """Publish (subject, payload, headers) each; wait up to ``within`` s for the PubAcks.
        A message not answered in time, or refused, has the reason instead of ``Stored``."""
        batch = _Batch([f"no PubAck within {within:g} s"] * len(messages), 0, asyncio.Future())
        try:
            for i, (subject, payload, headers) in enumerate(messages):
                self._count += 1
                reply = f"{self._inbox}.{self._count}"
                # the expected stream: a subject that some other stream took is refused, not stored there
                headers = {**headers, _EXPECTED_STREAM: self.stream}
                self._waiting[reply] = (batch, i)  # before the write: publish may yield to the acks
                batch.replies.append(reply)
                batch.left += 1
                try:
                    await self.nc.publish(subject, payload, reply=reply, headers=headers)
                except nats.errors.Error as e:  # closed, reconnecting with a full buffer...
                    self._waiting.pop(reply, None)
                    batch.left -= 1
                    batch.results[i:] = [f"not published: {e!r}"] * (len(messages) - i)
                    break
            batch.written = True
            if batch.left:
                await asyncio.wait_for(asyncio.shield(batch.done), within)
        except TimeoutError:
            pass
        finally:
            for reply in batch.replies:
                self._waiting.pop(reply, None)
        return batch.results

    async def _on_ack(self, msg: Msg) -> None:
        entry = self._waiting.pop(msg.subject, None)
        if entry is None:
            return  # past its deadline: the message counts as not stored, and is redelivered
        batch, i = entry
        batch.results[i] = _result(msg)
        batch.left -= 1
        if batch.left == 0 and batch.written and not batch.done.done():
            batch.done.set_result(None)


def _result(msg: Msg) -> PubResult:
    if msg.headers and msg.headers.get("Status"):  # 503: no stream takes the subject
        return f"status {msg.headers['Status']} {msg.headers.get('Description', '')}".strip()
    try:
        ack = json.loads(msg.data)
    except ValueError:
        return f"unreadable PubAck {msg.data[:80]!r}"
    if not isinstance(ack, dict):
        return f"unreadable PubAck {msg.data[:80]!r}"
    if "error" in ack:
        err = ack["error"]
        return f"JetStream refused it: {err.get('description', err) if isinstance(err, dict) else err}"
    return Stored(bool(ack.get("duplicate", False)))
