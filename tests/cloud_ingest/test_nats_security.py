"""The cloud services on a secured NATS: TLS (mutual), NKey users and .creds (JWT) auth.

Real nats-servers: one with mutual TLS (``verify: true``) and an NKey user, one in operator
mode (decentralised JWT auth, an in-memory resolver with the account preloaded). The
certificates, NKeys and JWTs are made here. Config errors are checked through
``load_ingest_config``, as the CLI loads a config file.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
import pytest
import tomli_w

from cloud_ingest.config import IngestConfig, load_ingest_config
from cloud_ingest.nats_client import NatsConnectError, connect_nats
from edge_tier import topics
from edge_tier.config import ConfigError
from edge_tier.tokens import TokenStore
from edge_tier_harness.brokers import Mosquitto, NatsServer
from edge_tier_harness.services import ApiProcess, IngestProcess, WorkerProcess
from tests.support import DEVICE, TENANT, RawClient, frame, ingest_config, wait_until, worker_config
from tests.tls import TlsFiles, make_tls

# -- NKeys and JWTs ----------------------------------------------------------


@dataclass(frozen=True)
class NKey:
    seed: bytes
    public: str


def new_nkey(prefix: int) -> NKey:
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    kp = nkeys.from_seed(bytearray(seed))
    return NKey(bytes(seed), kp.public_key.decode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def jwt(issuer: NKey, subject: str, name: str, nats_claims: dict[str, Any]) -> str:
    """A NATS JWT (alg ed25519-nkey) for ``subject``, signed by ``issuer``."""
    claims: dict[str, Any] = {"iat": int(time.time()), "iss": issuer.public, "name": name, "sub": subject}
    claims["nats"] = {**nats_claims, "version": 2}
    claims["jti"] = (
        base64.b32encode(hashlib.sha256(json.dumps(claims).encode()).digest()).decode().rstrip("=")
    )
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = nkeys.from_seed(bytearray(issuer.seed)).sign(f"{head}.{body}".encode())
    return f"{head}.{body}.{_b64(sig)}"


def creds_text(user_jwt: str, seed: bytes) -> str:
    return (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
    )


UNLIMITED = {"subs": -1, "data": -1, "payload": -1}


def operator_setup(workdir: Path) -> tuple[str, Path]:
    """nats-server config for operator mode with one JetStream account; and a user's .creds."""
    workdir.mkdir(parents=True, exist_ok=True)
    op, acc, user = (
        new_nkey(p) for p in (nkeys.PREFIX_BYTE_OPERATOR, nkeys.PREFIX_BYTE_ACCOUNT, nkeys.PREFIX_BYTE_USER)
    )
    (workdir / "operator.jwt").write_text(jwt(op, op.public, "et-operator", {"type": "operator"}))
    limits = {**UNLIMITED, "imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1}
    limits |= {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    account = jwt(op, acc.public, "et-cloud", {"type": "account", "limits": limits})
    creds = workdir / "et-ingest.creds"
    creds.write_text(creds_text(jwt(acc, user.public, "et-ingest", {"type": "user", **UNLIMITED}), user.seed))
    creds.chmod(0o600)
    system = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)  # JetStream needs a system account
    system_jwt = jwt(op, system.public, "SYS", {"type": "account", "limits": {**UNLIMITED, "conn": -1}})
    q = json.dumps
    config = (
        f"operator: {q(str(workdir / 'operator.jwt'))}\n"
        f"system_account: {system.public}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{ {acc.public}: {q(account)}, {system.public}: {q(system_jwt)} }}\n"
    )
    return config, creds


def tls_block(t: TlsFiles, *, verify: bool) -> str:
    q = json.dumps
    return (
        f"tls {{ ca_file: {q(str(t.ca))}, cert_file: {q(str(t.server_cert))}, "
        f"key_file: {q(str(t.server_key))}, verify: {str(verify).lower()}, timeout: 2 }}"
    )


# -- fixtures ----------------------------------------------------------------


@dataclass
class Secured:
    server: NatsServer
    tls: TlsFiles
    seed_file: Path


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    """nats-server with mutual TLS (client certificates verified) and one NKey user."""
    t = make_tls(tmp_path / "pki", "et-ingest")
    user = new_nkey(nkeys.PREFIX_BYTE_USER)
    seed_file = tmp_path / "secrets" / "et-ingest.nk"
    seed_file.parent.mkdir()
    seed_file.write_bytes(user.seed + b"\n")
    seed_file.chmod(0o600)
    extra = tls_block(t, verify=True) + f'\nauthorization {{ users: [ {{ nkey: "{user.public}" }} ] }}'
    server = NatsServer(tmp_path / "nats", extra_config=extra)
    server.start()
    try:
        yield Secured(server, t, seed_file)
    finally:
        server.stop()


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tomli_w.dumps(cfg).encode())
    return path


def nats_section(s: Secured, **more: Any) -> dict[str, Any]:
    t = s.tls
    return {
        "servers": [s.server.url],
        "tls_ca": str(t.ca),
        "tls_cert": str(t.client_cert),
        "tls_key": str(t.client_key),
        "nkey_seed_file": str(s.seed_file),
        "connect_timeout_s": 3.0,
        **more,
    }


async def jetstream_roundtrip(cfg: IngestConfig) -> str:
    """Connect as the services do and make a JetStream API call; the connected URL's scheme."""
    nc = await connect_nats(cfg, "et-test")
    try:
        info = await nc.jetstream().account_info()
        assert info.limits is not None
        assert nc.connected_url is not None
        return str(nc.connected_url.scheme)
    finally:
        await nc.close()


def connect_error(cfg: IngestConfig) -> str:
    with pytest.raises(NatsConnectError) as e:
        asyncio.run(asyncio.wait_for(connect_nats(cfg, "et-test"), 20))
    return str(e.value)


# -- config validation -------------------------------------------------------


def test_relative_tls_and_nkey_paths_are_relative_to_the_config_file(
    secured: Secured, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = secured.tls.ca.parent  # the pki directory: name the files relatively
    (conf_dir / "user.nk").write_bytes(secured.seed_file.read_bytes())
    path = write_config(
        conf_dir / "ingest.toml",
        {
            "nats": {
                "tls_ca": "ca.pem",
                "tls_cert": "client.pem",
                "tls_key": "client.key",
                "nkey_seed_file": "user.nk",
            }
        },
    )
    monkeypatch.chdir(tmp_path)  # somewhere else
    n = load_ingest_config(path).nats
    assert (n.tls_ca, n.tls_cert, n.tls_key) == (
        conf_dir / "ca.pem",
        conf_dir / "client.pem",
        conf_dir / "client.key",
    )
    assert n.nkey_seed_file == conf_dir / "user.nk" and n.tls


def test_missing_key_file_is_a_config_error_naming_the_field(secured: Secured, tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "conf" / "ingest.toml", {"nats": nats_section(secured, tls_key="nope.key")}
    )
    with pytest.raises(ConfigError) as e:
        load_ingest_config(path)
    msg = str(e.value)
    assert str(path) in msg and "nats.tls_key" in msg
    assert str(tmp_path / "conf" / "nope.key") in msg and "does not exist" in msg


def test_a_bad_path_from_the_environment_names_the_variable(
    secured: Secured, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path / "ingest.toml", {"nats": nats_section(secured)})
    monkeypatch.setenv("CLOUD_INGEST_NATS__TLS_CA", str(tmp_path / "missing-ca.pem"))
    with pytest.raises(
        ConfigError, match=r"nats\.tls_ca \(from \$CLOUD_INGEST_NATS__TLS_CA\).*does not exist"
    ):
        load_ingest_config(path)


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"tls_key": None}, "nats.tls_key", "tls_cert is set without tls_key"),
        ({"tls_cert": None}, "nats.tls_key", "tls_key is set without tls_cert"),
        ({"tls_key": "CA"}, "nats.tls_key", "is not the PEM private key of tls_cert"),
        ({"tls_ca": "KEY"}, "nats.tls_ca", "no usable PEM CA certificate"),
        ({"user": "et-ingest", "password": "pw"}, "nats.nkey_seed_file", "and user/password are both set"),
        ({"creds_file": "CREDS"}, "nats.nkey_seed_file", "nkey_seed_file and creds_file are both set"),
        ({"nkey_seed_file": "CA"}, "nats.nkey_seed_file", "does not hold an NKey user seed"),
        ({"nkey_seed_file": "BROKEN_SEED"}, "nats.nkey_seed_file", "malformed NKey user seed"),
        (
            {"tls_ca": None, "tls_cert": None, "tls_key": None, "tls_handshake_first": True},
            "nats.tls_handshake_first",
            "needs TLS",
        ),
        ({"password": "pw"}, "nats.password", "password is set without user"),
    ],
)
def test_bad_nats_settings_are_config_errors_naming_the_field(
    secured: Secured, tmp_path: Path, change: dict[str, Any], field: str, words: str
) -> None:
    broken = tmp_path / "broken.nk"
    seed = bytearray(secured.seed_file.read_bytes().strip())
    seed[10] = ord("A") if seed[10] != ord("A") else ord("B")  # checksum no longer matches
    broken.write_bytes(bytes(seed))
    files = {"CA": str(secured.tls.ca), "KEY": str(secured.tls.client_key), "BROKEN_SEED": str(broken)}
    files["CREDS"] = str(operator_setup(tmp_path / "op")[1])
    section = nats_section(secured)
    for k, v in change.items():
        if v is None:
            section.pop(k)
        else:
            section[k] = files.get(v, v) if isinstance(v, str) else v
    with pytest.raises(ConfigError) as e:
        load_ingest_config(write_config(tmp_path / "ingest.toml", {"nats": section}))
    assert f"  {field}:" in str(e.value) and words in str(e.value), str(e.value)


def test_creds_and_password_together_are_a_config_error(tmp_path: Path) -> None:
    _, creds = operator_setup(tmp_path / "op")
    nats = {"creds_file": str(creds), "user": "et-ingest", "password": "pw"}
    with pytest.raises(ConfigError, match=r"nats\.creds_file: .*creds_file and user/password are both set"):
        load_ingest_config(write_config(tmp_path / "ingest.toml", {"nats": nats}))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("not a creds file\n", "is not a NATS .creds file"),
        (
            "-----BEGIN NATS USER JWT-----\neyJ0eXAi.x.y\n------END NATS USER JWT------\n",
            "no '-----BEGIN USER NKEY",
        ),
    ],
)
def test_a_malformed_creds_file_is_a_config_error(tmp_path: Path, text: str, words: str) -> None:
    (tmp_path / "bad.creds").write_text(text)
    with pytest.raises(ConfigError, match=r"nats\.creds_file: ") as e:
        load_ingest_config(write_config(tmp_path / "ingest.toml", {"nats": {"creds_file": "bad.creds"}}))
    assert words in str(e.value)


# -- against real servers ----------------------------------------------------


def test_mutual_tls_and_an_nkey_user_connect_and_use_jetstream(secured: Secured, tmp_path: Path) -> None:
    cfg = load_ingest_config(write_config(tmp_path / "ingest.toml", {"nats": nats_section(secured)}))
    asyncio.run(jetstream_roundtrip(cfg))


def test_a_wrong_ca_is_an_error_naming_the_server_and_tls(secured: Secured, tmp_path: Path) -> None:
    other = make_tls(tmp_path / "other-pki", "x")
    cfg = load_ingest_config(
        write_config(tmp_path / "ingest.toml", {"nats": nats_section(secured, tls_ca=str(other.ca))})
    )
    msg = connect_error(cfg)
    assert msg.startswith("TLS: the certificate of NATS server ")
    assert secured.server.url in msg and f"nats.tls_ca ({other.ca})" in msg and "does not verify" in msg


def test_no_client_certificate_for_a_server_that_verifies_them_is_an_error(
    secured: Secured, tmp_path: Path
) -> None:
    section = nats_section(secured)
    del section["tls_cert"], section["tls_key"]
    cfg = load_ingest_config(write_config(tmp_path / "ingest.toml", {"nats": section}))
    msg = connect_error(cfg)
    assert "TLS" in msg and secured.server.url in msg and "client certificate" in msg, msg


def test_an_unknown_nkey_is_refused_with_an_error_naming_the_seed_file(
    secured: Secured, tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(new_nkey(nkeys.PREFIX_BYTE_USER).seed)
    cfg = load_ingest_config(
        write_config(tmp_path / "ingest.toml", {"nats": nats_section(secured, nkey_seed_file=str(stranger))})
    )
    msg = connect_error(cfg)
    assert f"NATS server {secured.server.url} refused" in msg and f"nats.nkey_seed_file ({stranger})" in msg


def test_tls_configured_never_connects_in_the_clear(nats_server: NatsServer, tmp_path: Path) -> None:
    """A server without TLS while the config asks for it: an error, no plaintext fallback."""
    t = make_tls(tmp_path / "pki", "x")
    cfg = IngestConfig(
        nats={"servers": [nats_server.url], "tls_ca": str(t.ca), "user": "u", "password": "pw"}
    )
    msg = connect_error(cfg)
    assert f"NATS server {nats_server.url} does not offer TLS" in msg and "not connecting in the clear" in msg


def test_a_creds_file_connects_in_operator_mode_and_uses_jetstream(tmp_path: Path) -> None:
    t = make_tls(tmp_path / "pki", "et-ingest")
    auth, creds = operator_setup(tmp_path / "op")
    server = NatsServer(tmp_path / "nats", extra_config=auth + tls_block(t, verify=False))
    server.start()
    try:
        tls_url = server.url.replace("nats://", "tls://")
        cfg = load_ingest_config(
            write_config(
                tmp_path / "ingest.toml",
                {"nats": {"servers": [tls_url], "creds_file": str(creds), "tls_ca": str(t.ca)}},
            )
        )
        assert asyncio.run(jetstream_roundtrip(cfg)) == "tls"
        # the same server refuses a user its account did not sign
        _, foreign = operator_setup(tmp_path / "op2")
        cfg2 = IngestConfig(nats={"servers": [tls_url], "creds_file": str(foreign), "tls_ca": str(t.ca)})
        msg = connect_error(cfg2)
        assert "refused" in msg and f"nats.creds_file ({foreign})" in msg
    finally:
        server.stop()


def test_ingest_worker_and_api_run_on_mutual_tls_with_an_nkey(
    secured: Secured, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """An upload committed by ingest, answered by a worker and indexed by the API: all over TLS."""
    pytest.importorskip("onnxruntime", reason="pip install onnxruntime")
    nats = nats_section(secured)
    ingest = IngestProcess(
        tmp_path / "ingest",
        {**ingest_config(mosquitto.port, secured.server.url), "nats": nats},
        name="ingest",
    )
    worker = WorkerProcess(
        tmp_path / "worker", {**worker_config(secured.server.url), "nats": nats}, name="worker"
    )
    store = TokenStore(tmp_path / "registry.db")
    token = store.add(TENANT)[1]
    api = ApiProcess(
        tmp_path / "api",
        {"nats": nats, "api": {"registry": str(tmp_path / "registry.db")}},
        name="api",
    )
    client: RawClient | None = None
    try:
        for p in (ingest, worker, api):
            p.start(timeout=30)
        client = RawClient(mosquitto.port)
        client.publish(frame(1, 5, prev=0, dim=16))
        assert [r["status"] for r in client.wait_receipts(1)] == ["committed"]
        cfg = IngestConfig(nats=nats)

        async def stored() -> int:
            nc = await connect_nats(cfg, "et-check")
            try:
                return (await nc.jetstream().stream_info(topics.FEATURES_STREAM)).state.messages
            finally:
                await nc.close()

        assert asyncio.run(stored()) == 1

        def api_results() -> int:
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=5)
            try:
                conn.request("GET", "/v1/devices", headers={"Authorization": f"Bearer {token}"})
                body = json.loads(conn.getresponse().read())
            finally:
                conn.close()
            return sum(d["results"] for d in body.get("devices", []) if d["device"] == DEVICE)

        wait_until(lambda: api_results() == 5, 30, "the worker's results in the API")
    finally:
        if client is not None:
            client.close()
        for p in (api, worker, ingest):
            p.stop()
