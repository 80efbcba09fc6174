"""The product's errors: one root, ``EdgeTierError``, and a small hierarchy under it.

Everything edge-tier raises on purpose is an ``EdgeTierError``; its message says what went
wrong and where (a file and field, a frame's field and byte offset, a device, a broker and its
port). Each deployable has its own branch (``edge_agent.errors.AgentError``,
``cloud_ingest.errors.IngestError``, ``edge_provision.FleetError``); the errors shared by all
of them live here. The input errors are also ``ValueError``s, so code that validates with the
standard library's conventions keeps working::

    EdgeTierError
    ├── ConfigError            a config file or env variable that cannot be used
    ├── WireError              a frame or JSON message that cannot be accepted (field, offset)
    │   ├── FrameTooLarge
    │   ├── ChecksumMismatch
    │   └── UnsupportedVersion
    ├── ControlRefused         a control document that must not be applied
    │   └── ModelRefused       a model update that must not be installed
    ├── ManifestError          a model manifest, or the model it names, that cannot be used
    ├── TokenError             a token store that cannot be used, an unknown token
    ├── AgentError  (edge_agent.errors)
    ├── IngestError (cloud_ingest.errors)
    ├── FleetError  (edge_provision.fleet)
    └── BrokerError (edge_tier_harness.brokers)
"""

from __future__ import annotations

__all__ = [
    "ChecksumMismatch",
    "ConfigError",
    "ControlRefused",
    "EdgeTierError",
    "FrameTooLarge",
    "ManifestError",
    "ModelRefused",
    "TokenError",
    "UnsupportedVersion",
    "WireError",
]


class EdgeTierError(Exception):
    """Base for everything edge-tier raises on purpose."""


class ConfigError(EdgeTierError):
    """A config file that cannot be used; the message names the file and the field."""


class WireError(EdgeTierError, ValueError):
    """A frame or message that cannot be accepted; str() says what and where (field name,
    byte offset). ``field`` and ``offset`` are also attributes (None where not applicable)."""

    def __init__(self, message: str, *, field: str | None = None, offset: int | None = None):
        where = ""
        if field is not None and offset is not None:
            where = f"{field} at offset {offset}: "
        elif field is not None:
            where = f"{field}: "
        elif offset is not None:
            where = f"at offset {offset}: "
        # args holds the full text so the error pickles and logs as one string.
        super().__init__(where + message)
        self.field = field
        self.offset = offset


class FrameTooLarge(WireError):
    """The frame (or a declared size inside it) exceeds the receiver's FrameLimits."""


class ChecksumMismatch(WireError):
    """The CRC32 trailer does not match: the frame was damaged in transit or storage."""


class UnsupportedVersion(WireError):
    """The frame's format version is not one this decoder knows."""


class ControlRefused(EdgeTierError, ValueError):
    """A control document that must not be applied: unsigned, signed by another key, for
    another device, a replay, expired; str() says which."""


class ModelRefused(ControlRefused):
    """A model update that must not be installed: a downgrade, a bad chunk, a bad key file."""


class ManifestError(EdgeTierError, ValueError):
    """A manifest or the model it names cannot be used; the message names the file and the reason."""


class TokenError(EdgeTierError, ValueError):
    """A token store cannot be used, or a token id is unknown."""
