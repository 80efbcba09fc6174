"""Rescued records: which of them the stream already holds, told by seq.

A device whose queue file fails its integrity check sets it aside and sends what could be
read of it in *rescued* frames (``FLAG_RESCUED``, docs/guarantees.md "Rescue"). Their
records keep their seqs, which lie below the device's high-water mark as soon as the
fresh queue has committed anything, so the chain's rule (at or below the mark: a re-send)
cannot tell which of them the cloud holds. This module can: for a rescued frame of seqs
``lo..hi`` it reads the device's messages whose ranges meet ``lo..hi`` and decodes their
seqs.

- On the chain's subject, ``Et-Last-Seq`` grows with the stream sequence, so the first
  message that can meet ``lo`` is found by bisection over the stream (``next_by_subj``
  gets), and read forward until ``Et-First-Seq`` passes ``hi``: about log2(stream) + the
  overlap requests, whatever the device's history.
- Rescued records go to the device's ``.rescued`` subject, never the chain's, so the
  chain's last message stays its mark. That subject holds a device's rescues only: few
  messages, all read.

Each record of the frame is then one of:

- ``held``: a stored message has its seq; not stored again;
- ``new``: above the mark, or at or above the first seq of the device's oldest message
  still in the stream (the stream keeps a suffix of the device's history, and no message
  in it has the seq), or the stream never let a message go;
- ``unknown``: below all that while the stream has let messages go (age, size): it may be
  in a message that is gone. Kept in ET_DEADLETTER for an operator; never guessed either way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import nats.js.errors
import numpy as np
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg

from edge_tier import topics
from edge_tier.wire import Frame, FrameLimits, WireError, decode_frame

# Stored frames were taken under the limits of their day; read them with the format's own.
_STORED = FrameLimits()


@dataclass(frozen=True, slots=True)
class Sorted:
    """One rescued frame's records, by what the stream holds (boolean masks over its records)."""

    new: np.ndarray
    held: np.ndarray
    unknown: np.ndarray
    rescued_last: int  # stream sequence of the device's last rescued message (0: none)


async def _next(js: JetStreamContext, subject: str, seq: int) -> RawStreamMsg | None:
    """The first message on ``subject`` at or after stream sequence ``seq``."""
    try:
        return await js.get_msg(topics.FEATURES_STREAM, seq=seq, subject=subject, next=True)
    except nats.js.errors.NotFoundError:
        return None


def _header(m: RawStreamMsg, name: str) -> int:
    return int((m.headers or {}).get(name, 0))


def _seqs(m: RawStreamMsg) -> np.ndarray:
    """The seqs a stored message holds; its header range if it does not decode (it was
    checked when stored, so this is a damaged stream: count them held, never store twice)."""
    try:
        return decode_frame(m.data or b"", limits=_STORED).seqs
    except WireError:
        lo, hi = _header(m, topics.H_FIRST), _header(m, topics.H_LAST)
        return np.arange(lo, hi + 1, dtype=np.uint64)


async def sort_rescued(js: JetStreamContext, frame: Frame, mark: int) -> Sorted:
    """Sort ``frame``'s records by what ET_FEATURES holds; ``mark``: the device's committed
    high-water mark (nothing above it was ever stored on the chain)."""
    lo, hi = frame.first_seq, frame.last_seq
    seqs = frame.seqs
    info = await js.stream_info(topics.FEATURES_STREAM)
    first, last = int(info.state.first_seq or 1), int(info.state.last_seq or 0)
    held = np.zeros(seqs.shape, dtype=bool)

    def hold(m: RawStreamMsg) -> None:
        nonlocal held
        held |= np.isin(seqs, _seqs(m))

    rescued_last = 0
    rescued_subject = topics.features_subject(frame.tenant, frame.device, rescued=True)
    m = await _next(js, rescued_subject, first)
    while m is not None:
        rescued_last = int(m.seq or 0)
        if _header(m, topics.H_FIRST) <= hi and _header(m, topics.H_LAST) >= lo:
            hold(m)
        m = await _next(js, rescued_subject, rescued_last + 1)

    known_from = 0  # every seq >= this that the chain stored is in a message still here
    if lo <= mark:
        chain = topics.features_subject(frame.tenant, frame.device)
        oldest = await _next(js, chain, first)
        known_from = _header(oldest, topics.H_FIRST) if oldest is not None else mark + 1
        a, b = first, last + 1
        while a < b:
            mid = (a + b) // 2
            m = await _next(js, chain, mid)
            if m is None or _header(m, topics.H_LAST) >= lo:
                b = mid
            else:
                a = int(m.seq or mid) + 1
        m = await _next(js, chain, a)
        while m is not None and _header(m, topics.H_FIRST) <= hi:
            hold(m)
            m = await _next(js, chain, int(m.seq or 0) + 1)
    aged = first > 1  # the stream has let messages go (age, size or a purge)
    unknown = ~held & (seqs <= mark) & (seqs < known_from) if aged else np.zeros(seqs.shape, dtype=bool)
    return Sorted(new=~held & ~unknown, held=held, unknown=unknown, rescued_last=rescued_last)


def subset(frame: Frame, mask: np.ndarray) -> Frame:
    """The frame with only the records where ``mask`` is set (at least one)."""
    meta = None if frame.meta is None else tuple(m for m, keep in zip(frame.meta, mask, strict=True) if keep)
    return dataclasses.replace(
        frame,
        seqs=frame.seqs[mask],
        scores=frame.scores[mask],
        times_ms=frame.times_ms[mask],
        features=frame.features[mask],
        meta=meta,
    )
