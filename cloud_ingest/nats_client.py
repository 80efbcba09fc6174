"""The one way every cloud service (ingest, workers, the result API) connects to NATS.

``[nats]`` in the config (:class:`cloud_ingest.config.NatsSettings`) gives the servers,
TLS (CA, client certificate and key) and one way to authenticate: user/password, a
``.creds`` file (decentralised JWT auth) or an NKey seed file.

A service waits for NATS at start-up and reconnects forever afterwards, but a first
connection that fails for a reason waiting does not fix is an error, raised as
:class:`NatsConnectError` naming the server and the setting at fault: a server
certificate that does not verify against ``tls_ca``, a failed TLS handshake (a client
certificate the server will not take, say), credentials the server refuses, or a server
that does not offer TLS when TLS is configured. The last is checked on every connection,
reconnects included: with TLS configured, credentials never go out in the clear.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient

from cloud_ingest.config import IngestConfig, NatsSettings
from cloud_ingest.errors import IngestError

log = logging.getLogger(__name__)

_AUTH_FAILURES = ("authorization violation", "authentication")  # -ERR texts that waiting won't fix


class NatsConnectError(IngestError):
    """The first connection to NATS failed for a reason retrying does not fix."""


class NoTlsOffered(nats.errors.Error):
    """TLS is configured but the server's INFO does not require (offer) it."""


def tls_context(n: NatsSettings) -> ssl.SSLContext | None:
    """The client's TLS context: verifies the server against ``tls_ca`` (else the system's
    CAs) and presents ``tls_cert``/``tls_key`` if given; None where TLS is not configured."""
    if not n.tls:
        return None
    ctx = ssl.create_default_context(cafile=str(n.tls_ca) if n.tls_ca else None)
    if n.tls_cert and n.tls_key:
        ctx.load_cert_chain(str(n.tls_cert), str(n.tls_key))
    return ctx


class _Client(NatsClient):
    """nats-py's client, refusing a plaintext connection where TLS is configured (nats-py
    itself upgrades only when the server asks for TLS, and would send credentials in the clear)."""

    require_tls = False

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        if self.require_tls and initial_connection and not info.get("tls_required"):
            raise NoTlsOffered("TLS is configured but the server does not offer TLS")
        await super()._process_info(info, initial_connection)


def _server(nc: NatsClient, n: NatsSettings) -> str:
    srv = getattr(nc, "_current_server", None)
    uri = getattr(srv, "uri", None)
    if uri is not None:
        return f"{uri.scheme}://{uri.hostname}:{uri.port}"
    return ", ".join(n.servers)


def _describe(e: BaseException, server: str, n: NatsSettings) -> tuple[str, bool]:
    """A sentence about ``e`` naming the server and the setting at fault; True if waiting won't fix it."""
    if isinstance(e, ssl.SSLCertVerificationError):
        against = f"nats.tls_ca ({n.tls_ca})" if n.tls_ca else "the system CAs (nats.tls_ca is not set)"
        name = f" for the name {n.tls_hostname!r} (nats.tls_hostname)" if n.tls_hostname else ""
        return (
            f"TLS: the certificate of NATS server {server} does not verify against {against}{name}: "
            f"{e.verify_message or e.reason or e}",
            True,
        )
    if isinstance(e, ssl.SSLError):
        mine = f" with client certificate nats.tls_cert ({n.tls_cert})" if n.tls_cert else ""
        hint = "" if n.tls_cert else " (does the server want a client certificate? nats.tls_cert/tls_key)"
        return f"TLS: the handshake with NATS server {server}{mine} failed: {e.reason or e}{hint}", True
    if isinstance(e, NoTlsOffered):
        return (
            f"TLS: NATS server {server} does not offer TLS, but TLS is configured (nats.tls_ca, "
            "nats.tls_cert or a tls:// URL); not connecting in the clear",
            True,
        )
    text = str(e)
    if isinstance(e, nats.errors.Error) and any(a in text.lower() for a in _AUTH_FAILURES):
        if n.creds_file:
            how = f"nats.creds_file ({n.creds_file})"
        elif n.nkey_seed_file:
            how = f"nats.nkey_seed_file ({n.nkey_seed_file})"
        elif n.user:
            how = f"nats.user {n.user!r} and its password"
        else:
            how = "no credentials (set nats.user/password, nats.creds_file or nats.nkey_seed_file)"
        return f"NATS server {server} refused the connection with {how}: {text}", True
    if isinstance(e, ConnectionResetError | BrokenPipeError) and n.tls:
        # A TLS 1.3 server rejecting the client certificate may just drop the connection.
        return f"NATS server {server} closed the connection during the TLS set-up: {e}", False
    return f"NATS server {server}: {type(e).__name__}: {text or 'no detail'}", False


async def connect_nats(cfg: IngestConfig, name: str) -> NatsClient:
    """Connect as ``name`` with the ``[nats]`` settings; waits for a server that is not up yet.

    Raises :class:`NatsConnectError` when the first connection fails for a reason waiting
    does not fix (see the module docstring); later errors are logged and retried.
    """
    n = cfg.nats
    nc = _Client()
    nc.require_tls = n.tls
    connected = False

    async def error_cb(e: Exception) -> None:
        message, fatal = _describe(e, _server(nc, n), n)
        if fatal and not connected:
            # nats-py awaits this inside its connect loop: raising ends the loop
            raise NatsConnectError(message) from e
        log.warning("%s: %s", name, message)

    options: dict[str, Any] = {}
    ctx = tls_context(n)
    if ctx is not None:
        options["tls"] = ctx
        options["tls_handshake_first"] = n.tls_handshake_first
        if n.tls_hostname:
            options["tls_hostname"] = n.tls_hostname
    if n.creds_file:
        options["user_credentials"] = str(n.creds_file)
    if n.nkey_seed_file:
        options["nkeys_seed"] = str(n.nkey_seed_file)
    try:
        await nc.connect(
            servers=n.servers,
            name=name,
            user=n.user,
            password=n.password,
            # nats-py annotates these two as int; it uses them as seconds, fractions included
            connect_timeout=n.connect_timeout_s,  # type: ignore[arg-type]
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,  # type: ignore[arg-type]
            allow_reconnect=True,
            error_cb=error_cb,
            **options,
        )
    except NatsConnectError:
        # not nc.close(): after a failed TLS handshake it waits forever for the socket to close
        transport = getattr(nc, "_transport", None)
        if transport is not None:
            transport.close()
        raise
    connected = True
    return nc
