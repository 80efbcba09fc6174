"""The control channel end to end: edge-provision publishes, a real agent on a real mosquitto
applies config without a restart, installs signed models, refuses the rest, and resumes
an interrupted transfer. The attacks come from a raw MQTT client, as from anyone who can
write the control topic without the fleet's key: a model statement signed long ago put in
a new document, an unsigned config change, a replay, an expired document, a downgrade."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")

from edge_provision.control import ControlPlane, publish_retained
from edge_provision.fleet import Fleet, FleetError
from edge_tier import topics
from edge_tier.control import (
    ControlDoc,
    ModelUpdate,
    decode_control,
    encode_control,
    load_signing_key,
    model_update,
    sign_control,
)
from edge_tier.model.generator import generate
from edge_tier.model.manifest import DEFAULT_MANIFEST
from edge_tier.mqtt import MqttSettings
from edge_tier_harness.services import agent_status, metric
from tests.support import (
    DEVICE,
    TENANT,
    Pipeline,
    new_prefilter,
    post_windows,
    stream_seqs,
    wait_until,
)


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    f = Fleet.init(tmp_path / "fleet")
    f.add_device(TENANT, DEVICE, tmp_path / "bundle", broker_host="127.0.0.1", port=0, tls_port=0)
    return f


def _plane(fleet: Fleet, p: Pipeline) -> ControlPlane:
    return ControlPlane(fleet, MqttSettings(port=p.mosquitto.port, username="et-ingest", password="x"))


@pytest.fixture
def setup(make_pipeline: Callable[..., Pipeline], fleet: Fleet) -> tuple[Pipeline, ControlPlane, int]:
    """An agent with the prefilter and the fleet's key, ingest, brokers; the control plane."""
    p = make_pipeline(agent={
        "prefilter": {"manifest": str(DEFAULT_MANIFEST)},
        "control": {"signing_key": str(fleet.root / "signing.pub")},
    })  # fmt: skip
    return p, _plane(fleet, p), p.agent.port


def _control(port: int) -> dict[str, Any]:
    st = agent_status(port)
    return {} if st is None else dict(st.get("control", {}))


def _wait_control(port: int, pred: Callable[[dict[str, Any]], bool], what: str, timeout: float = 20) -> None:
    wait_until(lambda: pred(_control(port)), timeout, what)


def _windows(n: int = 64) -> np.ndarray:
    return generate(n, seed=5, fault_fraction=0.5).x


CONTROL = topics.mqtt_topic(TENANT, DEVICE, "control")


def fleet_key(fleet: Fleet):  # type: ignore[no-untyped-def]
    return load_signing_key(fleet.root / "signing.key")


def _now() -> int:
    return time.time_ns() // 1_000_000


def _signed(fleet: Fleet, *, generation: int | None = None, issued: int | None = None,
            expires: int | None = None, **kw: Any) -> bytes:  # fmt: skip
    """A document as the operator signs it (with the fleet's key): fresh unless told otherwise."""
    issued = _now() if issued is None else issued
    doc = ControlDoc(tenant=TENANT, device=DEVICE, generation=generation or _now(),
                     issued_ms=issued, expires_ms=expires or issued + 3_600_000, **kw)  # fmt: skip
    return encode_control(sign_control(fleet_key(fleet), doc))


class Raw:
    """A plain paho client: what anyone with a credential for the broker can do."""

    def __init__(self, port: int) -> None:
        self.got: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{time.time_ns()}")
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_message(self, c: Any, u: Any, m: Any) -> None:
        with self.lock:
            self.got[m.topic] = bytes(m.payload)

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def retained(self, topic: str) -> bytes:
        """The retained message on ``topic`` now (a fresh subscription gets it)."""
        with self.lock:
            self.got.pop(topic, None)
        self.c.subscribe(topic, 1)
        wait_until(lambda: topic in self.got, 5, f"the retained message on {topic}")
        self.c.unsubscribe(topic)
        with self.lock:
            return self.got.pop(topic)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _active(port: int, version: str) -> Callable[[dict[str, Any]], bool]:
    return lambda c: c.get("model", {}).get("state") == "active" and c["model"]["version"] == version


def _refusals(port: int) -> int:
    return int(metric(port, "et_agent_control_refused_total") or 0)


def _refused(port: int, what: str, before: int) -> None:
    """Wait until the agent has refused more than ``before`` documents, the last for ``what``."""
    wait_until(lambda: _refusals(port) > before, 20, "the document refused")
    error = _control(port)["error"]
    assert error.startswith("control document refused") and what in error, error


def _v1_statement(fleet: Fleet, u: ModelUpdate) -> dict[str, Any]:
    """``u`` as the model statement of format v1 was signed (no counter, no expiry, no device)."""
    body = {"v": 1, **u.model_dump(exclude={"counter"})}
    text = json.dumps(body, separators=(",", ":"))
    return {"update": text, "signature": base64.b64encode(fleet_key(fleet).sign(text.encode())).decode()}


def test_config_changes_apply_at_once_and_survive_a_restart_without_the_broker(
    setup: tuple[Pipeline, ControlPlane, int], fleet: Fleet, tmp_path: Path
) -> None:
    p, plane, port = setup
    # threshold: 1.0 keeps nothing, 0.0 keeps everything; no restart in between
    plane.set_config(TENANT, DEVICE, threshold=1.0)
    _wait_control(port, lambda c: c.get("threshold") == 1.0, "threshold 1.0")
    assert post_windows(port, _windows())["kept"] == 0
    plane.set_config(TENANT, None, threshold=0.0)  # --all: the tenant's every device
    _wait_control(port, lambda c: c.get("threshold") == 0.0, "threshold 0.0")
    assert post_windows(port, _windows())["kept"] == 64
    p.wait_drained()
    # pause: records queue up, nothing leaves; resume: all of them arrive, once
    before = len(stream_seqs(p.nats.url))
    plane.set_config(TENANT, DEVICE, paused=True)
    _wait_control(port, lambda c: c.get("paused") is True, "paused")
    r = post_windows(port, _windows())
    time.sleep(1.5)
    st = agent_status(port)
    assert st is not None and st["records"] == 64, st
    assert len(stream_seqs(p.nats.url)) == before, "a paused agent uploaded"
    doc = plane.desired(TENANT, DEVICE)
    assert doc is not None and doc.config.threshold == 0.0, "a change keeps the other settings"
    # a restart with the broker down: the agent runs as it was last told, from its disk
    p.agent.stop()
    p.mosquitto.stop()
    p.agent.start(timeout=20)
    c = _control(port)
    assert (c.get("paused"), c.get("threshold"), c.get("generation")) == (True, 0.0, doc.generation), c
    p.mosquitto.start()
    plane.set_config(TENANT, DEVICE, paused=False, upload_bytes_per_s=20_000)
    p.wait_drained()
    seqs = stream_seqs(p.nats.url)
    assert sorted(seqs[before:]) == list(range(r["first_seq"], r["last_seq"] + 1))
    # the upload cap (set with the resume): B bytes cannot leave in less than (B - burst) / rate
    sent0, t0 = (metric(port, "et_agent_upload_bytes_total") or 0.0), time.monotonic()
    for _ in range(3):
        post_windows(port, generate(1000, seed=6, fault_fraction=0.5).x)
    p.wait_drained(timeout=90)
    elapsed, sent = time.monotonic() - t0, (metric(port, "et_agent_upload_bytes_total") or 0.0) - sent0
    assert sent > 80_000, sent
    least = 0.9 * (sent - 20_000) / 20_000
    assert elapsed > least, f"{sent} bytes in {elapsed:.1f}s: the cap was not applied"


def test_a_signed_model_is_installed_a_bad_one_refused_and_the_running_one_keeps_working(
    setup: tuple[Pipeline, ControlPlane, int], fleet: Fleet, tmp_path: Path
) -> None:
    p, plane, port = setup
    v2 = new_prefilter(tmp_path / "v2", "2.0.0", seed=2)
    plane.push_model(TENANT, DEVICE, v2)
    _wait_control(port, lambda c: c.get("model", {}).get("state") == "active"
                  and c["model"]["version"] == "2.0.0", "model 2.0.0 active")  # fmt: skip
    st = agent_status(port)
    assert st is not None and st["model_version"] == "2.0.0"
    assert post_windows(port, _windows())["windows"] == 64

    # signed by another fleet's key: refused, 2.0.0 keeps running
    stranger = Fleet.init(tmp_path / "stranger")
    stranger.add_device(TENANT, DEVICE, tmp_path / "b2", broker_host="h", port=0, tls_port=0)
    _plane(stranger, p).push_model(TENANT, DEVICE, new_prefilter(tmp_path / "v3", "3.0.0", seed=3))
    _refused(port, "signature does not match", 0)
    c = _control(port)
    assert c["model"]["state"] == "active" and c["model"]["version"] == "2.0.0", c

    # properly signed, but the file is no model: installed nowhere, 2.0.0 keeps running
    junk = new_prefilter(tmp_path / "v4", "4.0.0", data=b"TFL3" + bytes(5000))
    plane.push_model(TENANT, DEVICE, junk)
    _wait_control(port, lambda c: c.get("model", {}).get("state") == "failed", "a broken model refused")
    assert _control(port)["model"]["version"] == "4.0.0"
    st = agent_status(port)
    assert st is not None and st["model_version"] == "2.0.0"
    assert post_windows(port, _windows())["windows"] == 64

    # a chunk replaced on the broker (same topic, other bytes): not taken, the transfer
    # waits until a good copy is there
    v5 = new_prefilter(tmp_path / "v5", "5.0.0", seed=5)
    u, chunks = model_update(TENANT, v5, counter=3, chunk_bytes=2048)
    bad = [(topics.model_chunk_topic(TENANT, u.sha256, i), c) for i, c in enumerate(chunks)]
    bad[1] = (bad[1][0], bytes(len(chunks[1])))
    asyncio.run(publish_retained(plane.mqtt, [*bad, (CONTROL, _signed(fleet, model=u))]))
    _wait_control(port, lambda c: "does not match" in (c.get("model", {}).get("error") or ""),
                  "a tampered chunk refused")  # fmt: skip
    assert _control(port)["model"]["state"] == "downloading"
    asyncio.run(publish_retained(plane.mqtt, [(bad[1][0], chunks[1])]))
    _wait_control(port, lambda c: c.get("model", {}).get("version") == "5.0.0"
                  and c["model"]["state"] == "active", "model 5.0.0 active")  # fmt: skip

    # the installed model is damaged on disk: at the next start (no broker yet) the previous
    # one (2.0.0) runs; once the broker is back, the damaged model is fetched again and heals
    p.agent.stop()
    p.mosquitto.stop()
    slot = next(tmp_path.glob(f"agent/*.control/models/{u.sha256}"))
    (slot / "prefilter.tflite").write_bytes(b"\0" * 100)
    p.agent.start(timeout=20)
    st = agent_status(port)
    assert st is not None and st["model_version"] == "2.0.0", st
    assert post_windows(port, _windows())["windows"] == 64
    p.mosquitto.start()
    _wait_control(port, lambda c: c.get("model", {}).get("version") == "5.0.0"
                  and c["model"]["state"] == "active", "model 5.0.0 fetched again")  # fmt: skip
    st = agent_status(port)
    assert st is not None and st["model_version"] == "5.0.0", st


def test_an_interrupted_model_transfer_resumes_with_the_chunks_it_lacks(
    setup: tuple[Pipeline, ControlPlane, int], fleet: Fleet, tmp_path: Path
) -> None:
    p, plane, port = setup
    u, chunks = model_update(TENANT, new_prefilter(tmp_path / "v2", "2.0.0", seed=2), chunk_bytes=1024)
    assert len(chunks) >= 8
    parts = [(topics.model_chunk_topic(TENANT, u.sha256, i), c) for i, c in enumerate(chunks)]
    half = len(parts) // 2
    # the document and half the chunks reach the broker (the push was cut off) ...
    asyncio.run(publish_retained(plane.mqtt, [*parts[:half], (CONTROL, _signed(fleet, model=u))]))
    _wait_control(port, lambda c: c.get("model", {}).get("chunks_have") == half, f"{half} chunks on disk")
    # ... the agent dies (kill -9), the rest of the chunks arrive while it is down
    p.agent.kill()
    asyncio.run(publish_retained(plane.mqtt, parts[half:]))
    p.agent.start(timeout=20)
    _wait_control(port, lambda c: c.get("model", {}).get("state") == "active"
                  and c["model"]["version"] == "2.0.0", "model 2.0.0 active")  # fmt: skip
    m = _control(port)["model"]
    lacked = len(parts) - half
    assert m["chunks_fetched"] == lacked, f"fetched {m['chunks_fetched']} after the restart, lacked {lacked}"
    st = agent_status(port)
    assert st is not None and st["model_version"] == "2.0.0"


# -- attacks from a raw MQTT client, by someone who may write the control topic --------------


def test_an_old_signed_model_statement_in_a_new_document_is_refused(
    setup: tuple[Pipeline, ControlPlane, int], fleet: Fleet, tmp_path: Path
) -> None:
    p, plane, port = setup
    raw = Raw(p.mosquitto.port)
    v2 = new_prefilter(tmp_path / "v2", "2.0.0", seed=2)
    plane.push_model(TENANT, DEVICE, v2)
    _wait_control(port, _active(port, "2.0.0"), "model 2.0.0 active")
    old = decode_control(raw.retained(CONTROL))  # the attacker kept 2.0.0's document
    plane.push_model(TENANT, DEVICE, new_prefilter(tmp_path / "v3", "3.0.0", seed=3))
    _wait_control(port, _active(port, "3.0.0"), "model 3.0.0 active")
    u2 = old.unverified().model
    assert u2 is not None and u2.version == "2.0.0"  # its chunks are still retained
    # the statement in a new document, generation fresh, with the old document's signature ...
    body = {**json.loads(old.signed), "generation": _now() + 3_600_000}
    forged = {"v": 2, "signed": json.dumps(body), "signature": old.signature}
    raw.publish(CONTROL, json.dumps(forged).encode())
    _refused(port, "signature does not match", 0)
    # ... or with none; or as format v1 had it: a document around a model statement signed alone
    forged["signature"] = ""
    raw.publish(CONTROL, json.dumps(forged).encode())
    _refused(port, "signature does not match", 1)
    v1 = {"v": 1, "generation": _now() + 7_200_000, "model": _v1_statement(fleet, u2)}
    raw.publish(CONTROL, json.dumps(v1).encode())
    _refused(port, "SignedControl", 2)
    time.sleep(1.0)  # time enough to start a download, had it been taken
    c, st = _control(port), agent_status(port)
    assert c["model"]["version"] == "3.0.0" and c["model"]["state"] == "active", c
    assert st is not None and st["model_version"] == "3.0.0", st
    raw.close()


def test_an_unsigned_or_forged_config_change_is_refused(
    setup: tuple[Pipeline, ControlPlane, int], fleet: Fleet
) -> None:
    p, plane, port = setup
    raw = Raw(p.mosquitto.port)
    plane.set_config(TENANT, DEVICE, threshold=0.0)
    _wait_control(port, lambda c: c.get("threshold") == 0.0, "threshold 0.0")
    genuine = decode_control(raw.retained(CONTROL))
    gen = _control(port)["generation"]
    stop = {"tenant": TENANT, "device": DEVICE, "generation": _now() + 3_600_000, "issued_ms": _now(),
            "expires_ms": _now() + 3_600_000, "config": {"threshold": 1.0, "paused": True}}  # fmt: skip
    other_device = _signed(fleet, config={"threshold": 1.0}).replace(DEVICE.encode(), b"press-8")
    attempts = [
        {
            "v": 1,
            "generation": _now() + 3_600_000,
            "config": {"threshold": 1.0, "paused": True},
        },  # v1: unsigned
        {"v": 2, "signed": json.dumps(stop), "signature": ""},
        {"v": 2, "signed": json.dumps(stop), "signature": genuine.signature},  # another document's
        json.loads(other_device),  # signed, but the bytes changed to name another device
    ]
    for n, doc in enumerate(attempts):
        raw.publish(CONTROL, json.dumps(doc).encode())
        _refused(port, "SignedControl" if n == 0 else "signature does not match", n)
    # signed by the fleet for another device: refused as well (the document binds the device)
    wrong = ControlDoc(tenant=TENANT, device="press-8", generation=_now() + 3_600_000, issued_ms=_now(),
                       expires_ms=_now() + 3_600_000, config={"threshold": 1.0})  # fmt: skip
    raw.publish(CONTROL, encode_control(sign_control(fleet_key(fleet), wrong)))
    _refused(port, f"signed for {TENANT}/press-8", len(attempts))
    c = _control(port)
    assert (c["threshold"], c["paused"], c["generation"]) == (0.0, False, gen), c
    assert post_windows(port, _windows())["kept"] == 64, "a refused threshold was applied"
    raw.close()


def test_a_replay_of_an_older_signed_document_is_refused_also_after_a_restart(
    setup: tuple[Pipeline, ControlPlane, int], fleet: Fleet
) -> None:
    p, plane, port = setup
    raw = Raw(p.mosquitto.port)
    plane.set_config(TENANT, DEVICE, paused=True)
    _wait_control(port, lambda c: c.get("paused") is True, "paused")
    old = raw.retained(CONTROL)
    plane.set_config(TENANT, DEVICE, paused=False, threshold=0.0)
    _wait_control(port, lambda c: c.get("paused") is False and c.get("threshold") == 0.0, "resumed")
    gen = _control(port)["generation"]
    raw.publish(CONTROL, old)  # byte for byte, retained: it replaces the newer one on the broker
    _refused(port, "is older than the applied", 0)
    assert (_control(port)["paused"], _control(port)["generation"]) == (False, gen)
    # the agent restarts with the broker holding only the replay: it runs as last told
    p.agent.stop()
    p.agent.start(timeout=20)
    _refused(port, "is older than the applied", 0)  # a new process counts from 0
    c = _control(port)
    assert (c["paused"], c["threshold"], c["generation"]) == (False, 0.0, gen), c
    r = post_windows(port, _windows())
    p.wait_drained()
    assert r["kept"] == 64
    raw.close()


def test_an_expired_document_is_refused(setup: tuple[Pipeline, ControlPlane, int], fleet: Fleet) -> None:
    p, _, port = setup
    raw = Raw(p.mosquitto.port)
    day = 24 * 3600 * 1000
    # genuinely signed, a generation above anything, but valid only until yesterday
    raw.publish(
        CONTROL, _signed(fleet, issued=_now() - 2 * day, expires=_now() - day, config={"paused": True})
    )
    _refused(port, "expired", 0)
    assert _control(port).get("paused") is False
    # within the allowed clock skew (5 minutes) it is still taken
    raw.publish(
        CONTROL, _signed(fleet, issued=_now() - day, expires=_now() - 60_000, config={"paused": True})
    )
    _wait_control(port, lambda c: c.get("paused") is True and c.get("error") is None, "paused")
    raw.close()


def test_a_model_below_the_installed_counter_needs_a_signed_rollback(
    setup: tuple[Pipeline, ControlPlane, int], fleet: Fleet, tmp_path: Path
) -> None:
    p, plane, port = setup
    raw = Raw(p.mosquitto.port)
    v2 = new_prefilter(tmp_path / "v2", "2.0.0", seed=2)
    v3 = new_prefilter(tmp_path / "v3", "3.0.0", seed=3)
    plane.push_model(TENANT, DEVICE, v2)
    _wait_control(port, _active(port, "2.0.0"), "model 2.0.0 active")
    plane.push_model(TENANT, DEVICE, v3)
    _wait_control(port, _active(port, "3.0.0"), "model 3.0.0 active")
    # signed by the fleet, fresh, but 2.0.0 is counter 1 and 3.0.0 (counter 2) is installed
    u2, _ = model_update(TENANT, v2, counter=1)
    raw.publish(CONTROL, _signed(fleet, model=u2))
    _wait_control(port, lambda c: c.get("model", {}).get("state") == "refused", "the downgrade refused")
    c, st = _control(port), agent_status(port)
    assert "below the installed 2" in c["model"]["error"] and c["model"]["version"] == "3.0.0", c
    assert st is not None and st["model_version"] == "3.0.0"
    # edge-provision will not send it either, unless told it is a rollback
    with pytest.raises(FleetError, match="give --rollback"):
        plane.push_model(TENANT, DEVICE, v2)
    plane.push_model(TENANT, DEVICE, v2, rollback=True)
    _wait_control(port, _active(port, "2.0.0"), "model 2.0.0 back")
    # the floor is what is installed now: 3.0.0 may come again, and survives a restart
    plane.push_model(TENANT, DEVICE, v3)
    _wait_control(port, _active(port, "3.0.0"), "model 3.0.0 again")
    p.agent.stop()
    p.agent.start(timeout=20)
    raw.publish(CONTROL, _signed(fleet, model=u2))
    _wait_control(port, lambda c: c.get("model", {}).get("state") == "refused", "the downgrade refused")
    st = agent_status(port)
    assert st is not None and st["model_version"] == "3.0.0"
    raw.close()


def _zoo_manifest(tmp_path: Path, model: str, version: str, *extra: str) -> Path:
    from edge_agent.cli import main as agent_main

    out = tmp_path / f"{model}-{version}" / "manifest.json"
    zoo = Path(__file__).parents[1] / "models" / "zoo" / f"{model}.tflite"
    assert agent_main(["model", "init", str(zoo), "--out", str(out), "--version", version, *extra]) == 0
    return out


def _post_stream(port: int, stream: str, windows: np.ndarray) -> tuple[int, dict[str, Any]]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", f"/v1/windows?stream={stream}", windows.astype("<f4").tobytes(),
                     {"Content-Type": "application/x-edge-tier-windows"})  # fmt: skip
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_a_stream_model_with_another_shape_and_preprocessing_rolls_out_and_back_alone(
    make_pipeline: Callable[..., Pipeline], fleet: Fleet, tmp_path: Path
) -> None:
    ae = _zoo_manifest(tmp_path, "ae_f32", "1.0.0", "--threshold", "0.5")
    kws = _zoo_manifest(
        tmp_path, "kws_int8", "2.0.0", "--preprocess", "mfcc", "--window", "16000", "--sample-rate", "16000",
        "--param", "n_fft=640", "--param", "hop_length=320", "--param", "n_mels=40", "--param", "n_mfcc=10",
        "--threshold", "0.5",
    )  # fmt: skip
    p = make_pipeline(agent={
        "prefilter": {"manifest": str(DEFAULT_MANIFEST)},
        "streams": {"acoustic": {"manifest": str(ae)}},
        "control": {"signing_key": str(fleet.root / "signing.pub")},
    })  # fmt: skip
    plane, port = _plane(fleet, p), p.agent.port

    def models() -> dict[str, Any]:
        st = agent_status(port)
        return {} if st is None else dict(st.get("models", {}))

    assert models()["acoustic"]["window"] == [640]
    plane.push_model(TENANT, DEVICE, kws, stream="acoustic")
    wait_until(lambda: models().get("acoustic", {}).get("version") == "2.0.0", 30, "the stream's new model")
    m = models()
    assert m["acoustic"]["window"] == [16000] and m["acoustic"]["model"] == "kws_int8"
    assert m["prefilter"]["version"] == "1.0.0"  # the other model is untouched
    assert _control(port)["model"]["stream"] == "acoustic"
    st, ok = _post_stream(port, "acoustic", np.zeros((3, 16000), np.float32))
    assert st == 200 and ok["model"] == "kws_int8", ok
    st, refused = _post_stream(port, "acoustic", np.zeros((3, 640), np.float32))
    assert st == 400 and "stream 'acoustic'" in refused["detail"] and "[16000]" in refused["detail"], refused
    assert post_windows(port, _windows())["windows"] == 64  # vibration, the [prefilter] model

    # the autoencoder again (a new counter for this stream), then the keyword spotter once more:
    # below the stream's installed counter, so only as a signed rollback
    plane.push_model(TENANT, DEVICE, ae, stream="acoustic")
    wait_until(lambda: models().get("acoustic", {}).get("window") == [640], 30, "the autoencoder back")
    st, ok = _post_stream(port, "acoustic", np.zeros((3, 640), np.float32))
    assert st == 200 and ok["model"] == "ae_f32", ok
    with pytest.raises(FleetError, match="--rollback"):
        plane.push_model(TENANT, DEVICE, kws, stream="acoustic")
    plane.push_model(TENANT, DEVICE, kws, stream="acoustic", rollback=True)
    wait_until(lambda: models().get("acoustic", {}).get("window") == [16000], 30, "the stream rolled back")
    assert models()["prefilter"]["version"] == "1.0.0"

    # a stream the device does not have: refused, nothing changes
    plane.push_model(TENANT, DEVICE, kws, stream="nosuch")
    _wait_control(port, lambda c: c.get("model", {}).get("state") == "refused", "an unknown stream refused")
    assert "stream 'nosuch'" in _control(port)["model"]["error"]
    assert models()["acoustic"]["window"] == [16000]
