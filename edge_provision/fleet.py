"""The fleet directory: a CA, a model-signing key, and a registry of devices, apps and tokens.

``DIR/ca.pem`` and ``ca.key`` (EC P-256, the fleet's CA), ``signing.key`` / ``signing.pub``
(Ed25519, for model updates), ``registry.db`` (SQLite: devices, application users,
API tokens), ``crl.pem`` (revoked device certificates). Private files are 0600.

A device's MQTT identity is ``{tenant}/{device}``: the CN of its certificate (TLS
listener, ``use_identity_as_username``) and its username (password listener,
``use_username_as_clientid``). The broker's ACL substitutes it with ``%u``, so
``pattern write et/%u/up`` lets a device write its own upload topic and no other.

Users: ``ingest`` (the cloud side: reads uploads and statuses, writes receipts and
results), ``app`` (reads one tenant's results) and ``provision`` (``edge-provision``
itself: the only identity that writes control documents and model chunks).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import os
import pwd
import secrets
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from edge_tier import topics
from edge_tier.errors import EdgeTierError
from edge_tier.tokens import SCHEMA as TOKENS_SCHEMA
from edge_tier.wire import validate_id

log = logging.getLogger(__name__)
# What each role may publish and read of the device topics (the mosquitto ACL and the NATS config)
DEVICE_PUBLISHES: tuple[topics.Channel, ...] = ("up", "status")
DEVICE_READS: tuple[topics.Channel, ...] = ("receipt", "control")
APP_READS: tuple[topics.Channel, ...] = ("results", "status")
REGISTRY = "registry.db"
INGEST_USER = "et-ingest"
PROVISION_USER = "et-provision"  # edge-provision's own MQTT identity: control documents, model chunks
ROLES = ("ingest", "app", "provision")
SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    serial TEXT NOT NULL,
    password_hash TEXT,
    nats_hash TEXT,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER,
    PRIMARY KEY (tenant, device)
);
CREATE TABLE IF NOT EXISTS retired_certs (
    serial TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    retire_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    tenant TEXT,
    password_hash TEXT NOT NULL,
    nats_hash TEXT,
    created_ms INTEGER NOT NULL
);
"""


class FleetError(EdgeTierError):
    """The fleet directory cannot do what was asked; the message says what and where."""


def mosquitto_hash(password: str, iterations: int = 101) -> str:
    """mosquitto's own password-file hash (``$7$``: PBKDF2-SHA512, as mosquitto_passwd writes)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def nats_hash(password: str) -> str | None:
    """The bcrypt hash nats-server takes in place of a password (as ``nats server passwd`` writes);
    None without bcrypt (the identity is then left out of nats.conf, which says so)."""
    try:
        import bcrypt
    except ImportError:
        log.warning("bcrypt is not installed (pip install 'edge-tier[provision]'): no NATS password made")
        return None
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10, prefix=b"2a")).decode()


def _hashes(password: str) -> tuple[str, str | None]:
    return mosquitto_hash(password), nats_hash(password)


def _write_private(path: Path, data: bytes, owner: tuple[int, int] | None = None) -> None:
    """Write ``path`` readable by its owner only: us, or ``owner`` (uid, gid) when given."""
    path.write_bytes(data)
    path.chmod(0o600)
    if owner is not None:
        os.chown(path, *owner)


def _broker_owner(out: Path, user: str | None) -> tuple[int, int] | None:
    """(uid, gid) to give the broker's private files to: ``user``'s, when we run as root
    and mosquitto would drop to that user; None when no change of owner is needed."""
    if user is None or user == "root" or os.geteuid() != 0:
        return None  # not root: mosquitto keeps our uid and reads what we wrote
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise FleetError(
            f"broker user {user!r} does not exist here, and mosquitto started as root drops to it "
            f"(to 'nobody' when it is missing): create it (Debian's mosquitto package does), "
            f"--broker-user NAME for another, or --broker-user root to keep mosquitto as root"
        ) from None
    groups = set(os.getgrouplist(user, pw.pw_gid))
    path = out.resolve()
    for d in [path, *path.parents]:
        if not d.exists():
            continue
        st = d.stat()
        if st.st_uid == pw.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            raise FleetError(
                f"{d}: mosquitto, started as root, runs as {user!r}, who cannot enter this directory "
                f"(mode {stat.S_IMODE(st.st_mode):04o}, owner {_user_name(st.st_uid)}) and so could not "
                f"read {out}: --out a directory it can reach (say /etc/mosquitto/edge-tier), or "
                f"--broker-user root to keep mosquitto as root"
            )
    return pw.pw_uid, pw.pw_gid


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _pem_key(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-tier"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


@dataclass(frozen=True)
class DeviceInfo:
    tenant: str
    device: str
    serial: str
    created_ms: int
    revoked_ms: int | None


class Fleet:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not (self.root / REGISTRY).exists() or not (self.root / "ca.key").exists():
            raise FleetError(
                f"{self.root}: not a fleet directory (create one with edge-provision init {self.root})"
            )
        self.db = sqlite3.connect(self.root / REGISTRY)
        self.db.executescript(SCHEMA + TOKENS_SCHEMA)
        for table in ("devices", "users"):  # registries made before the NATS config existed
            if "nats_hash" not in {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN nats_hash TEXT")

    @classmethod
    def init(cls, root: str | Path, *, name: str = "edge-tier fleet") -> Fleet:
        root = Path(root)
        if (root / "ca.key").exists():
            raise FleetError(f"{root}: already a fleet directory (ca.key exists); not touching it")
        root.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        ca = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{name} CA"))
            .issuer_name(_name(f"{name} CA"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(key, hashes.SHA256())
        )
        _write_private(root / "ca.key", _pem_key(key))
        (root / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        signing = ed25519.Ed25519PrivateKey.generate()
        _write_private(root / "signing.key", _pem_key(signing))
        (root / "signing.pub").write_bytes(
            signing.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        sqlite3.connect(root / REGISTRY).executescript(SCHEMA + TOKENS_SCHEMA)
        (root / REGISTRY).chmod(0o600)
        fleet = cls(root)
        fleet.add_user(INGEST_USER, "ingest", None)
        fleet.add_user(PROVISION_USER, "provision", None)
        fleet.write_crl()
        return fleet

    # -- certificates ---------------------------------------------------------

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate((self.root / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((self.root / "ca.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    def issue(
        self, cn: str, *, server_names: list[str] | None = None, days: int = 397
    ) -> tuple[bytes, bytes, str]:
        """(certificate PEM, key PEM, serial hex) for ``cn``, signed by the fleet CA."""
        ca, ca_key = self._ca()
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        serial = x509.random_serial_number()
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server_names:
            import ipaddress

            alt: list[x509.GeneralName] = []
            for n in server_names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    alt.append(x509.DNSName(n))
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), format(serial, "x")

    def write_crl(self) -> Path:
        ca, ca_key = self._ca()
        now = dt.datetime.now(dt.UTC)
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=30))
        )
        now_ms = int(time.time() * 1000)
        gone = self.db.execute(
            "SELECT serial, revoked_ms FROM devices WHERE revoked_ms IS NOT NULL "
            "UNION SELECT serial, retire_ms FROM retired_certs WHERE retire_ms <= ?",
            (now_ms,),
        ).fetchall()
        for serial, when_ms in gone:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(serial, 16))
                .revocation_date(dt.datetime.fromtimestamp(when_ms / 1000, dt.UTC))
                .build()
            )
        path = self.root / "crl.pem"
        path.write_bytes(b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        return path

    # -- devices and users ----------------------------------------------------

    def add_device(
        self, tenant: str, device: str, bundle: Path, *, broker_host: str, port: int, tls_port: int
    ) -> DeviceInfo:
        """Register a device and write its bundle: agent.toml, ca.pem, device.pem, device.key."""
        validate_id("tenant", tenant)
        validate_id("device", device)
        if self._row(tenant, device) is not None:
            raise FleetError(f"device {tenant}/{device} is already registered (revoke it, or rotate it)")
        where = (broker_host, port, tls_port)
        serial, (password_hash, nhash) = self._write_bundle(tenant, device, bundle, *where)
        now = int(time.time() * 1000)
        with self.db:
            self.db.execute(
                "INSERT INTO devices (tenant, device, serial, password_hash, nats_hash, created_ms) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (tenant, device, serial, password_hash, nhash, now),
            )
        return DeviceInfo(tenant, device, serial, now, None)

    def rotate_device(
        self, tenant: str, device: str, bundle: Path, *, broker_host: str, port: int, tls_port: int,
        overlap_s: float = 7 * 24 * 3600,
    ) -> DeviceInfo:  # fmt: skip
        """New certificate and password in a new bundle. The old certificate stays valid for
        ``overlap_s`` (it goes into the CRL at the first ``broker-config`` after that); the
        old password ends at the next ``broker-config`` (mosquitto keeps one per user)."""
        row = self._row(tenant, device)
        if row is None or row[1] is not None:
            raise FleetError(f"device {tenant}/{device}: not registered, or revoked")
        where = (broker_host, port, tls_port)
        serial, (password_hash, nhash) = self._write_bundle(tenant, device, bundle, *where)
        retire = int((time.time() + overlap_s) * 1000)
        with self.db:
            self.db.execute(
                "INSERT INTO retired_certs (serial, tenant, device, retire_ms) VALUES (?, ?, ?, ?)",
                (row[0], tenant, device, retire),
            )
            self.db.execute(
                "UPDATE devices SET serial = ?, password_hash = ?, nats_hash = ? "
                "WHERE tenant = ? AND device = ?",
                (serial, password_hash, nhash, tenant, device),
            )
        return next(d for d in self.devices(tenant) if d.device == device)

    def _row(self, tenant: str, device: str) -> tuple[str, int | None] | None:
        q = "SELECT serial, revoked_ms FROM devices WHERE tenant = ? AND device = ?"
        row: tuple[str, int | None] | None = self.db.execute(q, (tenant, device)).fetchone()
        return row

    def _write_bundle(
        self, tenant: str, device: str, bundle: Path, broker_host: str, port: int, tls_port: int
    ) -> tuple[str, tuple[str, str | None]]:
        """Write a bundle with fresh credentials; (certificate serial, (mosquitto, NATS) password hashes)."""
        identity = f"{tenant}/{device}"
        cert, key, serial = self.issue(identity)
        password = secrets.token_urlsafe(24)
        bundle.mkdir(parents=True, exist_ok=True)
        (bundle / "ca.pem").write_bytes((self.root / "ca.pem").read_bytes())
        (bundle / "device.pem").write_bytes(cert)
        (bundle / "signing.pub").write_bytes((self.root / "signing.pub").read_bytes())
        _write_private(bundle / "device.key", key)
        agent = {
            "device": {"tenant": tenant, "device": device},
            "mqtt": {
                "host": broker_host,
                "port": tls_port,
                "tls_ca": "ca.pem",
                "tls_cert": "device.pem",
                "tls_key": "device.key",
            },
            "control": {"signing_key": "signing.pub"},  # model updates must be signed by the fleet
        }
        _write_private(bundle / "agent.toml", tomli_w.dumps(agent).encode())
        # for brokers without client certificates: merge into agent.toml, drop the tls_* keys
        _write_private(
            bundle / "password.toml",
            tomli_w.dumps({"mqtt": {"port": port, "username": identity, "password": password}}).encode(),
        )
        return serial, _hashes(password)

    def devices(self, tenant: str | None = None) -> list[DeviceInfo]:
        rows = self.db.execute(
            "SELECT tenant, device, serial, created_ms, revoked_ms FROM devices "
            "WHERE ? IS NULL OR tenant = ? ORDER BY tenant, device",
            (tenant, tenant),
        ).fetchall()
        return [DeviceInfo(*r) for r in rows]

    def revoke_device(self, tenant: str, device: str) -> DeviceInfo:
        with self.db:
            cur = self.db.execute(
                "UPDATE devices SET revoked_ms = ?, password_hash = NULL, nats_hash = NULL "
                "WHERE tenant = ? AND device = ? "
                "AND revoked_ms IS NULL",
                (int(time.time() * 1000), tenant, device),
            )
        if cur.rowcount == 0:
            raise FleetError(f"device {tenant}/{device}: not registered, or already revoked")
        self.write_crl()
        return next(d for d in self.devices(tenant) if d.device == device)

    def add_user(self, name: str, role: str, tenant: str | None) -> str:
        """An MQTT user: ``ingest`` (the cloud side), ``app`` (reads one tenant's results) or
        ``provision`` (writes control documents and model chunks); its password."""
        if role not in ROLES:
            raise FleetError(f"user {name}: role {role!r} is none of {', '.join(ROLES)}")
        if role == "app":
            validate_id("tenant", tenant or "")
        validate_id("user", name)
        password = secrets.token_urlsafe(24)
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO users (name, role, tenant, password_hash, nats_hash, created_ms) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (name, role, tenant, *_hashes(password), int(time.time() * 1000)),
            )
        _write_private(self.root / f"{name}.password", password.encode())
        return password

    # -- the broker -----------------------------------------------------------

    def broker_files(
        self, out: Path, *, host: str, port: int, tls_port: int, bind: str | None = None,
        user: str | None = None,
    ) -> dict[str, Path]:  # fmt: skip
        """mosquitto's side of the fleet: password file, ACL, server certificate, CRL and a
        config with a TLS listener (client certificates) and a password listener.

        Both listeners bind ``bind`` (default: ``host``, the name in the server certificate,
        which devices connect to; ``0.0.0.0`` for every interface). ``user`` is rendered as
        mosquitto's ``user`` option: the account it drops to when started as root. Rendered
        as root for a user other than root, the private files (password file, server key)
        are given to that user, 0600, so that ``mosquitto -c CONF`` started as root can read
        them; a directory on the way that the user cannot enter is a :class:`FleetError`
        before anything is written. ``user=None`` renders no ``user`` option."""
        owner = _broker_owner(out, user)
        fresh = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        if fresh and owner is not None:
            out.chmod(0o755)  # whatever the umask: the broker's user must enter it
        lines = []
        for tenant, device, h in self.db.execute(
            "SELECT tenant, device, password_hash FROM devices "
            "WHERE revoked_ms IS NULL AND password_hash IS NOT NULL"
        ):
            lines.append(f"{tenant}/{device}:{h}")
        for name, h in self.db.execute("SELECT name, password_hash FROM users ORDER BY name"):
            lines.append(f"{name}:{h}")
        _write_private(out / "passwd", ("\n".join(lines) + "\n").encode(), owner)
        acl = [
            "# written by edge-provision broker-config; devices are {tenant}/{device} (%u)",
            # %u is the username, {tenant}/{device}: two levels of topics.mqtt_topic
            *(f"pattern write {topics.ROOT}/%u/{c}" for c in DEVICE_PUBLISHES),
            *(f"pattern read {topics.ROOT}/%u/{c}" for c in DEVICE_READS),
        ]
        # model chunks are shared by a tenant's devices: %u (tenant/device) cannot name that
        for tenant, device in self.db.execute(
            "SELECT tenant, device FROM devices WHERE revoked_ms IS NULL ORDER BY tenant, device"
        ):
            acl += ["", f"user {tenant}/{device}", f"topic read {topics.model_chunks_filter(tenant)}"]
        # Each ingest process needs a user of its own: the password listener makes the
        # username the client id, and two sessions with one client id evict each other.
        for (name,) in self.db.execute("SELECT name FROM users WHERE role = 'ingest' ORDER BY name"):
            acl += [
                "",
                f"user {name}",
                f"topic read {topics.mqtt_filter('up')}",
                f"topic read {topics.mqtt_filter('status')}",
                f"topic write {topics.mqtt_filter('receipt')}",
                f"topic write {topics.mqtt_filter('results')}",
            ]
        # control documents and model chunks: edge-provision's identity only. They are signed
        # all the same; the ACL keeps everyone else from even overwriting the retained copies.
        for (name,) in self.db.execute("SELECT name FROM users WHERE role = 'provision' ORDER BY name"):
            acl += [
                "",
                f"user {name}",
                f"topic write {topics.mqtt_filter('control')}",
                f"topic write {topics.model_chunks_filter('+')}",
            ]
        for name, tenant in self.db.execute(
            "SELECT name, tenant FROM users WHERE role = 'app' ORDER BY name"
        ):
            acl += [
                "",
                f"user {name}",
                *(f"topic read {topics.mqtt_filter(c, tenant)}" for c in APP_READS),
            ]
        (out / "acl").write_text("\n".join(acl) + "\n")
        cert, key, _ = self.issue("mqtt-broker", server_names=[host, "localhost", "127.0.0.1"])
        (out / "server.pem").write_bytes(cert)
        _write_private(out / "server.key", key, owner)
        (out / "ca.pem").write_bytes((self.root / "ca.pem").read_bytes())
        (out / "crl.pem").write_bytes(self.write_crl().read_bytes())
        bind = bind or host
        run_as = (
            "" if user is None else f"# the account mosquitto runs as when started as root\nuser {user}\n"
        )
        conf = f"""# written by edge-provision broker-config
{run_as}per_listener_settings false
allow_anonymous false
password_file {out / "passwd"}
acl_file {out / "acl"}

# devices with client certificates: the certificate's CN is the MQTT username
listener {tls_port} {bind}
cafile {out / "ca.pem"}
certfile {out / "server.pem"}
keyfile {out / "server.key"}
crlfile {out / "crl.pem"}
require_certificate true
use_identity_as_username true

# devices and services with passwords: the username is the client id
listener {port} {bind}
use_username_as_clientid true
"""
        (out / "mosquitto.conf").write_text(conf)
        return {"conf": out / "mosquitto.conf", "passwd": out / "passwd", "acl": out / "acl"}

    def nats_config(
        self, out: Path, *, port: int = 4222, mqtt_port: int = 1883, bind: str | None = None
    ) -> Path:
        """The embedded mode's broker: nats-server with JetStream and its MQTT listener, the
        same identities and the same scoping as the mosquitto ACL, as subject permissions
        (MQTT ``et/T/D/up`` is subject ``et.T.D.up``, ``+`` is ``*``). Both listeners bind
        ``bind`` (None: every interface)."""
        out.mkdir(parents=True, exist_ok=True)
        q = json.dumps  # a JSON string is a quoted string in the NATS config format

        def user(
            name: str, h: str, pub: list[str] | None, sub: list[str] | None, deny: list[str] | None = None
        ) -> str:
            perms = ""
            if pub is not None and sub is not None:
                perms = (f", permissions: {{publish: {{allow: {q(pub)}}}, "
                         f"subscribe: {{allow: {q(sub)}}}}}")  # fmt: skip
            elif deny is not None:
                perms = f", permissions: {{publish: {{deny: {q(deny)}}}}}"
            return f"    {{user: {q(name)}, password: {q(h)}{perms}}}"

        control = topics.mqtt_as_nats(topics.mqtt_filter("control"))
        all_chunks = topics.mqtt_as_nats(topics.model_chunks_filter("+"))
        # NATS keeps MQTT retained messages in the stream $MQTT_rmsgs (subjects $MQTT.rmsgs.>):
        # a user who could write there or change that stream could plant a control document
        mqtt_store = ["$MQTT.>", "$JS.API.STREAM.*.$MQTT_rmsgs", "$JS.API.STREAM.*.*.$MQTT_rmsgs"]
        ingest_deny = [control, all_chunks, *mqtt_store]

        users, skipped = [], []
        for tenant, device, h in self.db.execute(
            "SELECT tenant, device, nats_hash FROM devices WHERE revoked_ms IS NULL ORDER BY tenant, device"
        ):
            if h is None:
                skipped.append(f"{tenant}/{device}")
                continue
            pub = [topics.mqtt_as_nats(topics.mqtt_topic(tenant, device, c)) for c in DEVICE_PUBLISHES]
            sub = [topics.mqtt_as_nats(topics.mqtt_topic(tenant, device, c)) for c in DEVICE_READS]
            users.append(
                user(
                    f"{tenant}/{device}",
                    h,
                    pub,
                    [*sub, topics.mqtt_as_nats(topics.model_chunks_filter(tenant))],
                )
            )
        for name, role, tenant, h in self.db.execute(
            "SELECT name, role, tenant, nats_hash FROM users ORDER BY name"
        ):
            if h is None:
                skipped.append(name)
            elif role == "app":
                reads = [topics.mqtt_as_nats(topics.mqtt_filter(c, tenant)) for c in APP_READS]
                users.append(user(name, h, [], reads))
            elif role == "provision":
                users.append(user(name, h, [control, all_chunks], []))
            else:  # ingest and workers: JetStream and every topic, but not what provision writes
                users.append(user(name, h, None, None, deny=ingest_deny))
        note = ""
        if skipped:
            note = f"# no NATS password (made before NATS configs; rotate them): {', '.join(skipped)}\n"
        host = "" if bind is None else f"host: {q(bind)}\n"
        host_m = "" if bind is None else f"host: {q(bind)}, "
        conf = f"""# written by edge-provision broker-config: the embedded mode (no mosquitto)
{note}{host}port: {port}
jetstream {{ store_dir: {q(str(out / "nats-data"))} }}
server_name: et-embedded
mqtt {{ {host_m}port: {mqtt_port} }}
authorization {{
  users = [
{chr(10).join(users)}
  ]
}}
"""
        path = out / "nats.conf"
        _write_private(path, conf.encode())
        return path
