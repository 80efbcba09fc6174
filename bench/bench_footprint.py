"""The idle agent's footprint: memory (RSS, PSS) and CPU of ``edge-agent run``.

The installed CLI (``edge-agent`` beside this interpreter) runs with the shipped prefilter
(``models/manifest.json``), a queue in a temp dir, its endpoint on a free port and an MQTT
port nobody listens on (it keeps reconnecting, with its default backoff). Once it answers
``/readyz`` and has settled (``--settle``), its memory is read from ``/proc/PID/status``
(VmRSS, VmHWM, threads) and ``/proc/PID/smaps_rollup`` (PSS), and its CPU from
``/proc/PID/stat`` (utime + stime, every thread) over ``--seconds``. Nothing is tuned
for the run: the agent gets the environment this process has (no ``MALLOC_ARENA_MAX``).

Baselines, in the same run and measured the same way, idle in ``time.sleep``:

* ``python``: the bare interpreter, the floor of any Python agent;
* ``python + numpy, aiohttp.web, LiteRT``: what the agent must have at idle to run its
  prefilter and serve its endpoint, imported and nothing else (the libraries' own floor);
* ``agent, eager imports``: the same agent, started through ``edge_agent.cli.main`` after
  importing what it imported before issue 15 and no longer does at idle (``EAGER``): the
  footprint before, reproduced with today's code in the same run.

``x eager`` is each row's RSS over the eager agent's. Run as ``python -m bench.bench_footprint``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import tomli_w

from bench.figures import save_json
from edge_tier_harness.testkit import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "models" / "manifest.json"
CLI = Path(sys.executable).with_name("edge-agent")
# What the agent imported before issue 15 and imports no more at idle: cryptography (the
# control channel's Ed25519, with bcrypt and cffi, now only where a signing key is configured),
# numpy.ma (np.median's masked-array check, at the first window), the model tool and the
# queue rescue (``edge-agent model``, a failed integrity check).
EAGER = (
    "cryptography.exceptions",
    "cryptography.hazmat.primitives.serialization",
    "cryptography.hazmat.primitives.asymmetric.ed25519",
    "numpy.ma",
    "edge_agent.model_tool",
    "edge_agent.rescue",
)
IDLE = "import time\nwhile True: time.sleep(3600)"


@dataclass
class Figures:
    name: str
    rss_kb: int
    hwm_kb: int
    pss_kb: int
    threads: int
    cpu_pct: float
    start_s: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _kb(value: str) -> int:
    return int(value.split()[0])


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def measure(name: str, argv: list[str], port: int | None, args: argparse.Namespace, log: Path) -> Figures:
    """Start ``argv``, wait for ``/readyz`` on ``port`` (None: only ``--settle``), sample, stop."""
    print(f"{name}: starting", file=sys.stderr)
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    try:
        deadline = t0 + args.timeout
        while port is not None and not ready(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} never became ready; its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        start_s = time.monotonic() - t0
        time.sleep(args.settle)
        c0, w0 = cpu_seconds(proc.pid), time.monotonic()
        rss = []
        while time.monotonic() - w0 < args.seconds:
            time.sleep(min(1.0, args.seconds))
            rss.append(_kb(proc_status(proc.pid)["VmRSS"]))
        cpu = cpu_seconds(proc.pid) - c0
        wall = time.monotonic() - w0
        st = proc_status(proc.pid)
        return Figures(
            name, max(rss), _kb(st["VmHWM"]), pss_kb(proc.pid), int(st["Threads"]), 100 * cpu / wall, start_s
        )
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def agent_toml(d: Path, port: int) -> Path:
    cfg = {
        "device": {"tenant": "acme", "device": "press-7"},
        "mqtt": {"host": "127.0.0.1", "port": free_port()},  # nobody listens: it keeps retrying
        "store": {"path": str(d / "queue.db")},
        "endpoint": {"host": "127.0.0.1", "port": port},
        "prefilter": {"manifest": str(MANIFEST)},
    }
    path = d / "agent.toml"
    path.write_bytes(tomli_w.dumps(cfg).encode())
    return path


def run(args: argparse.Namespace) -> list[Figures]:
    py = sys.executable
    libs = f"import numpy, aiohttp.web, ai_edge_litert.interpreter\n{IDLE}"
    eager = (
        "".join(f"import {m}\n" for m in EAGER)
        + "import sys\nfrom edge_agent.cli import main\nsys.exit(main())"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as tmp:
        for i, (name, argv, agent) in enumerate(
            (
                ("python", [py, "-c", IDLE], False),
                ("python + numpy, aiohttp.web, LiteRT", [py, "-c", libs], False),
                ("agent, eager imports", [py, "-c", eager, "run"], True),
                ("agent", [str(CLI), "run"], True),
            )
        ):
            d = Path(tmp) / str(i)
            d.mkdir()
            port = free_port() if agent else None
            if port is not None:
                argv = [*argv, "--config", str(agent_toml(d, port))]
            rows.append(measure(name, argv, port, args, d / "log"))
    return rows


def table(rows: list[Figures]) -> str:
    eager = next(r for r in rows if r.name == "agent, eager imports")
    lines = [
        "| process | RSS MB | x eager | PSS MB | peak RSS MB | threads | CPU % | ready after s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ready_s = f"{r.start_s:.1f}" if r.name.startswith("agent") else "-"
        lines.append(
            f"| {r.name} | {r.rss_kb / 1024:.1f} | {r.rss_kb / eager.rss_kb:.2f} | {r.pss_kb / 1024:.1f} "
            f"| {r.hwm_kb / 1024:.1f} | {r.threads} | {r.cpu_pct:.2f} | {ready_s} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_footprint", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="CPU and RSS sampled over this long")
    ap.add_argument("--settle", type=float, default=3.0, help="wait this long after ready before sampling")
    ap.add_argument("--timeout", type=float, default=60.0, help="for the agent to answer /readyz")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures here")
    args = ap.parse_args(argv)
    if not CLI.exists():
        ap.error(f"no installed CLI at {CLI}: pip install -e '.[edge]' into this interpreter's venv")
    rows = run(args)
    print(table(rows))
    with contextlib.suppress(KeyError):
        print(f"\nMALLOC_ARENA_MAX={os.environ['MALLOC_ARENA_MAX']} (from the environment)")
    save_json(
        args.json,
        {
            "rows": [asdict(r) for r in rows],
            "seconds": args.seconds,
            "settle": args.settle,
            "env": {
                "python": sys.version.split()[0],
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
