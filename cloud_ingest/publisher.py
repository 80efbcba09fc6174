"""JetStream publishes with many in flight: one reply subscription, acks gathered.

nats-py's ``js.publish`` is a request per message: a new reply token, a future and a
timer each, and the caller waits for the PubAck before it can send the next. With
thousands of devices each sending small frames that per-message overhead is most of
ingest's cost. :class:`Publisher` sends each message with a reply subject under one
wildcard subscription of its own (``<inbox>.<counter>``) and hands back a future for its
PubAck; one sweep a tick fails those not answered within ``timeout`` (all publishes share
the timeout, so a deque in send order is the timer list). ``publish_many`` sends a batch
and tells per message whether it is stored (the tier-two worker's results); ``stream``
adds ``Nats-Expected-Stream``, so a subject some other stream took is refused, not stored
there.

The answers are nats-py's own: :class:`nats.js.api.PubAck`, :class:`nats.js.errors.APIError`
for an error reply (a wrong ``Nats-Expected-Last-Subject-Sequence``, say),
:class:`nats.js.errors.NoStreamResponseError` when no stream listens on the subject, and
:class:`nats.errors.TimeoutError` when nothing came back in time (the message may still
have been stored: callers publish with ``Nats-Msg-Id`` and treat a retry's duplicate ack
as success).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api

__all__ = ["PubResult", "Publisher", "Stored"]

_NO_RESPONDERS = "503"


@dataclass(frozen=True, slots=True)
class Stored:
    """JetStream holds the message (``duplicate``: it held it already, by ``Nats-Msg-Id``)."""

    duplicate: bool


PubResult = Stored | str  # Stored, or why the message is not known to be stored


class Publisher:
    """Publishes to JetStream without waiting for each PubAck; see the module docstring."""

    def __init__(
        self, nc: NatsClient, timeout: float, *, stream: str | None = None, tick_s: float = 0.05
    ) -> None:
        self.nc = nc
        self.timeout = timeout
        self.stream = stream
        self.tick_s = tick_s
        self._prefix = ""
        self._tokens = itertools.count(1)
        self._pending: dict[str, asyncio.Future[api.PubAck]] = {}
        self._deadlines: collections.deque[tuple[float, str]] = collections.deque()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        """Subscribe to the replies (nats-py re-subscribes after a reconnect)."""
        self._prefix = f"{self.nc.new_inbox()}."
        await self.nc.subscribe(self._prefix + "*", cb=self._reply)

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> api.PubAck:
        """Send and wait for this message's PubAck (others stay in flight meanwhile)."""
        return await (await self.send(subject, payload, headers))

    async def send(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[api.PubAck]:
        """Send now; the future resolves with the PubAck (or the error, or a timeout)."""
        if not self._prefix:
            raise RuntimeError("Publisher.send before start()")
        if self.stream is not None:
            headers = {**(headers or {}), api.Header.EXPECTED_STREAM: self.stream}
        token = str(next(self._tokens))
        fut: asyncio.Future[api.PubAck] = asyncio.get_running_loop().create_future()
        self._pending[token] = fut
        self._deadlines.append((time.monotonic() + self.timeout, token))
        try:
            await self.nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
        except BaseException:
            self._pending.pop(token, None)
            raise
        return fut

    async def publish_many(
        self, messages: Sequence[tuple[str, bytes, dict[str, str]]], within: float
    ) -> list[PubResult]:
        """Publish (subject, payload, headers) each, all in flight at once; wait up to
        ``within`` s. A message not answered in time, or refused, has the reason instead."""
        futures: list[asyncio.Future[api.PubAck]] = []
        results: list[PubResult] = []
        for subject, payload, headers in messages:
            try:
                futures.append(await self.send(subject, payload, headers))
            except nats.errors.Error as e:  # closed, reconnecting with a full buffer...
                results = [f"not published: {e!r}"] * (len(messages) - len(futures))
                break
        if futures:
            await asyncio.wait(futures, timeout=within)
        answers: list[PubResult] = []
        for fut in futures:
            if not fut.done():
                fut.cancel()
                answers.append(f"no PubAck within {within:g} s")
            elif fut.exception() is not None:
                answers.append(f"JetStream refused it: {fut.exception()!r}")
            else:
                answers.append(Stored(fut.result().duplicate or False))
        return answers + results

    async def _reply(self, msg: Msg) -> None:
        fut = self._pending.pop(msg.subject[len(self._prefix) :], None)
        deadlines = self._deadlines
        while deadlines and deadlines[0][1] not in self._pending:  # answered: no timer needed
            deadlines.popleft()
        if fut is None or fut.done():
            return  # timed out already (or cancelled by its caller)
        if msg.headers and msg.headers.get(api.Header.STATUS) == _NO_RESPONDERS:
            fut.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            resp = json.loads(msg.data)
            if "error" in resp:
                fut.set_exception(nats.js.errors.APIError.from_error(resp["error"]))
            else:
                fut.set_result(api.PubAck.from_response(resp))
        except (ValueError, TypeError, KeyError) as e:
            fut.set_exception(nats.errors.Error(f"unreadable PubAck on {msg.subject}: {e}"))

    async def run(self) -> None:
        """Fails the publishes not answered within the timeout; runs until cancelled."""
        while True:
            await asyncio.sleep(self.tick_s)
            self.expire(time.monotonic())

    def expire(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, token = deadlines.popleft()
            fut = self._pending.pop(token, None)
            if fut is not None and not fut.done():
                fut.set_exception(nats.errors.TimeoutError())
