"""The one bridge between paho-mqtt and asyncio.

paho is driven by the event loop itself (paho's "external event loop" interface): the
loop watches paho's socket and calls ``loop_read``/``loop_write`` when it is ready, and
``loop_misc`` once a second for keepalives. Every callback of paho's therefore runs on
the loop, and every call into paho comes from it: no thread hop per message or per
PUBACK, no socketpair byte per packet queued (what a thread of paho's own costs).
Only the blocking TCP/TLS connect runs in a worker thread.

Reconnects are ours, not paho's, with exponential backoff and full jitter (paho's own
reconnect has no jitter, and a fleet reconnecting in lock-step after a broker restart is
a thundering herd).

paho reads a packet with at least three ``recv`` calls (a byte of command, the length
byte by byte, the body) and writes each packet with its own ``send``: ``_BatchingClient``
reads the socket in chunks and sends what a burst of publishes and acks queued in one
``send``, so a thousand small uploads cost a few system calls, not thousands.

A broker that will not talk is said so, not just retried: a CONNACK that refuses is logged
with its reason code and retried no sooner than ``refused_backoff_s``; sessions that end
with no CONNACK at all, again and again, in MQTT 5 are taken for a 3.1.1-only broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

# A 3.1.1-only broker may drop an MQTT 5 CONNECT without a CONNACK (RabbitMQ 3.10's MQTT
# plugin does); this many such sessions in a row, and nothing else explains them as well.
NO_CONNACK_HINT_AFTER = 3
V5_HINT = 'the broker may not speak MQTT 5; set mqtt.version = "3.1.1"'

# What to do about a refused CONNACK, by MQTT 5 reason code (paho maps 3.1.1's return
# codes onto these: see _V311_RETURN_CODE).
_REFUSAL_HINTS: dict[int, str] = {
    132: V5_HINT,
    133: "the broker rejects this client id (mqtt.client_id)",
    134: "check mqtt.username and mqtt.password",
    135: "check the credentials (mqtt.username/password or the client certificate) and the broker's ACL",
    138: "the broker has banned this client",
    140: "the broker wants another authentication method",
}
_V311_RETURN_CODE = {132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


class MqttSettings(BaseModel):
    """Broker connection settings, shared by the agent and the cloud services."""

    model_config = {"extra": "forbid"}

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    version: Literal["3.1.1", "5"] = "5"
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    # TLS: a CA file turns TLS on; a client cert/key adds mutual TLS.
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False
    backoff_min_s: float = Field(0.2, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    # Least wait after a refused CONNACK: credentials and ACLs do not fix themselves in a
    # second, and a fleet hammering a broker that says no only loads it (at most backoff_max_s).
    refused_backoff_s: float = Field(5.0, gt=0)
    # Persistent session (QoS1 messages queued by the broker while we are away).
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0)


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    mid: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


_READ_CHUNK = 64 * 1024
_ERR_AGAIN = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _BatchingClient(paho.Client):
    """paho's client with buffered socket reads and coalesced writes.

    Overrides three of paho's private socket methods (``_sock_recv``, ``_sock_send``,
    ``_sock_close``), ``_packet_write`` and ``_handle_on_message``; pinned by the
    paho-mqtt>=2.1,<3 requirement and exercised by every test that talks to a broker."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._wbuf = bytearray()

    def buffered(self) -> bool:
        """Bytes read from the socket that paho has not taken yet (or TLS records the
        ssl module holds): the socket will not say it is readable for those."""
        if self._rpos < len(self._rbuf):
            return True
        sock = self._sock
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            chunk = super()._sock_recv(max(bufsize, _READ_CHUNK))
            if len(chunk) <= bufsize:
                return chunk  # all of it is wanted (or b"": the peer closed)
            self._rbuf, self._rpos = chunk, 0
        end = self._rpos + bufsize
        out = self._rbuf[self._rpos : end]
        self._rpos = min(end, len(self._rbuf))
        return out

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self._sock is None:
            raise ConnectionError("self._sock is None")
        self._wbuf += buf  # sent by _flush, after the burst
        return len(buf)

    def _flush(self) -> MQTTErrorCode:
        sock = self._sock
        while self._wbuf and sock is not None:
            try:
                n = sock.send(self._wbuf)
            except _ERR_AGAIN:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError as e:
                self._easy_log(paho.MQTT_LOG_ERR, "failed to send on socket: %s", e)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            del self._wbuf[:n]
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packet_write(self) -> MQTTErrorCode:
        rc = super()._packet_write()  # every queued packet into _wbuf
        if rc > 0:
            return rc
        sent = self._flush()
        return sent if sent > 0 else rc

    def want_write(self) -> bool:
        return bool(self._out_packet) or bool(self._wbuf)

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        # The bridge has one on_message and no per-topic callbacks: paho's topic matcher
        # walk per message is skipped. A callback that fails is logged, not raised into
        # the read (which would drop the session and have the broker send it again).
        on_message = self.on_message
        if on_message is None:
            return
        try:
            on_message(self, self._userdata, message)
        except Exception:
            log.exception("on_message failed for a message on %r", message._topic[:200])

    def _sock_close(self) -> None:
        if self._sock is not None:
            self._flush()  # what is queued before a close (a DISCONNECT) still goes out
        self._rbuf, self._rpos = b"", 0
        self._wbuf.clear()
        super()._sock_close()


class MqttBridge:
    """A paho client driven by the event loop.

    ``messages`` receives every inbound PUBLISH that no ``inbox`` claims; ``connected`` is set while a
    session is up and ``connections`` counts the sessions begun, so callers can
    tell that a reconnect happened and re-send what was in flight.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        subscriptions: list[tuple[str, int]] | None = None,
        will: Will | None = None,
        manual_ack: bool = False,
        clean: bool = False,
        max_inflight: int = 64,
        name: str = "mqtt",
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.subscriptions = list(subscriptions or [])
        self.name = name
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.connected = asyncio.Event()
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._stop_at = 0.0
        self._session_over = asyncio.Event()
        self._fd = -1  # the socket the loop watches, -1: none
        self._state_changed = asyncio.Event()
        v5 = settings.version == "5"
        self._v5 = v5
        self._clean = clean
        self.client = _BatchingClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else clean,
            manual_ack=manual_ack,
        )
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        if settings.username is not None:
            self.client.username_pw_set(settings.username, settings.password)
        if settings.tls_ca:
            self.client.tls_set(
                ca_certs=settings.tls_ca,
                certfile=settings.tls_cert,
                keyfile=settings.tls_key,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            self.client.tls_insecure_set(settings.tls_insecure)
        if will is not None:
            self.client.will_set(will.topic, will.payload, will.qos, will.retain)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        # on_publish is set only while a publish_confirmed waits: paho builds a reason code
        # and properties for every publish it reports, QoS 0 ones included
        self.client.on_subscribe = self._on_subscribe
        self.client.on_socket_register_write = self._on_register_write
        self.client.on_socket_unregister_write = self._on_unregister_write
        self.client.on_socket_close = self._on_socket_close
        # set once the broker acknowledged every subscription of the current session
        self.subscribed = asyncio.Event()
        self._unacked_subs: set[int] = set()
        self._pubacks: dict[int, asyncio.Future[bool]] = {}
        self._inboxes: list[tuple[str, asyncio.Queue[Message]]] = []
        # unsubscribes asked for while no session was up: a persistent session would keep
        # those subscriptions at the broker, so they are sent at the next connect
        self._pending_unsubs: set[str] = set()
        # the current attempt's CONNACK reason code (None: none came)
        self._connack: paho.ReasonCode | None = None

    # -- paho's callbacks (on the loop, from loop_read/loop_write/loop_misc) ---

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self._connack = reason_code
        if reason_code.is_failure:
            return  # said by _run once the session is over, with what to do about it
        for topic in self._pending_unsubs:
            client.unsubscribe(topic)
        self._pending_unsubs.clear()
        self._unacked_subs = {client.subscribe(topic, qos)[1] for topic, qos in list(self.subscriptions)}
        self._set_connected(True)
        if not self._unacked_subs:
            self.subscribed.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        self._unacked_subs.discard(mid)
        if not self._unacked_subs:
            self.subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self._set_connected(False)

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:  # type: ignore[no-untyped-def]
        self._deliver(Message(msg.topic, bytes(msg.payload), msg.qos, msg.mid, bool(msg.retain)))

    def _deliver(self, m: Message) -> None:
        for pattern, queue in self._inboxes:
            if paho.topic_matches_sub(pattern, m.topic):
                queue.put_nowait(m)
                return
        self.messages.put_nowait(m)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        fut = self._pubacks.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(not reason_code.is_failure)

    # -- the socket, watched by the loop --------------------------------------

    def _on_loop(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn`` on the loop: paho calls the socket callbacks from the connecting
        thread too (the CONNECT packet is queued there)."""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        elif self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(fn, *args)

    def _on_register_write(self, client, userdata, sock) -> None:  # type: ignore[no-untyped-def]
        self._on_loop(self._watch_write, sock)

    def _on_unregister_write(self, client, userdata, sock) -> None:  # type: ignore[no-untyped-def]
        self._on_loop(self._unwatch_write, sock)

    def _on_socket_close(self, client, userdata, sock) -> None:  # type: ignore[no-untyped-def]
        if threading.get_ident() != self._loop_thread:
            return  # a stale socket closed by a reconnect in the connecting thread: no session's
        self._unwatch()  # before paho closes the descriptor
        self._session_over.set()

    def _watch(self) -> None:
        """The session's socket into the loop's selector (on the loop, after connect)."""
        sock = self.client.socket()
        if sock is None or self._loop is None:
            self._session_over.set()
            return
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._readable)
        if self.client.want_write():
            self._loop.add_writer(self._fd, self._writable)
        if self.client.buffered():  # bytes that arrived with the handshake
            self._loop.call_soon(self._readable)

    def _watch_write(self, sock: object) -> None:
        if self._loop is not None and self._fd >= 0 and sock is self.client.socket():
            self._loop.add_writer(self._fd, self._writable)

    def _unwatch_write(self, sock: object) -> None:
        if self._loop is not None and self._fd >= 0 and sock is self.client.socket():
            self._loop.remove_writer(self._fd)

    def _unwatch(self) -> None:
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._fd = -1

    def _readable(self) -> None:
        c = self.client
        try:
            # paho reads a few packets a call; what it left in the buffer is read now,
            # since the socket will not signal it again
            while c.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS and c.buffered():
                pass
        except Exception:  # the session, not the loop, ends on a packet paho cannot take
            log.exception("%s: reading from the broker failed; reconnecting", self.name)
            self._drop()

    def _writable(self) -> None:
        try:
            self.client.loop_write()
        except Exception:
            log.exception("%s: writing to the broker failed; reconnecting", self.name)
            self._drop()

    def _drop(self) -> None:
        self._unwatch()
        with contextlib.suppress(Exception):
            self.client._sock_close()
        self._set_connected(False)
        self._session_over.set()

    # -- sessions -------------------------------------------------------------

    def _connect_props(self) -> Properties | None:
        if not self._v5:
            return None
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if self._clean else self.settings.session_expiry_s
        return props

    def _connect(self) -> None:
        """Blocking (TCP and TLS handshakes): runs in a worker thread."""
        s = self.settings
        if self._v5:
            self.client.connect(
                s.host, s.port, s.keepalive_s, clean_start=self._clean, properties=self._connect_props()
            )
        else:
            self.client.connect(s.host, s.port, s.keepalive_s)

    async def _connected(self) -> bool:
        """One connect attempt: True with the socket watched by the loop."""
        assert self._loop is not None
        self._session_over.clear()
        attempt = self._loop.run_in_executor(None, self._connect)
        try:
            await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # stopped while connecting: the thread finishes on its own; close what it opens
            attempt.add_done_callback(lambda _: self.client._sock_close())
            raise
        self._watch()
        return True

    async def _session(self) -> None:
        """Until the session's socket closes: paho's timers once a second."""
        while not self._session_over.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._session_over.wait(), 1.0)
            if self._stopping.is_set() and time.monotonic() - self._stop_at > 2.0:
                self._drop()  # the DISCONNECT did not get out: do not hang on it
            elif not self._session_over.is_set():
                self.client.loop_misc()  # PINGREQ; a PINGRESP overdue closes the socket

    async def _run(self) -> None:
        s = self.settings
        attempt = 0
        no_connack = 0  # sessions in a row that ended with no CONNACK
        while not self._stopping.is_set():
            self._connack = None
            try:
                await self._connected()
            except (OSError, ssl.SSLError) as e:
                attempt += 1
                await self._backoff(attempt, f"connect to {s.host}:{s.port} failed: {e}")
                continue
            began = time.monotonic()
            try:
                await self._session()
            finally:
                self._unwatch()
            self._set_connected(False)
            if self._stopping.is_set():
                break
            # A session that lasted a while resets the backoff.
            attempt = 1 if time.monotonic() - began > s.backoff_max_s else attempt + 1
            connack = self._connack
            no_connack = no_connack + 1 if connack is None else 0
            if connack is not None and connack.is_failure:
                await self._backoff(
                    attempt, self._refusal(connack), floor=s.refused_backoff_s, level=logging.WARNING
                )
            elif self._v5 and no_connack >= NO_CONNACK_HINT_AFTER:
                why = (
                    f"{s.host}:{s.port} closed the connection {no_connack} times in a row without "
                    f"answering the MQTT 5 CONNECT (no CONNACK): {V5_HINT} "
                    "(or the port is not MQTT, or it wants TLS)"
                )
                await self._backoff(attempt, why, level=logging.WARNING)
            else:
                await self._backoff(attempt, f"connection to {s.host}:{s.port} lost")

    def _refusal(self, rc: paho.ReasonCode) -> str:
        s = self.settings
        code = (
            f"reason code {rc.value}"
            if self._v5
            else f"return code {_V311_RETURN_CODE.get(rc.value, rc.value)}"
        )
        user = s.username or "(no user name)"
        why = f"broker {s.host}:{s.port} refused the connection as {user}: {rc} (CONNACK {code})"
        hint = _REFUSAL_HINTS.get(rc.value)
        if rc.value == 132 and not self._v5:
            hint = 'the broker does not take MQTT 3.1.1; try mqtt.version = "5"'
        return f"{why}; {hint}" if hint else why

    def backoff_delay(
        self, attempt: int, why: str, *, floor: float | None = None, level: int = logging.INFO
    ) -> float:
        """The wait before the next attempt (full jitter above a floor), said with why."""
        s = self.settings
        lo = s.backoff_min_s if floor is None else min(s.backoff_max_s, max(floor, s.backoff_min_s))
        # jitter above a floor too: a fleet refused together must not retry together
        cap = min(s.backoff_max_s, max(2 * lo, s.backoff_min_s * 2 ** min(attempt, 20)))
        delay = random.uniform(lo, cap)  # full jitter
        log.log(level, "%s: %s; retrying in %.2fs", self.name, why, delay)
        return delay

    async def _backoff(
        self, attempt: int, why: str, *, floor: float | None = None, level: int = logging.INFO
    ) -> None:
        delay = self.backoff_delay(attempt, why, floor=floor, level=level)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    # -- asyncio side -----------------------------------------------------

    def _set_connected(self, up: bool) -> None:
        if up and not self.connected.is_set():
            self.connections += 1
            self.connected.set()
            log.info("%s: connected to %s:%s", self.name, self.settings.host, self.settings.port)
        elif not up and self.connected.is_set():
            self.connected.clear()
            self.subscribed.clear()
            # stop() asked for it: nothing to warn about (a lost session still warns)
            log.log(
                logging.DEBUG if self._stopping.is_set() else logging.WARNING, "%s: disconnected", self.name
            )
        self._state_changed.set()

    def inbox(self, pattern: str) -> asyncio.Queue[Message]:
        """A queue of its own for messages on topics matching ``pattern`` (they skip ``messages``)."""
        queue: asyncio.Queue[Message] = asyncio.Queue()
        self._inboxes.append((pattern, queue))
        return queue

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now if a session is up, and again in every later session."""
        self._pending_unsubs.discard(topic)
        if (topic, qos) not in self.subscriptions:
            self.subscriptions.append((topic, qos))
            # also while no session is up (paho says so, harmlessly): one may be starting
            # and have read the list already
            self.client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        before = len(self.subscriptions)
        self.subscriptions = [(t, q) for t, q in self.subscriptions if t != topic]
        if len(self.subscriptions) != before:
            rc, _ = self.client.unsubscribe(topic)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._pending_unsubs.add(topic)

    async def wait_state_change(self) -> None:
        self._state_changed.clear()
        await self._state_changed.wait()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopping = asyncio.Event()
        self._task = self._loop.create_task(self._run(), name=f"{self.name}-session")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Queue a PUBLISH; False when there is no session (the caller re-sends later)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    async def publish_confirmed(
        self, topic: str, payload: bytes, within: float = 10.0, *, retain: bool = False
    ) -> bool:
        """QoS 1 publish that returns True once the broker's PUBACK came back (paho re-sends
        it across reconnects); False when there is no session, no PUBACK ``within`` seconds,
        or a PUBACK that refuses it (MQTT 5: not authorized, say)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        # paho's callbacks run on this loop, so the PUBACK cannot be handled before this line
        fut = self._pubacks[info.mid] = asyncio.get_running_loop().create_future()
        self.client.on_publish = self._on_publish
        try:
            return await asyncio.wait_for(fut, within)
        except TimeoutError:
            return False
        finally:
            self._pubacks.pop(info.mid, None)
            if not self._pubacks:
                self.client.on_publish = None

    def ack(self, msg: Message) -> None:
        if msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)

    async def stop(self, final: tuple[str, bytes, bool] | None = None) -> None:
        """Disconnect cleanly, optionally after one last publish (topic, payload, retain)."""
        if final is not None and self.connected.is_set():
            await self.publish_confirmed(final[0], final[1], 2.0, retain=final[2])
        self._stop_at = time.monotonic()
        self._stopping.set()
        with contextlib.suppress(Exception):
            self.client.disconnect()  # the DISCONNECT goes out; paho then closes the socket
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), 5.0)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            except Exception:
                log.exception("%s: the session ended with an error", self.name)
        self._unwatch()
        self.connected.clear()
