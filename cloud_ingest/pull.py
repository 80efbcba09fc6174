"""A pull consumer kept fed: JetStream delivers into a list, with no task or timer per message.

nats-py's ``fetch`` waits for each message of a batch in a task of its own, with a timer
and a uuid: per small upload that costs more than answering it. Here one inbox
subscription takes every delivery; ``request(n)`` asks the consumer for up to ``n`` more
(``$JS.API.CONSUMER.MSG.NEXT``, lingering up to ``expires_s``), each request on a reply
subject of its own, where JetStream's status for it comes. Messages land in ``arrived``
and ``wake`` is set; the owner takes them when it runs.

JetStream answers a request with its messages and, if it ends before they were all sent,
a status: 408 (expired), 409 (the consumer was deleted, too many requests waiting...).
Any status but a heartbeat ends the request; anything but 408 is kept in ``trouble`` for
the owner to act on. A request with no word at all by ``expires_s`` plus a grace (the
connection dropped, the server is away) is forgotten, and ``silent`` says so.
"""

from __future__ import annotations

import asyncio
import json
import time

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

_API = "$JS.API"  # the workers use the default JetStream API prefix (no domain)
_STATUS, _DESCRIPTION = "Status", "Description"
_HEARTBEAT, _EXPIRED = "100", "408"
_GRACE_S = 1.0


class Pull:
    """Deliveries of one durable pull consumer, as they come."""

    def __init__(
        self, nc: NatsClient, stream: str, consumer: str, *, wake: asyncio.Event, expires_s: float = 1.0
    ) -> None:
        self.nc = nc
        self.wake = wake
        self.expires_s = expires_s
        self.arrived: list[Msg] = []
        self.trouble: str | None = None  # a status that ended a request, other than "expired"
        self.silent = False  # a request got no word from the server at all
        self._next = f"{_API}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._open: dict[str, list[float]] = {}  # reply subject -> [messages still due, forget at]
        self._count = 0
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    def due(self) -> int:
        """Messages asked for and not yet delivered (requests past their grace forgotten)."""
        now = time.monotonic()
        for reply in [r for r, (_, until) in self._open.items() if until < now]:
            del self._open[reply]
            self.silent = True
        return int(sum(left for left, _ in self._open.values()))

    async def request(self, n: int) -> None:
        """Ask for up to ``n`` more messages; they arrive in ``arrived`` over ``expires_s``."""
        self._count += 1
        reply = f"{self._inbox}.{self._count}"
        self._open[reply] = [n, time.monotonic() + self.expires_s + _GRACE_S]
        body = json.dumps({"batch": n, "expires": int(self.expires_s * 1e9)}).encode()
        await self.nc.publish(self._next, body, reply=reply)

    def take(self) -> list[Msg]:
        """What arrived since the last call."""
        got, self.arrived = self.arrived, []
        return got

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(_STATUS) if msg.headers else None
        if status is None:
            self.silent = False
            # A delivery keeps its own subject, so it is counted against the oldest open
            # request: JetStream fills one consumer's waiting requests in order.
            for reply, request in self._open.items():
                request[0] -= 1
                if request[0] <= 0:
                    del self._open[reply]
                break
            self.arrived.append(msg)
            self.wake.set()
            return
        if status == _HEARTBEAT:
            return
        self.silent = False
        self._open.pop(msg.subject, None)
        if status != _EXPIRED:
            description = msg.headers.get(_DESCRIPTION, "") if msg.headers else ""
            self.trouble = f"{status} {description}".strip()
        self.wake.set()
