"""``edge-provision``: the fleet's identities and credentials (``edge_provision/fleet.py``).

``init DIR`` makes a fleet directory (CA, signing key, registry, the ingest and provision
MQTT users); ``device add|list|revoke`` issues and withdraws device bundles; ``user add``
makes MQTT users for ingest processes, applications and provisioning; ``broker-config``
renders mosquitto's config, password file and ACL from the registry; ``token
add|list|revoke`` are result-API tokens; ``control set|refresh`` and ``model push`` publish
signed control documents (config changes, model updates) to devices, as the provision user.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

from edge_provision.control import ControlPlane, Published
from edge_provision.fleet import PROVISION_USER, ROLES, Fleet, FleetError
from edge_tier.control import DEFAULT_MODEL
from edge_tier.mqtt import MqttSettings
from edge_tier.tokens import TokenError, TokenStore

REGISTRY = "registry.db"


def _fleet(args: argparse.Namespace) -> Path:
    return _fleet_dir(args) / REGISTRY


def _when(ms: int | None) -> str:
    return "-" if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _fleet_dir(args: argparse.Namespace) -> Path:
    return Path(args.fleet or os.environ.get("EDGE_PROVISION_FLEET", "."))


def cmd_init(args: argparse.Namespace) -> int:
    Fleet.init(args.dir)
    print(
        f"fleet in {args.dir}: ca.pem, ca.key, signing.key/.pub, registry.db, crl.pem; "
        f"MQTT users et-ingest (ingest) and {PROVISION_USER} (control documents and model chunks)"
    )
    return 0


def cmd_device_add(args: argparse.Namespace) -> int:
    fleet = Fleet(_fleet_dir(args))
    bundle = Path(args.bundle or f"{args.tenant}-{args.device}")
    fleet.add_device(
        args.tenant, args.device, bundle, broker_host=args.host, port=args.port, tls_port=args.tls_port
    )
    print(
        f"device {args.tenant}/{args.device}: bundle in {bundle} (agent.toml, ca.pem, device.pem, device.key)"
    )
    print("run `edge-provision broker-config` again so the broker knows it", file=sys.stderr)
    return 0


def cmd_device_rotate(args: argparse.Namespace) -> int:
    fleet = Fleet(_fleet_dir(args))
    bundle = Path(args.bundle or f"{args.tenant}-{args.device}")
    where = {"broker_host": args.host, "port": args.port, "tls_port": args.tls_port}
    fleet.rotate_device(args.tenant, args.device, bundle, overlap_s=args.overlap_hours * 3600, **where)
    print(f"device {args.tenant}/{args.device}: new credentials in {bundle}; the old certificate "
          f"works {args.overlap_hours:g} h more")  # fmt: skip
    print("run `edge-provision broker-config` again (the old password ends then)", file=sys.stderr)
    return 0


def cmd_device_list(args: argparse.Namespace) -> int:
    print(f"{'device':<40}{'serial':<42}{'created':<22}revoked")
    for d in Fleet(_fleet_dir(args)).devices(args.tenant):
        name = f"{d.tenant}/{d.device}"
        print(f"{name:<40}{d.serial:<42}{_when(d.created_ms):<22}{_when(d.revoked_ms)}")
    return 0


def cmd_device_revoke(args: argparse.Namespace) -> int:
    d = Fleet(_fleet_dir(args)).revoke_device(args.tenant, args.device)
    print(f"device {d.tenant}/{d.device} revoked (certificate in crl.pem, password removed)")
    print("run `edge-provision broker-config` again and reload the broker", file=sys.stderr)
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    password = Fleet(_fleet_dir(args)).add_user(args.name, args.role, args.tenant)
    print(password)
    return 0


def cmd_broker_config(args: argparse.Namespace) -> int:
    fleet = Fleet(_fleet_dir(args))
    out, bind = Path(args.out).absolute(), args.bind or args.host
    files = fleet.broker_files(
        out, host=args.host, port=args.port, tls_port=args.tls_port, bind=bind, user=args.broker_user
    )
    nats = fleet.nats_config(out, port=args.nats_port, mqtt_port=args.port, bind=bind)
    print(f"mosquitto -c {files['conf']}")
    print(f"nats-server -c {nats}    # or: the embedded mode, NATS's own MQTT listener instead of mosquitto")
    every = " (every interface)" if bind in ("0.0.0.0", "::") else ""
    print(f"listeners on {bind}{every}: {args.port} (passwords), {args.tls_port} (client certificates); "
          f"nats-server {args.nats_port}", file=sys.stderr)  # fmt: skip
    return 0


def cmd_token_add(args: argparse.Namespace) -> int:
    info, token = TokenStore(_fleet(args)).add(args.tenant, args.name or "")
    print(token)
    print(f"token {info.id} for tenant {info.tenant}: shown once, store it now", file=sys.stderr)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    print(f"{'id':<14}{'tenant':<20}{'name':<20}{'created':<22}revoked")
    for t in TokenStore(_fleet(args)).list(args.tenant):
        print(f"{t.id:<14}{t.tenant:<20}{t.name:<20}{_when(t.created_ms):<22}{_when(t.revoked_ms)}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    t = TokenStore(_fleet(args)).revoke(args.id)
    print(f"token {t.id} of tenant {t.tenant} revoked at {_when(t.revoked_ms)}")
    return 0


def _control(args: argparse.Namespace) -> ControlPlane:
    fleet = Fleet(_fleet_dir(args))
    password = args.password
    if password is None:
        f = Path(args.password_file) if args.password_file else fleet.root / f"{args.user}.password"
        try:
            password = f.read_text().strip()
        except FileNotFoundError:
            raise FleetError(
                f"{f}: no password for MQTT user {args.user!r} (a fleet made before it: "
                f"`edge-provision user add {PROVISION_USER} --role provision`, then broker-config)"
            ) from None
    mqtt = MqttSettings(host=args.host, port=args.port, username=args.user, password=password)
    return ControlPlane(fleet, mqtt)


def _targets(args: argparse.Namespace) -> str | None:
    if (args.device is None) == (not args.all):
        raise FleetError("name one DEVICE, or --all for every device of the tenant")
    return None if args.all else str(args.device)


def _published(args: argparse.Namespace, p: Published, what: str) -> int:
    who = "every device" if args.all else args.device
    print(f"{what} for {args.tenant}/{who}: {p.documents} control documents, "
          f"{p.chunks} model chunks (retained)")  # fmt: skip
    return 0


def cmd_control_set(args: argparse.Namespace) -> int:
    change: dict[str, object] = {}
    if args.threshold is not None:
        try:
            change["threshold"] = None if args.threshold == "model" else float(args.threshold)
        except ValueError:
            raise FleetError(f"--threshold {args.threshold!r}: a number, or 'model' for its own") from None
    if args.upload_rate is not None:
        change["upload_bytes_per_s"] = None if args.upload_rate == 0 else args.upload_rate
    if args.pause or args.resume:
        change["paused"] = bool(args.pause)
    if not change:
        raise FleetError("nothing to change: give --threshold, --upload-rate, --pause or --resume")
    plane, valid_ms = _control(args), _valid_ms(args)
    p = plane.set_config(args.tenant, _targets(args), valid_ms=valid_ms, stream=args.stream, **change)  # type: ignore[arg-type]
    return _published(args, p, "config " + ", ".join(f"{k}={v}" for k, v in change.items()))


def cmd_control_refresh(args: argparse.Namespace) -> int:
    p = _control(args).refresh(args.tenant, _targets(args), valid_ms=_valid_ms(args))
    return _published(args, p, "the desired state, re-signed")


def _valid_ms(args: argparse.Namespace) -> int:
    if not args.valid_days > 0:
        raise FleetError(f"--valid-days {args.valid_days}: must be above 0")
    return int(args.valid_days * 24 * 3600 * 1000)


def cmd_model_push(args: argparse.Namespace) -> int:
    manifest = Path(args.model)
    if manifest.suffix == ".tflite":  # the manifest beside it says what the model is
        manifest = manifest.with_name("manifest.json")
    p = _control(args).push_model(
        args.tenant, _targets(args), manifest, chunk_bytes=args.chunk_bytes, rollback=args.rollback,
        valid_ms=_valid_ms(args), stream=args.stream,
    )  # fmt: skip
    return _published(args, p, f"model {manifest}" + (" (rollback)" if args.rollback else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-provision", description="edge-tier provisioning")
    p.add_argument(
        "--fleet", help="fleet directory holding registry.db (default: $EDGE_PROVISION_FLEET or .)"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init", help="a new fleet directory: CA, model-signing key, registry")
    i.add_argument("dir")
    i.set_defaults(fn=cmd_init)
    dev = sub.add_parser("device", help="device identities").add_subparsers(dest="sub", required=True)
    da = dev.add_parser("add", help="register a device and write its bundle")
    da.add_argument("tenant")
    da.add_argument("device")
    da.add_argument("--bundle", help="bundle directory (default TENANT-DEVICE)")
    dro = dev.add_parser("rotate", help="new credentials; the old certificate stays valid for an overlap")
    dro.add_argument("tenant")
    dro.add_argument("device")
    dro.add_argument("--bundle", help="bundle directory (default TENANT-DEVICE)")
    dro.add_argument("--overlap-hours", type=float, default=168.0)
    dro.set_defaults(fn=cmd_device_rotate)
    for q in (da, dro):
        q.add_argument("--host", default="127.0.0.1", help="the broker the device connects to")
        q.add_argument("--port", type=int, default=1883, help="password listener")
        q.add_argument("--tls-port", type=int, default=8883, help="client-certificate listener")
    da.set_defaults(fn=cmd_device_add)
    dl = dev.add_parser("list")
    dl.add_argument("tenant", nargs="?")
    dl.set_defaults(fn=cmd_device_list)
    dr = dev.add_parser("revoke", help="withdraw a device's certificate and password")
    dr.add_argument("tenant")
    dr.add_argument("device")
    dr.set_defaults(fn=cmd_device_revoke)
    users = sub.add_parser("user", help="MQTT users for services and applications")
    ua = users.add_subparsers(dest="sub", required=True).add_parser("add", help="prints the password once")
    ua.add_argument("name")
    ua.add_argument("--role", choices=ROLES, required=True, help="provision: writes control and model topics")
    ua.add_argument("--tenant", help="the tenant an app may read results of")
    ua.set_defaults(fn=cmd_user_add)
    b = sub.add_parser("broker-config", help="mosquitto config, password file and ACL; nats.conf")
    b.add_argument("--out", default="broker")
    b.add_argument("--host", default="127.0.0.1", help="the broker's name in its certificate")
    b.add_argument(
        "--bind", metavar="ADDR",
        help="the address the listeners bind (default: --host; 0.0.0.0 for every interface)",
    )  # fmt: skip
    b.add_argument(
        "--broker-user", default="mosquitto", metavar="USER",
        help="the account mosquitto runs as when started as root (its `user` option; default "
        "mosquitto, as mosquitto's own): rendered as root, the password file and server key are "
        "given to it; root keeps mosquitto as root",
    )  # fmt: skip
    b.add_argument("--port", type=int, default=1883)
    b.add_argument("--tls-port", type=int, default=8883)
    b.add_argument("--nats-port", type=int, default=4222, help="client port in nats.conf (embedded mode)")
    b.set_defaults(fn=cmd_broker_config)
    tok = sub.add_parser("token", help="API tokens for the result API").add_subparsers(
        dest="sub", required=True
    )
    a = tok.add_parser("add", help="a new token for TENANT (printed once; stored hashed)")
    a.add_argument("tenant")
    a.add_argument("--name", help="what it is for")
    a.set_defaults(fn=cmd_token_add)
    ls = tok.add_parser("list", help="tokens (ids, never the secrets)")
    ls.add_argument("tenant", nargs="?")
    ls.set_defaults(fn=cmd_token_list)
    r = tok.add_parser("revoke", help="revoke a token by id (the API stops taking it within seconds)")
    r.add_argument("id")
    r.set_defaults(fn=cmd_token_revoke)
    ctl = sub.add_parser("control", help="config changes for devices").add_subparsers(
        dest="sub", required=True
    )
    cs = ctl.add_parser("set", help="change settings on devices without a restart (the others stay)")
    cr = ctl.add_parser("refresh", help="re-sign the desired state with a new generation and expiry")
    cr.set_defaults(fn=cmd_control_refresh)
    mp = sub.add_parser("model", help="model updates").add_subparsers(dest="sub", required=True)
    mpp = mp.add_parser("push", help="sign a prefilter with the fleet key and send it to devices")
    for q in (cs, cr, mpp):
        q.add_argument("tenant")
        q.add_argument("device", nargs="?", help="one device (or --all)")
        q.add_argument("--all", action="store_true", help="every registered device of the tenant")
        q.add_argument("--host", default="127.0.0.1", help="the MQTT broker")
        q.add_argument("--port", type=int, default=1883)
        q.add_argument("--user", default=PROVISION_USER, help="an MQTT user of role provision")
        q.add_argument("--password", help="default: the user's password file in the fleet directory")
        q.add_argument("--password-file")
        q.add_argument(
            "--valid-days", type=float, default=30.0,
            help="devices refuse the documents after this; `control refresh` before then",
        )  # fmt: skip
    cs.add_argument("--threshold", help="the model's threshold, in its score's range, or 'model' for its own")
    cs.add_argument("--stream", default=DEFAULT_MODEL, help="whose threshold (default: [prefilter])")
    cs.add_argument("--upload-rate", type=int, help="upload cap in bytes/s (0: no cap)")
    pr = cs.add_mutually_exclusive_group()
    pr.add_argument("--pause", action="store_true", help="hold uploads (the queue keeps recording)")
    pr.add_argument("--resume", action="store_true")
    cs.set_defaults(fn=cmd_control_set)
    mpp.add_argument("model", metavar="MODEL", help="the model's manifest.json (or the .tflite beside it)")
    mpp.add_argument("--chunk-bytes", type=int, default=64 * 1024)
    mpp.add_argument("--stream", default=DEFAULT_MODEL, help="whose model (default: the [prefilter] model)")
    mpp.add_argument(
        "--rollback", action="store_true",
        help="allow a model older than the one a device has (signed into the documents)",
    )  # fmt: skip
    mpp.set_defaults(fn=cmd_model_push)
    args = p.parse_args(argv)
    try:
        return int(args.fn(args))
    except (TokenError, FleetError, ValueError, OSError) as e:  # WireError, ManifestError: ValueErrors
        print(f"edge-provision: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
