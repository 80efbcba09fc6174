"""Tier-two workers: features from JetStream, one inference call per batch, results written once.

Per tenant, a durable pull consumer on ``et.features.{tenant}.>`` that every
worker shares (so several workers split the work). How a batch flows:

1. **fetch** (a task per tenant, ``cloud_ingest.pull``): pull requests are kept
   outstanding for as many messages as the tenant's local queue has room for (``prefetch``),
   while the tenant is within its token bucket; JetStream's deliveries land in a list, and
   the task decodes each burst of them into the tenant's queue;
2. **batch**: one inference call is filled round-robin across tenants, up to ``max_batch``
   records or ``max_wait_ms`` after the first arrived, and run in a thread: the records of
   every message in one ``Tier2Model.answer`` per model, the answers split back per message;
3. **publish** (``cloud_ingest.result_messages``, ``cloud_ingest.publisher``): the results of
   the whole batch are encoded together (columns rounded once), every part of every answer
   is written to ``et.results.{tenant}.{device}`` with ``Nats-Msg-Id`` = the upload id at
   once, their PubAcks gathered by one inbox subscription; then each features message whose
   parts JetStream has all acknowledged is acked, the rest nak'ed.

A worker killed at any point leaves each features message either unacked (redelivered, and
its results, if already written, dropped as duplicates by JetStream) or acked with its
results stored: each result exactly once.

Models: each frame is answered by the model its route names (``worker.models``: by tenant,
stream and prefilter model, first match wins; ``worker.manifest`` for the rest). Each model
is loaded once; a batch of several models' frames makes one inference call per model.

A message that cannot be answered (undecodable, no model for its tenant and stream, wrong
shape, non-finite values, inference error) is nak'ed with back-off and dead-lettered with
the reason when it fails on its ``max_deliveries``-th delivery; the rest of its batch goes on.

Fair shares between tenants: each tenant's backlog waits in its own consumer, never
in front of another's messages; a token bucket per tenant caps its features per
second (per worker process), and a tenant over its rate is not fetched from until
the bucket refills, its messages waiting in JetStream unacknowledged and unharmed;
batches are filled one message per tenant per turn, so a tenant with a deep local
queue does not fill a batch while another waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
import nats.js.errors
import numpy as np
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cloud_ingest import metrics
from cloud_ingest.config import IngestConfig, ModelRoute
from cloud_ingest.errors import Tier2ModelError
from cloud_ingest.nats_client import connect_nats
from cloud_ingest.publisher import Publisher, Stored
from cloud_ingest.pull import Pull
from cloud_ingest.result_messages import Answered, result_messages
from cloud_ingest.streams import clip_header, ensure_streams, publish_dead_letter
from cloud_ingest.tier2 import Answers, Tier2Model
from edge_tier import topics
from edge_tier.http import OpsServer
from edge_tier.logs import context
from edge_tier.ratelimit import TokenBucket
from edge_tier.tasks import running
from edge_tier.wire import Frame, WireError, decode_frame

log = logging.getLogger(__name__)


class Poison(Exception):
    """This message cannot be answered; the message says why."""


@dataclass(slots=True)
class Work:
    """One fetched features message, decoded, waiting for its batch."""

    msg: Msg
    frame: Frame
    upload_id: str
    x: np.ndarray  # float32 [n, dim]
    model: Tier2Model  # the one its route names


@dataclass(slots=True)
class Outcome:
    work: Work
    labels: np.ndarray | None = None
    confidences: np.ndarray | None = None
    error: str | None = None
    values: np.ndarray | None = None  # a regressor's answers


@dataclass
class Lane:
    """One tenant: its local queue of fetched messages and its token bucket."""

    tenant: str
    bucket: TokenBucket
    items: deque[Work] = field(default_factory=deque)
    # set when messages arrive and when the batcher makes room: the fetcher looks again
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    pull: Pull | None = None


class Worker:
    def __init__(self, cfg: IngestConfig, model: Tier2Model | None = None) -> None:
        """``model``: the fallback model, already loaded (else ``worker.manifest``'s, at start)."""
        self.cfg = cfg
        self.w = cfg.worker
        self._limits = cfg.ingest.limits  # a property that builds a new one on every call
        self.model = model  # for features no route takes (None: they are dead-lettered)
        self.routes: list[tuple[ModelRoute, Tier2Model]] = []
        self._route_of: dict[tuple[str, str, str], Tier2Model | None] = {}
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self.publisher: Publisher | None = None
        self.lanes: dict[str, Lane] = {}
        self._turn: deque[str] = deque()  # tenants in round-robin order
        self._ready_work = asyncio.Event()
        self._outbox: asyncio.Queue[list[Outcome]] = asyncio.Queue(maxsize=2)
        self._tg: asyncio.TaskGroup | None = None
        self.ready = asyncio.Event()
        self._failing: set[str] = set()  # tenants whose consumer is not bound or not answering

    # -- lifecycle --------------------------------------------------------

    async def checks(self) -> dict[str, bool]:
        return {
            "nats": bool(self.nc and self.nc.is_connected),
            "jetstream": not self.jetstream_failing,  # every tenant's consumer bound and fetching
            "model": self.model is not None or bool(self.routes),
            "started": self.ready.is_set(),
        }

    async def run(self) -> None:
        async with OpsServer(self.checks).serving(self.w.metrics_host, self.w.metrics_port):
            await self._run()

    async def _run(self) -> None:
        w = self.w
        await asyncio.to_thread(self._load_models)
        self.nc = await connect_nats(self.cfg, topics.service_client_id("worker", w.instance))
        self.js = self.nc.jetstream(timeout=self.cfg.ingest.publish_timeout_s)
        await ensure_streams(self.js, self.cfg.streams)
        self.publisher = Publisher(self.nc, self.cfg.ingest.publish_timeout_s, stream=topics.RESULTS_STREAM)
        await self.publisher.start()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._discover_loop(), name="worker-discover")
                tg.create_task(self._batch_loop(), name="worker-batch")
                tg.create_task(self._publish_loop(), name="worker-publish")
                tg.create_task(self.publisher.run(), name="worker-publish-timeouts")
                self.ready.set()
                log.info(
                    "worker ready: %s -> %s, %s, batches of up to %d records / %.1f ms",
                    topics.FEATURES_STREAM,
                    topics.RESULTS_STREAM,
                    self._models_text(),
                    w.max_batch,
                    w.max_wait_ms,
                )
        finally:
            # Fetched but unanswered messages would come back only after ack_wait: nak them
            # so that another worker takes them now. (close, not drain: a drain waits on the
            # pull subscriptions' expiring requests.)
            unanswered = [w.msg for lane in self.lanes.values() for w in lane.items]
            unanswered += [m for lane in self.lanes.values() if lane.pull for m in lane.pull.take()]
            while not self._outbox.empty():
                unanswered += [o.work.msg for o in self._outbox.get_nowait()]
            for msg in unanswered:
                with contextlib.suppress(Exception):
                    await msg.nak()
            with contextlib.suppress(Exception):
                await self.nc.close()

    # -- models and routes ------------------------------------------------

    def _load_models(self) -> None:
        """Each manifest of ``worker.models`` and ``worker.manifest`` loaded once (the same file
        named twice is one model); a model that does not load stops the worker here."""
        w = self.w
        loaded: dict[Path, Tier2Model] = {}

        def load(path: Path, where: str) -> Tier2Model:
            key = path.resolve()
            if key not in loaded:
                try:
                    loaded[key] = Tier2Model(
                        path,
                        providers=w.providers,
                        io_binding=w.io_binding,
                        threads=w.threads,
                        spin=w.spin,
                        max_batch=w.max_batch,
                    )
                except Tier2ModelError as e:
                    raise Tier2ModelError(f"{where}: {e}") from None
            return loaded[key]

        if self.model is not None:
            loaded[self.model.manifest.resolve()] = self.model
        self.routes = [(r, load(r.manifest, f"worker.models[{i}]")) for i, r in enumerate(w.models)]
        if self.model is None and w.manifest is not None:
            self.model = load(w.manifest, "worker.manifest")

    def _models_text(self) -> str:
        parts = [f"{m.name} v{m.version} for {_route_text(r)} on {m.providers[0]}" for r, m in self.routes]
        if self.model is not None:
            rest = " for the rest" if parts else ""
            parts.append(f"{self.model.name} v{self.model.version}{rest} on {self.model.providers[0]}")
        return "models " + "; ".join(parts) if parts else "no model"

    def model_for(self, frame: Frame) -> Tier2Model | None:
        """The model of the first route that takes this frame, else the fallback (or None)."""
        key = (frame.tenant, frame.stream, frame.model)
        if key not in self._route_of:
            if len(self._route_of) > 10_000:  # keys come from devices: keep the cache bounded
                self._route_of.clear()
            found = next((m for r, m in self.routes if r.takes(*key)), self.model)
            self._route_of[key] = found
        return self._route_of[key]

    # -- tenants and fetching ---------------------------------------------

    async def _discover_loop(self) -> None:
        """Start a fetcher for every tenant with features (or the configured list)."""
        assert self._tg is not None and self.js is not None
        while running():
            try:
                tenants = self.w.tenants if self.w.tenants is not None else await self._tenants_in_stream()
                for tenant in tenants:
                    if tenant not in self.lanes:
                        self._add_lane(tenant)
                        self._tg.create_task(self._fetch_loop(self.lanes[tenant]), name=f"fetch-{tenant}")
                await self._observe_pending()
            except (TimeoutError, nats.errors.Error) as e:
                log.warning("cannot list tenants in %s: %r (retrying)", topics.FEATURES_STREAM, e)
            await asyncio.sleep(self.w.discover_s)

    async def _tenants_in_stream(self) -> set[str]:
        assert self.js is not None
        info = await self.js.stream_info(topics.FEATURES_STREAM, subjects_filter=topics.FEATURES_SUBJECTS)
        found = (topics.tenant_of_features_subject(s) for s in (info.state.subjects or {}))
        return {t for t in found if t}

    async def _observe_pending(self) -> None:
        assert self.js is not None
        for tenant in list(self.lanes):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                ci = await self.js.consumer_info(topics.FEATURES_STREAM, self._consumer(tenant))
                metrics.CONSUMER_PENDING.labels(tenant).set(ci.num_pending or 0)

    def _consumer(self, tenant: str) -> str:
        return topics.worker_consumer(tenant, self.w.consumer_prefix)

    def _add_lane(self, tenant: str) -> None:
        rate = self.w.tenant_rates.get(tenant, self.w.tenant_rate)
        lane = Lane(tenant, TokenBucket(rate, self.w.tenant_burst))
        self.lanes[tenant] = lane
        self._turn.append(tenant)

    async def _bind(self, lane: Lane) -> Pull:
        """The tenant's consumer, created or brought up to this config, and a Pull on it."""
        assert self.js is not None and self.nc is not None
        w, tenant = self.w, lane.tenant
        config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=w.ack_wait_s,
            max_deliver=-1,  # the worker dead-letters after max_deliveries failures itself
            max_ack_pending=max(1000, 4 * w.prefetch),
            description=f"tier-two workers, tenant {tenant}",
            durable_name=self._consumer(tenant),
            filter_subject=topics.tenant_features(tenant),
        )
        # Create it, or bring one made by an older version up to this config (its filter
        # took no rescued records); a running consumer keeps its place either way.
        await self.js.add_consumer(topics.FEATURES_STREAM, config)
        pull = Pull(self.nc, topics.FEATURES_STREAM, self._consumer(tenant), wake=lane.wake)
        await pull.start()
        return pull

    @property
    def jetstream_failing(self) -> bool:
        return bool(self._failing)

    async def _fetch_loop(self, lane: Lane) -> None:
        w = self.w
        while running():
            pull = lane.pull = await self._bound(lane)
            while running() and pull.trouble is None:
                lane.wake.clear()  # before looking: whatever comes after this wakes the loop again
                await self._arrived(lane, pull.take())
                if pull.silent:
                    self._failing.add(lane.tenant)
                else:
                    self._failing.discard(lane.tenant)  # it answers (messages, or "expired")
                room = w.prefetch - len(lane.items) - pull.due()
                if room >= max(1, w.prefetch // 4):  # top up in sizeable requests
                    wait = lane.bucket.wait_s()
                    if wait > 0:
                        await asyncio.sleep(wait)
                        continue
                    await pull.request(room)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lane.wake.wait(), pull.expires_s)
            self._failing.add(lane.tenant)
            log.warning(
                "tenant %s: JetStream ended a pull request: %s (binding again)", lane.tenant, pull.trouble
            )
            await self._arrived(lane, pull.take())
            await pull.stop()
            await asyncio.sleep(0.5)

    async def _bound(self, lane: Lane) -> Pull:
        self._failing.add(lane.tenant)  # until its consumer is bound
        while True:
            try:
                pull = await self._bind(lane)
                self._failing.discard(lane.tenant)
                return pull
            except (TimeoutError, nats.errors.Error) as e:
                log.warning("tenant %s: cannot bind its consumer: %r (retrying)", lane.tenant, e)
                await asyncio.sleep(1.0)

    async def _arrived(self, lane: Lane, msgs: list[Msg]) -> None:
        """Decode a burst of deliveries into the tenant's queue; a message that cannot be
        answered is nak'ed or dead-lettered here."""
        if not msgs:
            return
        records = 0
        for msg in msgs:
            try:
                work = self._decode(msg)
            except Poison as e:
                await self._fail(msg, str(e))
                continue
            lane.items.append(work)
            records += work.frame.n
        lane.bucket.take(records)
        metrics.LOCAL_QUEUE.labels(lane.tenant).set(len(lane.items))
        if lane.items:
            self._ready_work.set()

    def _decode(self, msg: Msg) -> Work:
        try:
            frame = decode_frame(msg.data, limits=self._limits)
        except WireError as e:
            raise Poison(f"undecodable frame: {e}") from None
        if msg.subject != topics.features_subject(frame.tenant, frame.device, rescued=frame.rescued):
            raise Poison(f"frame of {frame.tenant}/{frame.device} on subject {msg.subject}")
        model = self.model_for(frame)
        if model is None:
            raise Poison(
                f"no model: no route of worker.models takes tenant {frame.tenant!r}, stream "
                f"{frame.stream!r}, prefilter {frame.model!r}, and worker.manifest is unset"
            )
        if frame.dim != model.dim:
            raise Poison(
                f"wrong shape: {frame.dim} features per record, the model {model.name} "
                f"(stream {frame.stream!r}) takes {model.dim}"
            )
        x = frame.features  # float32 or int8, read-only: the batch's concatenate copies it
        if x.dtype == np.int8:
            x = x.astype(np.float32) * np.float32(frame.scale)
        elif x.dtype != np.float32:
            x = x.astype(np.float32)
        # (the decoder refuses non-finite scores itself)
        if not np.isfinite(x).all():
            raise Poison("non-finite features")
        return Work(msg, frame, frame.upload_id, x, model)

    # -- batching and inference -------------------------------------------

    def _take(self, batch: list[Work], budget: int) -> int:
        """One message per tenant per turn until ``budget`` records are taken; records taken."""
        taken = 0
        progress = True
        while taken < budget and progress:
            progress = False
            for _ in range(len(self._turn)):
                tenant = self._turn[0]
                self._turn.rotate(-1)
                lane = self.lanes[tenant]
                if lane.items:
                    work = lane.items.popleft()
                    batch.append(work)
                    taken += work.frame.n
                    lane.wake.set()
                    progress = True
                    if taken >= budget:
                        break
        return taken

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while running():
            await self._ready_work.wait()
            deadline = loop.time() + self.w.max_wait_ms / 1000
            batch: list[Work] = []
            records = 0
            while records < self.w.max_batch:
                self._ready_work.clear()
                records += self._take(batch, self.w.max_batch - records)
                left = deadline - loop.time()
                if records >= self.w.max_batch or left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ready_work.wait(), left)
            if any(lane.items for lane in self.lanes.values()):
                self._ready_work.set()
            if not batch:
                continue
            for lane in self.lanes.values():
                metrics.LOCAL_QUEUE.labels(lane.tenant).set(len(lane.items))
            metrics.BATCH_RECORDS.observe(records)
            t0 = time.perf_counter()
            outcomes = await asyncio.to_thread(self.infer, batch)
            metrics.INFER_SECONDS.observe(time.perf_counter() - t0)
            await self._outbox.put(outcomes)

    def infer(self, batch: list[Work]) -> list[Outcome]:
        """One inference call per model for the whole batch (in the batch's order); if one
        fails, each of its messages alone, so that only the ones that cannot be answered are
        set aside."""
        by_model: dict[int, list[Work]] = {}
        for w in batch:
            by_model.setdefault(id(w.model), []).append(w)
        if len(by_model) == 1:
            return self._infer(batch)
        done = {id(o.work): o for works in by_model.values() for o in self._infer(works)}
        return [done[id(w)] for w in batch]

    def _infer(self, batch: list[Work]) -> list[Outcome]:
        """One call of the model these messages share."""
        try:
            a: Answers = batch[0].model.answer(np.concatenate([w.x for w in batch]))
        except Exception as e:  # onnxruntime raises its own classes; any failure is per message
            if len(batch) == 1:
                return [Outcome(batch[0], error=f"inference failed: {e}")]
            log.warning("a batch of %d messages failed (%s); answering them one by one", len(batch), e)
            return [o for w in batch for o in self._infer([w])]
        out, i = [], 0
        for w in batch:
            rows = slice(i, i + w.frame.n)
            values = None if a.values is None else a.values[rows]
            out.append(Outcome(w, a.label_index[rows], a.confidences[rows], values=values))
            i += w.frame.n
        return out

    # -- results ------------------------------------------------------------

    async def _publish_loop(self) -> None:
        while running():
            outcomes = await self._outbox.get()
            t0 = time.perf_counter()
            await self._write_results(outcomes)
            metrics.RESULT_PUBLISH_SECONDS.observe(time.perf_counter() - t0)

    async def _write_results(self, outcomes: list[Outcome]) -> None:
        """Publish every part of every answer at once, then ack each features message whose
        parts JetStream has all acknowledged; the others are nak'ed and come back."""
        assert self.publisher is not None
        answers = [o for o in outcomes if o.error is None]
        answered = []
        for o in answers:
            assert o.labels is not None and o.confidences is not None
            w = o.work
            answered.append(Answered(w.frame, w.upload_id, w.model, o.labels, o.confidences, o.values))
        messages = result_messages(
            answered,
            worker=self.w.instance,
            max_records=self.w.results_max_records,
            produced_ms=int(time.time() * 1000),
        )
        results = await self.publisher.publish_many(
            [m for parts in messages for m in parts], self.cfg.ingest.publish_timeout_s
        )
        done: dict[str, list[int]] = {}  # tenant -> [messages, duplicates, records]
        at = 0
        for o, parts in zip(answers, messages, strict=True):
            mine, at = results[at : at + len(parts)], at + len(parts)
            frame = o.work.frame
            failed = next((r for r in mine if not isinstance(r, Stored)), None)
            if failed is not None:
                # Redelivered, and the parts already stored are dropped then as duplicates.
                log.warning("upload %s: results not written (%s); it will be redelivered", o.work.upload_id,
                            failed, extra=context(o.work.upload_id))  # fmt: skip
                metrics.WORKER_MESSAGES.labels(frame.tenant, "retry").inc()
                with contextlib.suppress(Exception):
                    await o.work.msg.nak(delay=self.w.backoff_s[0])
                continue
            with contextlib.suppress(nats.errors.Error):  # a lost ack is a redelivery, deduplicated
                await o.work.msg.ack()
            counts = done.setdefault(frame.tenant, [0, 0, 0])
            if all(isinstance(r, Stored) and r.duplicate for r in mine):
                counts[1] += 1
            else:
                counts[0] += 1
                counts[2] += frame.n
        for tenant, (fresh, duplicates, records) in done.items():  # metrics once per tenant a batch
            if fresh:
                metrics.WORKER_MESSAGES.labels(tenant, "done").inc(fresh)
                metrics.WORKER_RECORDS.labels(tenant).inc(records)
            if duplicates:
                metrics.WORKER_MESSAGES.labels(tenant, "duplicate").inc(duplicates)
        for o in outcomes:
            if o.error is not None:
                await self._fail(o.work.msg, o.error, o.work.upload_id)

    @staticmethod
    def _device_of(subject: str) -> str | None:
        """The device of a features subject; None (dead-lettered as ``_``) for anything else."""
        try:
            return topics.parse_features_subject(subject)[1]
        except topics.TopicError:
            return None

    async def _fail(self, msg: Msg, reason: str, upload_id: str | None = None) -> None:
        """Nak with back-off; dead-letter on the last allowed delivery."""
        assert self.js is not None and self.nc is not None
        tenant = topics.tenant_of_features_subject(msg.subject) or topics.UNKNOWN
        md = msg.metadata
        n = md.num_delivered or 1
        where = f"{msg.subject} stream seq {md.sequence.stream}, delivery {n}/{self.w.max_deliveries}"
        try:
            if n < self.w.max_deliveries:
                delay = self.w.backoff_s[min(n, len(self.w.backoff_s)) - 1]
                log.warning("cannot answer %s: %s (retry in %.1fs)", where, reason, delay,
                            extra=context(upload_id, tenant=tenant))  # fmt: skip
                metrics.WORKER_MESSAGES.labels(tenant, "nak").inc()
                await msg.nak(delay=delay)
                return
            log.error("dead-lettering %s: %s", where, reason, extra=context(upload_id, tenant=tenant))
            headers = {
                topics.H_REASON: clip_header(reason, 2000),
                topics.H_SOURCE: topics.SOURCE_WORKER,
                topics.H_SUBJECT: msg.subject,
                topics.H_STREAM_SEQ: str(md.sequence.stream),
                topics.H_DELIVERIES: str(n),
                # dead-lettered once, even if this worker dies before the term below
                topics.H_MSG_ID: topics.worker_dlq_msg_id(md.sequence.stream),
            }
            if upload_id:
                headers[topics.H_UPLOAD_ID] = upload_id
            subject = topics.dlq_subject(topics.SOURCE_WORKER, tenant, self._device_of(msg.subject))
            await publish_dead_letter(self.nc, self.js, subject, msg.data, headers)
            await msg.term()
            metrics.WORKER_MESSAGES.labels(tenant, "deadletter").inc()
            metrics.WORKER_DEADLETTERED.labels(reason.split(":")[0][:40]).inc()
        except (TimeoutError, nats.errors.Error) as e:
            log.warning("%s: could not nak or dead-letter it (%r); it comes back after ack_wait", where, e)


def _route_text(r: ModelRoute) -> str:
    lists = (("tenants", r.tenants), ("streams", r.streams), ("prefilters", r.prefilters))
    return " ".join(f"{k} {','.join(v)}" for k, v in lists if v) or "everything"
