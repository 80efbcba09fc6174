"""``edge-agent``: run the device daemon, or read its queue's state.

Each command imports what it uses when it runs (``run`` the daemon, ``model`` the model
tool, ``install`` neither), so that one command does not carry the others' modules: the
daemon's idle footprint is issue 15's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from edge_agent.errors import AgentError
from edge_agent.model_args import add_parser as add_model_parser
from edge_tier.errors import ConfigError, ManifestError

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig


def _age(ms: int | None) -> str:
    return "never" if ms is None else f"{max(0.0, time.time() - ms / 1000):.1f}s ago"


def cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.config import load_agent_config
    from edge_agent.daemon import Agent
    from edge_tier.cli import run_service
    from edge_tier.logs import setup_logging

    cfg = load_agent_config(args.config)
    setup_logging(cfg.log_level, cfg.log_format)
    agent = Agent(cfg)
    return run_service(agent.run)


def cmd_status(args: argparse.Namespace) -> int:
    from edge_agent.config import load_agent_config
    from edge_agent.store import Store

    cfg = load_agent_config(args.config)
    up = cfg.uplink
    store = Store(
        cfg.store, readonly=True, frame_max_records=up.frame_max_records, frame_max_bytes=up.frame_max_bytes
    )
    saved = store.saved_limits()  # the cloud's, as its receipts last told
    if saved is not None:
        store.set_frame_limits(
            min(up.frame_max_records, saved[1]), min(up.frame_max_bytes, saved[0]), saved[2]
        )
    st = store.stats()
    store.close()
    d = st.as_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"device        {cfg.device.tenant}/{cfg.device.device}")
    print(f"queue         {cfg.store.path}")
    budget = st.effective_budget_bytes
    print(
        f"backlog       {st.records} records, {st.bytes} of {budget} bytes "
        f"({100 * st.bytes / max(1, budget):.1f}%)"
    )
    if st.disk_limited:
        print(
            f"disk          the filesystem bounds the queue: {budget} of the configured "
            f"{st.budget_bytes} bytes; {st.disk_free_bytes} bytes free; reserve "
            f"{'held' if st.disk_reserve_held else 'given up (the disk filled)'}"
        )
    age = d["oldest_age_s"]
    print(f"oldest        {'-' if age is None else f'{age:.1f}s'}")
    print(f"in flight     {st.frames_in_flight} frames")
    print(f"delivered     {st.delivered} records")
    ev = ", ".join(f"{k}={v}" for k, v in sorted(st.evictions.items())) or "none"
    print(f"evicted       {ev}")
    print(f"last receipt  {_age(st.last_receipt_ms)}")
    if st.corrupt_resets:
        print(f"corrupt resets {st.corrupt_resets} (old files kept beside the queue)")
    if st.rescued_records:
        print(f"rescued       {st.rescued_records} records waiting to be delivered")
    control = _control_summary(cfg)
    if control:
        print(control)
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    """Rescue the records of queue files set aside beside the queue (or the files named)."""
    from pathlib import Path

    from edge_agent.config import load_agent_config
    from edge_agent.rescue import pending, report_path, rescue_file
    from edge_agent.store import Store
    from edge_tier.logs import setup_logging

    cfg = load_agent_config(args.config)
    setup_logging(cfg.log_level, cfg.log_format)
    files = [Path(f) for f in args.files] if args.files else pending(cfg.store.path)
    if args.files and not args.again:
        done = [f for f in files if report_path(f).exists()]
        if done:
            print(f"edge-agent: already rescued (see {report_path(done[0])}); --again to read it again",
                  file=sys.stderr)  # fmt: skip
            return 2
    missing = [f for f in files if not f.is_file()]
    if missing:
        print(f"edge-agent: no such file: {missing[0]}", file=sys.stderr)
        return 2
    if not files:
        print(f"nothing to recover: no set-aside queue file beside {cfg.store.path}")
        return 0
    up = cfg.uplink
    # Refused (QueueInUse) while the agent runs: it rescues what it sets aside itself.
    store = Store(cfg.store, frame_max_records=up.frame_max_records, frame_max_bytes=up.frame_max_bytes)
    reports = []
    try:
        for f in files:
            reports.append(rescue_file(store, f))
    finally:
        store.close()
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
        return 0
    for r in reports:
        extra = "; more the damage hides (count unknown)" if r.damage_unmeasured else ""
        print(f"{r.source}: rescued {r.records} records from {r.chunks} chunks; "
              f"lost {r.lost_records} records in {r.lost_chunks} unreadable chunks{extra}")  # fmt: skip
    print("the agent delivers them when it runs (the cloud drops any it already holds)")
    return 0


def _control_summary(cfg: AgentConfig) -> str:
    """What the control channel last set, from the files the agent keeps beside the queue."""
    from edge_tier.control import decode_control
    from edge_tier.wire import WireError

    lines = []
    try:
        doc = decode_control(cfg.control_path("control.json").read_bytes()).unverified()  # display only
        c = doc.config
        lines.append(f"control       generation {doc.generation}: paused={c.paused}, threshold="
                     f"{c.threshold if c.threshold is not None else 'model'}, upload cap="
                     f"{c.upload_bytes_per_s or 'none'}")  # fmt: skip
    except (OSError, WireError):
        pass
    try:
        active = json.loads(cfg.control_path("models/active.json").read_text())
        cur, prev = (str(active.get(k))[:12] for k in ("current", "previous"))
        lines.append(f"model update  {cur} (previous {prev})")
    except (OSError, ValueError):
        pass
    return "\n".join(lines)


def cmd_simulate(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses

    from edge_agent.config import load_agent_config
    from edge_agent.simulate import report, simulate

    url = args.url
    if url is None:
        ep = load_agent_config(args.config).endpoint
        url = f"http://{ep.host}:{ep.port}"
    t0 = time.monotonic()
    tally = asyncio.run(
        simulate(
            url.rstrip("/"),
            machines=args.machines,
            seconds=args.seconds,
            rate=args.rate,
            batch=args.batch,
            seed=args.seed,
            fault_rate=args.fault_rate,
            stream=args.stream,
        )
    )
    elapsed = time.monotonic() - t0
    if args.json:
        print(json.dumps({**dataclasses.asdict(tally), "seconds": round(elapsed, 3)}))
    else:
        print(report(tally, elapsed))
    if tally.windows == 0:
        print(f"edge-agent: no window reached the agent at {url}", file=sys.stderr)
        return 1
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edge_agent.install import install

    todo = install(Path(args.bundle), Path(args.root))
    print(f"installed into {args.root}: etc/edge-agent, etc/systemd/system/edge-agent.service")
    for cmd in todo:
        print(f"  now run: {cmd}")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edge_agent.install import uninstall

    todo = uninstall(Path(args.root), purge=args.purge)
    print(
        "removed the unit and /etc/edge-agent" + ("; the queue too" if args.purge else "; the queue is kept")
    )
    for cmd in todo:
        print(f"  now run: {cmd}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-agent", description="edge-tier device agent")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the agent (queue, uplink, local enqueue endpoint)")
    r.add_argument("--config", "-c", help="agent.toml (defaults and EDGE_AGENT_* env if omitted)")
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("status", help="show the queue: depth, bytes, oldest age, evictions, last receipt")
    s.add_argument("--config", "-c")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_status)
    rec = sub.add_parser(
        "recover",
        help="rescue the records of queue files that failed their integrity check (agent stopped)",
    )
    rec.add_argument("--config", "-c")
    rec.add_argument("files", nargs="*", help="set-aside files (default: those not rescued yet)")
    rec.add_argument("--again", action="store_true", help="read a file that was already rescued again")
    rec.add_argument("--json", action="store_true", help="machine-readable output")
    rec.set_defaults(fn=cmd_recover)
    m = sub.add_parser(
        "simulate", help="simulated machines send raw vibration windows to the agent's prefilter"
    )
    m.add_argument("--config", "-c", help="agent.toml: where its endpoint listens")
    m.add_argument("--url", help="the agent's endpoint (default: from the config)")
    m.add_argument("--machines", type=int, default=4)
    m.add_argument("--seconds", type=float, default=10.0)
    m.add_argument("--rate", type=float, default=50.0, help="windows/s per machine (0: as fast as taken)")
    m.add_argument("--batch", type=int, default=10, help="windows per request")
    m.add_argument("--seed", type=int, default=1)
    m.add_argument("--fault-rate", type=float, default=0.02, help="chance a fault episode starts")
    m.add_argument("--stream", default="vibration")
    m.add_argument("--json", action="store_true", help="machine-readable summary")
    m.set_defaults(fn=cmd_simulate)
    ins = sub.add_parser("install", help="install a device bundle and the systemd unit, enable and start it")
    ins.add_argument("--bundle", required=True, help="a bundle from edge-provision device add")
    ins.add_argument("--root", default="/", help="install under this root (images, tests)")
    ins.set_defaults(fn=cmd_install)
    add_model_parser(sub)
    uni = sub.add_parser("uninstall", help="stop and remove the unit and config; keeps the queue")
    uni.add_argument("--root", default="/")
    uni.add_argument("--purge", action="store_true", help="also delete the queue (undelivered records)")
    uni.set_defaults(fn=cmd_uninstall)
    args = p.parse_args(argv)
    try:
        return int(args.fn(args))
    except (ConfigError, AgentError, ManifestError) as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
