"""The agent's end of the control channel (the format is ``edge_tier.control``).

The retained document on ``et/{tenant}/{device}/control`` is applied as it arrives and
again at every start (the last one applied is kept on disk, so a device that boots
without a broker runs as it was told): threshold, upload rate and pause take effect at
once. Nothing of a document is applied unless the fleet's key signed all of it for this
device, its generation is above the applied one and it has not expired; an agent without
``[control] signing_key`` refuses every document. A model update must not go below the
installed model's counter unless the document says rollback (``control/models.json``
keeps the installed counter per stream). A model update is fetched chunk by chunk
(only the chunks not yet on disk are subscribed to, so a transfer resumes after a
reconnect or a restart), joined, checked whole, loaded and tried on a dummy batch;
only then does it replace the running model, atomically. A model that fails any step
is refused and the running one stays. Every outcome is acknowledged in the status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_agent import metrics
from edge_agent.config import AgentConfig
from edge_agent.files import write_atomic
from edge_agent.prefilter import Prefilter
from edge_agent.stream_models import StreamModels, load_prefilter, settings
from edge_tier import topics
from edge_tier.control import (
    CLOCK_SKEW_MS,
    DEFAULT_MODEL,
    ControlConfig,
    ControlDoc,
    ControlRefused,
    ControlState,
    ModelRefused,
    ModelState,
    ModelUpdate,
    SignedControl,
    check_fresh,
    check_model,
    decode_control,
    encode_control,
    load_verify_key,
    verify_control,
)
from edge_tier.mqtt import MqttBridge
from edge_tier.tasks import running
from edge_tier.wire import WireError

log = logging.getLogger(__name__)


Applied = tuple[ControlDoc, SignedControl]


def _saved_doc(cfg: AgentConfig) -> Applied | None:
    """The document applied last (kept on disk), checked again against the fleet's key; not
    for expiry: it was fresh when it came, and a device cut off for long runs as last told."""
    path = cfg.control_path("control.json")
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        if cfg.control.signing_key is None:
            raise ControlRefused("no [control] signing_key is configured")
        signed = decode_control(data)
        return verify_control(load_verify_key(cfg.control.signing_key), signed, *_me(cfg)), signed
    except (WireError, ControlRefused) as e:
        log.error("%s: not applied (%s); running as the config file says", path, e)
        return None


def _me(cfg: AgentConfig) -> tuple[str, str]:
    return cfg.device.tenant, cfg.device.device


def saved_thresholds(cfg: AgentConfig) -> dict[str, float | None]:
    """The thresholds the applied document set, by model key: what the models start with."""
    saved = _saved_doc(cfg)
    if saved is None:
        return {}
    c = saved[0].config
    return {DEFAULT_MODEL: c.threshold, **c.thresholds}


@dataclass
class Transfer:
    update: ModelUpdate
    missing: set[int]
    topics: dict[str, int] = field(default_factory=dict)  # chunk topic -> index
    bad: dict[int, str] = field(default_factory=dict)  # chunks refused, until a good copy comes


class Controller:
    def __init__(
        self,
        cfg: AgentConfig,
        mqtt: MqttBridge,
        models: StreamModels,
        *,
        swap: Callable[[str, Prefilter], None],
        limit: Callable[[ControlConfig], None],
        publish_status: Callable[[], object],
    ) -> None:
        self.cfg = cfg
        self.tenant, self.device = cfg.device.tenant, cfg.device.device
        self.mqtt = mqtt
        self.models = models
        self._swap, self._limit, self._publish_status = swap, limit, publish_status
        self.key = None  # without it, every document is refused
        if cfg.control.signing_key is not None:
            self.key = load_verify_key(cfg.control.signing_key)  # a bad key stops the agent at start
        self.topic = topics.mqtt_topic(self.tenant, self.device, "control")
        self.docs = mqtt.inbox(self.topic)
        self.chunks = mqtt.inbox(topics.model_chunks_filter(self.tenant))
        mqtt.subscribe(self.topic, 1)
        self.applied: Applied | None = None
        self.error: str | None = None
        self.model: ModelState | None = None
        self.transfer: Transfer | None = None
        # updates that failed to install: not tried again, across restarts too
        self.failed: set[str] = _load_failed(cfg)
        self.fetched = 0
        # documents, chunks and installs take turns: a new document arriving while a chunk
        # is written or a model installed must not pull the transfer from under it
        self._lock = asyncio.Lock()
        self._applied_ms: int | None = None
        # the installed model's counter and sha256 per stream: nothing older comes in without rollback
        self.installed: dict[str, tuple[int, str]] = _load_installed(cfg)
        saved = _saved_doc(cfg)
        if saved is not None:
            self._apply_config(*saved)
            if saved[0].model is None:
                self.model = self._active_state(DEFAULT_MODEL)
        elif models.default is not None:
            self.model = self._active_state(DEFAULT_MODEL)

    @property
    def doc(self) -> ControlDoc | None:
        return None if self.applied is None else self.applied[0]

    # -- what the status says ------------------------------------------------------------------

    def state(self) -> ControlState:
        c = self.doc.config if self.doc is not None else ControlConfig()
        return ControlState(
            generation=self.doc.generation if self.doc is not None else 0,
            applied_ms=self._applied_ms,
            error=self.error,
            paused=c.paused,
            threshold=None if self.models.default is None else self.models.default.threshold,
            thresholds={
                k: pf.threshold
                for k, pf in self.models.running.items()
                if pf is not None and k != DEFAULT_MODEL
            },
            upload_bytes_per_s=c.upload_bytes_per_s,
            model=self.model,
        )

    def _active_state(self, key: str, **kw: object) -> ModelState:
        pf = self.models.running.get(key)
        return ModelState(
            state="active",
            stream=key,
            version=None if pf is None else pf.version,
            sha256=self.models.active_sha.get(key),
            **kw,  # type: ignore[arg-type]
        )

    async def _report(self) -> None:
        result = self._publish_status()
        if asyncio.iscoroutine(result):
            await result

    # -- the document --------------------------------------------------------------------------

    async def run(self) -> None:
        if self.doc is not None and self.doc.model is not None:
            async with self._lock:
                await self._begin_model(self.doc)  # an update cut short by a restart goes on
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._doc_loop(), name="control-docs")
            tg.create_task(self._chunk_loop(), name="control-chunks")

    async def _doc_loop(self) -> None:
        while running():
            msg = await self.docs.get()
            while not self.docs.empty():  # only the newest document matters
                msg = self.docs.get_nowait()
            await self.handle(msg.payload)

    async def handle(self, payload: bytes) -> None:
        async with self._lock:
            await self._handle(payload)

    async def _handle(self, payload: bytes) -> None:
        if not payload:
            return  # the retained document was cleared: keep running as last told
        now_ms = time.time_ns() // 1_000_000
        try:
            signed = decode_control(payload)
            if self.key is None:
                raise ControlRefused("no [control] signing_key is configured; every document must be "
                                     "signed by the fleet's key")  # fmt: skip
            doc = verify_control(self.key, signed, self.tenant, self.device)
            if not check_fresh(doc, signed, self.applied, now_ms):
                return  # the applied document again (a reconnect)
        except (
            WireError,
            ControlRefused,
        ) as e:  # malformed, unsigned, forged, for another device, a replay, expired
            self.error = f"control document refused: {e}"[:1024]
            metrics.CONTROL_REFUSED.inc()
            log.error("%s/%s: %s; running as last told", self.tenant, self.device, self.error)
            await self._report()
            return
        if doc.issued_ms > now_ms + CLOCK_SKEW_MS:
            ahead = (doc.issued_ms - now_ms) / 1000
            log.warning("%s/%s: control generation %d was issued %.0f s ahead of this device's clock",
                        self.tenant, self.device, doc.generation, ahead)  # fmt: skip
        self._apply_config(doc, signed)
        try:
            await asyncio.to_thread(
                write_atomic, self.cfg.control_path("control.json"), encode_control(signed)
            )
        except OSError as e:  # applied all the same; a restart would run as told before
            self.error = f"applied, but not saved for the next start: {e}"
            log.error("%s/%s: control generation %d %s", self.tenant, self.device, doc.generation, self.error)
        log.info(
            "%s/%s: control generation %d applied (paused=%s, threshold=%s, upload_bytes_per_s=%s)",
            self.tenant, self.device, doc.generation, doc.config.paused, doc.config.threshold,
            doc.config.upload_bytes_per_s,
        )  # fmt: skip
        if doc.model is not None:
            await self._begin_model(doc)
        else:
            self._drop_transfer()
        await self._report()

    def _apply_config(self, doc: ControlDoc, signed: SignedControl) -> None:
        self.applied, self.error = (doc, signed), None
        self._applied_ms = time.time_ns() // 1_000_000
        c = doc.config
        metrics.CONTROL_GENERATION.set(doc.generation)
        metrics.UPLOADS_PAUSED.set(int(c.paused))
        self._limit(c)
        for key, pf in self.models.running.items():
            if pf is not None:
                pf.threshold = self._threshold(key, pf, c)

    def _threshold(self, key: str, pf: Prefilter, c: ControlConfig) -> float:
        # the cloud's, else the config file's, else the model's own
        cloud = c.thresholds.get(key, c.threshold if key == DEFAULT_MODEL else None)
        for t in (cloud, settings(self.cfg, key).threshold):
            if t is not None:
                return t
        return pf.model_threshold

    # -- model updates -------------------------------------------------------------------------

    async def _begin_model(self, doc: ControlDoc) -> None:
        u = doc.model
        assert u is not None
        try:
            if u.name not in self.models.stores:
                raise ModelRefused(f"model update for stream {u.name!r}, which this device does not have "
                                   f"(its streams: {self.models.keys})")  # fmt: skip
            check_model(u, doc.rollback, self.installed.get(u.name))
        except ModelRefused as e:
            log.error("%s/%s: %s; the running model stays", self.tenant, self.device, e)
            self.model = self._active_state(u.name, error=str(e)[:1024]).model_copy(
                update={"state": "refused"}
            )
            self._drop_transfer()
            return
        if u.sha256 == self.models.active_sha[u.name]:
            self._drop_transfer()
            self.model = self._active_state(u.name)
            await self._record_installed(u)  # a rollback to the running model lowers the floor
            return
        if u.sha256 in self.failed:
            return
        if self.transfer is not None and self.transfer.update.sha256 == u.sha256:
            return
        self._drop_transfer()
        try:
            have = await asyncio.to_thread(self.models.stores[u.name].chunks_have, u)
        except OSError as e:
            log.warning("%s/%s: cannot read the chunks on disk (%s); fetching all",
                        self.tenant, self.device, e)  # fmt: skip
            have = set()
        t = self.transfer = Transfer(u, set(range(len(u.chunks))) - have)
        log.info(
            "%s/%s: model %s (%s, %d bytes): %d of %d chunks to fetch",
            self.tenant, self.device, u.version, u.sha256[:12], u.bytes, len(t.missing), len(u.chunks),
        )  # fmt: skip
        self._progress()
        if not t.missing:
            await self._install(t)
            return
        for i in sorted(t.missing):
            topic = topics.model_chunk_topic(self.tenant, u.sha256, i)
            t.topics[topic] = i
            self.mqtt.subscribe(topic, 1)

    def _progress(self) -> None:
        t = self.transfer
        assert t is not None
        n = len(t.update.chunks)
        self.model = ModelState(
            state="downloading",
            stream=t.update.name,
            version=t.update.version,
            sha256=t.update.sha256,
            chunks_have=n - len(t.missing),
            chunks_total=n,
            chunks_fetched=self.fetched,
            error=next(iter(t.bad.values()), None),
        )

    def _drop_transfer(self) -> None:
        if self.transfer is not None:
            for topic in self.transfer.topics:
                self.mqtt.unsubscribe(topic)
            self.transfer = None

    async def _chunk_loop(self) -> None:
        last_report = 0.0
        while running():
            msg = await self.chunks.get()
            async with self._lock:
                reported = await self._on_chunk(msg.topic, msg.payload)
            if reported:
                last_report = time.monotonic()
            elif self.transfer is not None and time.monotonic() - last_report > 1.0:
                last_report = time.monotonic()
                await self._report()

    async def _on_chunk(self, topic: str, payload: bytes) -> bool:
        """Keep one chunk if the transfer lacks it; True if the status was published."""
        t = self.transfer
        index = t.topics.get(topic) if t is not None else None
        if t is None or index is None or index not in t.missing:
            return False  # a chunk of another update, or one we have: retained messages linger
        try:
            await asyncio.to_thread(self.models.stores[t.update.name].put_chunk, t.update, index, payload)
        except (ModelRefused, OSError) as e:  # a bad copy, or a full disk: wait for another
            log.error("%s/%s: %s; waiting for a good copy", self.tenant, self.device, e)
            t.bad[index] = str(e)[:1024]
            self._progress()
            await self._report()
            return True
        t.missing.discard(index)
        t.bad.pop(index, None)
        self.mqtt.unsubscribe(topic)
        self.fetched += 1
        self._progress()
        if t.missing:
            return False
        await self._install(t)
        await self._report()
        return True

    async def _install(self, t: Transfer) -> None:
        u = t.update
        self._drop_transfer()
        c = self.doc.config if self.doc is not None else ControlConfig()
        store = self.models.stores[u.name]
        try:
            manifest = await asyncio.to_thread(store.install, u)
            pf = await asyncio.to_thread(load_prefilter, self.cfg, manifest, None, u.name)
            await asyncio.to_thread(store.activate, u.sha256)
        except Exception as e:  # whatever a signed but broken model does, the running one stays
            self.failed.add(u.sha256)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(store.demote, u.sha256)
                await asyncio.to_thread(_save_failed, self.cfg, self.failed)
            log.error("%s/%s: model %s refused (%s); the running model stays",
                      self.tenant, self.device, u.version, e)  # fmt: skip
            self.model = ModelState(state="failed", stream=u.name, version=u.version, sha256=u.sha256,
                                    error=str(e)[:1024])  # fmt: skip
            return
        pf.threshold = self._threshold(u.name, pf, c)
        self.models.running[u.name], self.models.active_sha[u.name] = pf, u.sha256
        self._swap(u.name, pf)
        self.model = self._active_state(u.name, chunks_total=len(u.chunks), chunks_fetched=self.fetched)
        log.info("%s/%s: model %s (counter %d, %s) is running for %s",
                 self.tenant, self.device, u.version, u.counter, u.sha256[:12], u.name)  # fmt: skip
        await self._record_installed(u)

    async def _record_installed(self, u: ModelUpdate) -> None:
        if self.installed.get(u.name) == (u.counter, u.sha256):
            return
        self.installed[u.name] = (u.counter, u.sha256)
        data = json.dumps({k: {"counter": n, "sha256": sha} for k, (n, sha) in self.installed.items()})
        try:
            await asyncio.to_thread(write_atomic, self.cfg.control_path("models.json"), data.encode())
        except OSError as e:  # kept in memory; after a restart the floor is the one before
            log.error("%s/%s: the installed model's counter is not saved (%s)", self.tenant, self.device, e)


def _load_installed(cfg: AgentConfig) -> dict[str, tuple[int, str]]:
    path = cfg.control_path("models.json")
    try:
        data = json.loads(path.read_bytes())
        return {str(k): (int(v["counter"]), str(v["sha256"])) for k, v in data.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.error("%s: unreadable (%s); no model counter to hold updates to", path, e)
        return {}


def _load_failed(cfg: AgentConfig) -> set[str]:
    try:
        return {str(x) for x in json.loads(cfg.control_path("failed.json").read_text())}
    except (OSError, ValueError, TypeError):
        return set()


def _save_failed(cfg: AgentConfig, failed: set[str]) -> None:
    write_atomic(cfg.control_path("failed.json"), json.dumps(sorted(failed)).encode())
