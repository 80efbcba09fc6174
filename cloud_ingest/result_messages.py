"""A batch's answers as result messages: subject, JSON body and headers of every part.

The body is byte for byte what :func:`edge_tier.wire.encode_results` writes (the tests hold
the two to it), but the numbers of the whole batch are rounded and turned into Python
objects in one numpy call per column, and each body is then joined from text: per small
upload, a dict and ``json.dumps`` cost more than the model's answer. A regressor's values
(rounded to significant digits, v 2) go through ``encode_results`` itself, a part at a time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cloud_ingest.tier2 import Tier2Model
from edge_tier import topics
from edge_tier.wire import Frame, encode_results

# (subject, body, headers) of one result message
ResultMessage = tuple[str, bytes, dict[str, str]]


@dataclass(frozen=True, slots=True)
class Answered:
    """One upload and the model's answers for its records (row i: record ``frame.seqs[i]``)."""

    frame: Frame
    upload_id: str
    model: Tier2Model
    labels: np.ndarray  # label index [n]
    confidences: np.ndarray  # [n]
    values: np.ndarray | None = None  # a regressor's [n]


def _floats(columns: Sequence[np.ndarray], clip: bool) -> list[float]:
    """The columns joined, as float64 rounded to 5 decimals (as ``encode_results`` rounds)."""
    x = np.concatenate(columns).astype(np.float64) if columns else np.zeros(0)
    return np.round(np.clip(x, 0, 1) if clip else x, 5).tolist()


def _ints(columns: Sequence[np.ndarray]) -> list[int]:
    return np.concatenate(columns).tolist() if columns else []


def result_messages(
    answered: Sequence[Answered], *, worker: str, max_records: int, produced_ms: int
) -> list[list[ResultMessage]]:
    """The messages of each upload's answer (parts of at most ``max_records`` records), in order."""
    frames = [a.frame for a in answered]
    seqs = _ints([f.seqs for f in frames])
    times = _ints([f.times_ms for f in frames])
    scores = _floats([f.scores for f in frames], clip=False)
    confidences = _floats([a.confidences for a in answered], clip=True)
    index = _ints([a.labels for a in answered])
    quoted: dict[int, tuple[list[str], str]] = {}  # per model: its labels and names as JSON
    worker_json = json.dumps(worker)
    out: list[list[ResultMessage]] = []
    at = 0  # the first row of this upload in the joined columns
    for a in answered:
        model, frame, n = a.model, a.frame, len(a.labels)
        if id(model) not in quoted:
            names = f'"model":{json.dumps(model.name)},"model_version":{json.dumps(model.version)}'
            quoted[id(model)] = ([json.dumps(label) for label in model.labels], names)
        labels, names = quoted[id(model)]
        subject = topics.results_subject(frame.tenant, frame.device)
        parts = -(-n // max_records)
        # ids (tenant, device, stream, upload id) are letters, digits, '_', '-' and '.': no escapes
        head = (
            f'{{"v":1,"upload_id":"{a.upload_id}","tenant":"{frame.tenant}",'
            f'"device":"{frame.device}","stream":"{frame.stream}"'
        )
        messages = []
        for part, lo in enumerate(range(0, n, max_records)):
            hi = min(n, lo + max_records)
            if a.values is not None:
                body = encode_results(
                    frame, slice(lo, hi), model.labels, a.labels[lo:hi], a.confidences[lo:hi], part=part,
                    parts=parts, model=model.name, model_version=model.version, worker=worker,
                    produced_ms=produced_ms, values=a.values[lo:hi],
                )  # fmt: skip
            else:
                rows = slice(at + lo, at + hi)
                body = (
                    f'{head},"part":{part},"parts":{parts},{names},"worker":{worker_json},'
                    f'"produced_ms":{produced_ms},"seqs":[{",".join(map(str, seqs[rows]))}],'
                    f'"times_ms":[{",".join(map(str, times[rows]))}],'
                    f'"scores":[{",".join(map(repr, scores[rows]))}],'
                    f'"labels":[{",".join([labels[i] for i in index[rows]])}],'
                    f'"confidences":[{",".join(map(repr, confidences[rows]))}]}}'
                ).encode()
            headers = {
                topics.H_MSG_ID: topics.result_msg_id(a.upload_id, part),
                topics.H_UPLOAD_ID: a.upload_id,
                topics.H_PART: str(part),
                topics.H_PARTS: str(parts),
                # what the result API indexes, without parsing the body
                topics.H_RECORDS: str(hi - lo),
                topics.H_FIRST: str(seqs[at + lo]),
                topics.H_LAST: str(seqs[at + hi - 1]),
                topics.H_PRODUCED_MS: str(produced_ms),
            }
            messages.append((subject, body, headers))
        out.append(messages)
        at += n
    return out
