"""The one bridge between paho-mqtt's threads and asyncio.

paho runs in a thread of ours (``client.loop()``), so that reconnects use
exponential backoff with full jitter (paho's own reconnect has no jitter, and a
fleet reconnecting in lock-step after a broker restart is a thundering herd).
Everything paho reports is handed to the event loop with
``call_soon_threadsafe``; everything the loop asks of paho (publish, ack) is
thread-safe in paho.

A broker that will not talk is said so, not just retried: a CONNACK that refuses is logged
with its reason code and retried no sooner than ``refused_backoff_s``; sessions that end
with no CONNACK at all, again and again, in MQTT 5 are taken for a 3.1.1-only broker.
"""

from __future__ import annotations

import asyncio
import collections
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


class MqttBridge:
    """A paho client driven by its own thread, seen from asyncio.

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
        # paho's callbacks wait here for the loop, which takes all that came in one go: one
        # wake-up of the loop per burst of messages and PUBACKs, not one per packet
        self._calls: collections.deque[tuple[Callable[..., object], tuple[object, ...]]] = collections.deque()
        self._drain_scheduled = False
        self._stop = threading.Event()
        self._stop_at = 0.0
        self._thread: threading.Thread | None = None
        self._state_changed = asyncio.Event()
        v5 = settings.version == "5"
        self._v5 = v5
        self._clean = clean
        self.client = paho.Client(
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
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        # set once the broker acknowledged every subscription of the current session
        self.subscribed = asyncio.Event()
        self._unacked_subs: set[int] = set()
        self._pubacks: dict[int, asyncio.Future[bool]] = {}
        self._inboxes: list[tuple[str, asyncio.Queue[Message]]] = []
        # unsubscribes asked for while no session was up: a persistent session would keep
        # those subscriptions at the broker, so they are sent at the next connect
        self._pending_unsubs: set[str] = set()
        self._unsubs_lock = threading.Lock()
        # the current attempt's CONNACK reason code (None: none came); read and written on
        # the paho thread only
        self._connack: paho.ReasonCode | None = None

    # -- paho thread side -------------------------------------------------

    def _call(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        self._calls.append((fn, args))
        if not self._drain_scheduled:  # a drain already scheduled will take this one too
            self._drain_scheduled = True
            try:
                loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop closed meanwhile
                self._drain_scheduled = False

    def _drain(self) -> None:
        """On the loop: paho's calls so far, in the order they came."""
        # cleared first: a call appended from now on either is taken below or schedules a drain
        self._drain_scheduled = False
        calls = self._calls
        while calls:
            fn, args = calls.popleft()
            try:
                fn(*args)
            except Exception:  # one bad callback must not hold back the others
                log.exception("%s: a callback from paho's thread failed", self.name)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self._connack = reason_code
        if reason_code.is_failure:
            return  # said by _run once the session is over, with what to do about it
        with self._unsubs_lock:
            for topic in self._pending_unsubs:
                client.unsubscribe(topic)
            self._pending_unsubs.clear()
        self._unacked_subs = {client.subscribe(topic, qos)[1] for topic, qos in list(self.subscriptions)}
        self._call(self._set_connected, True)
        if not self._unacked_subs:
            self._call(self.subscribed.set)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        self._unacked_subs.discard(mid)
        if not self._unacked_subs:
            self._call(self.subscribed.set)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self._call(self._set_connected, False)

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:  # type: ignore[no-untyped-def]
        m = Message(msg.topic, bytes(msg.payload), msg.qos, msg.mid, bool(msg.retain))
        self._call(self._deliver, m)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self._call(self._puback, mid, not reason_code.is_failure)

    def _connect_props(self) -> Properties | None:
        if not self._v5:
            return None
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if self._clean else self.settings.session_expiry_s
        return props

    def _run(self) -> None:
        s = self.settings
        attempt = 0
        no_connack = 0  # sessions in a row that ended with no CONNACK
        while not self._stop.is_set():
            self._connack = None
            try:
                if self._v5:
                    self.client.connect(
                        s.host,
                        s.port,
                        s.keepalive_s,
                        clean_start=self._clean,
                        properties=self._connect_props(),
                    )
                else:
                    self.client.connect(s.host, s.port, s.keepalive_s)
            except (OSError, ssl.SSLError) as e:
                attempt += 1
                self._backoff(attempt, f"connect to {s.host}:{s.port} failed: {e}")
                continue
            began = time.monotonic()
            # Runs until the session ends; on stop() the DISCONNECT is sent and
            # the loop ends on its own (with a deadline should the socket hang).
            try:
                while self.client.loop(timeout=0.05) == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    if self._stop.is_set() and time.monotonic() - self._stop_at > 2.0:
                        break
            except Exception:  # this thread must outlive any one bad packet
                log.exception("%s: MQTT network loop failed; reconnecting", self.name)
                with contextlib.suppress(Exception):
                    self.client.disconnect()
            self._call(self._set_connected, False)
            if self._stop.is_set():
                break
            # A session that lasted a while resets the backoff.
            attempt = 1 if time.monotonic() - began > s.backoff_max_s else attempt + 1
            connack = self._connack
            no_connack = no_connack + 1 if connack is None else 0
            if connack is not None and connack.is_failure:
                self._backoff(
                    attempt, self._refusal(connack), floor=s.refused_backoff_s, level=logging.WARNING
                )
            elif self._v5 and no_connack >= NO_CONNACK_HINT_AFTER:
                why = (
                    f"{s.host}:{s.port} closed the connection {no_connack} times in a row without "
                    f"answering the MQTT 5 CONNECT (no CONNACK): {V5_HINT} "
                    "(or the port is not MQTT, or it wants TLS)"
                )
                self._backoff(attempt, why, level=logging.WARNING)
            else:
                self._backoff(attempt, f"connection to {s.host}:{s.port} lost")

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

    def _backoff(
        self, attempt: int, why: str, *, floor: float | None = None, level: int = logging.INFO
    ) -> None:
        s = self.settings
        lo = s.backoff_min_s if floor is None else min(s.backoff_max_s, max(floor, s.backoff_min_s))
        # jitter above a floor too: a fleet refused together must not retry together
        cap = min(s.backoff_max_s, max(2 * lo, s.backoff_min_s * 2 ** min(attempt, 20)))
        delay = random.uniform(lo, cap)  # full jitter
        log.log(level, "%s: %s; retrying in %.2fs", self.name, why, delay)
        self._stop.wait(delay)

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
            log.log(logging.DEBUG if self._stop.is_set() else logging.WARNING, "%s: disconnected", self.name)
        self._state_changed.set()

    def _deliver(self, m: Message) -> None:
        for pattern, queue in self._inboxes:
            if paho.topic_matches_sub(pattern, m.topic):
                queue.put_nowait(m)
                return
        self.messages.put_nowait(m)

    def inbox(self, pattern: str) -> asyncio.Queue[Message]:
        """A queue of its own for messages on topics matching ``pattern`` (they skip ``messages``)."""
        queue: asyncio.Queue[Message] = asyncio.Queue()
        self._inboxes.append((pattern, queue))
        return queue

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now if a session is up, and again in every later session."""
        with self._unsubs_lock:
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
            with self._unsubs_lock:
                rc, _ = self.client.unsubscribe(topic)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self._pending_unsubs.add(topic)

    async def wait_state_change(self) -> None:
        self._state_changed.clear()
        await self._state_changed.wait()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # calls left for a loop that has ended (a drain scheduled there never ran) are dropped:
        # this loop drains from scratch
        self._calls.clear()
        self._drain_scheduled = False
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-paho", daemon=True)
        self._thread.start()

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
        # paho's callback is handed to this loop, so it cannot run before this line
        fut = self._pubacks[info.mid] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(fut, within)
        except TimeoutError:
            return False
        finally:
            self._pubacks.pop(info.mid, None)

    def _puback(self, mid: int, ok: bool) -> None:
        fut = self._pubacks.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(ok)

    def ack(self, msg: Message) -> None:
        if msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)

    async def stop(self, final: tuple[str, bytes, bool] | None = None) -> None:
        """Disconnect cleanly, optionally after one last publish (topic, payload, retain)."""
        if final is not None and self.connected.is_set():
            info = self.client.publish(final[0], final[1], qos=1, retain=final[2])
            with contextlib.suppress(Exception):
                await asyncio.to_thread(info.wait_for_publish, 2.0)
        self._stop_at = time.monotonic()
        self._stop.set()
        with contextlib.suppress(Exception):
            self.client.disconnect()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        self.connected.clear()
