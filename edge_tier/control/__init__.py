"""The control channel's wire format: what the cloud asks of one device.

One retained document per device on ``et/{tenant}/{device}/control``, holding the
whole desired state (as a device twin's desired properties do), so the broker's one
retained message per topic is always enough: the runtime config (prefilter threshold,
upload rate, pause) and, optionally, a model update. The device acknowledges in its
status (``ControlState``, carried in ``edge_tier.wire.DeviceStatus``).

The whole document is a statement signed with the fleet's Ed25519 key (format v2): the
envelope ``{"v": 2, "signed": "<the exact JSON that was signed>", "signature": "..."}``
carries a ``ControlDoc`` that binds the tenant and the device, a ``generation`` that only
grows per device, ``issued_ms`` and ``expires_ms``, the config, the model update and the
operator's ``rollback`` flag. Whoever can write a control topic but lacks the key can
neither change the config nor put a model statement signed for an older document into a
new one: every byte is covered. Freshness (``check_fresh``, ``check_model``): a device
takes only a generation above the one it applied, only before ``expires_ms``, and only a
model ``counter`` (ordered per tenant and stream) at least that of the installed one,
unless the document says ``rollback``.

A model update names the file's sha256 and size and the sha256 of every chunk. The chunks
are retained on ``et/{tenant}/_models/{sha256}/{index}``, shared by a tenant's devices; a
device checks each chunk as it arrives, keeps it on disk, and asks only for the chunks it
lacks, so a transfer cut by a reconnect or a restart resumes.

Modules: ``document`` (the signed document, its checks, building an update) and ``state``
(the device's acknowledgement, ``ControlState``). ``state`` stands apart because
``edge_tier.wire.DeviceStatus`` embeds it: it imports only the wire's leaf modules, so neither
package's import waits on the other.
"""

from __future__ import annotations

from edge_tier.control.document import (
    CLOCK_SKEW_MS,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MODEL,
    DEFAULT_VALID_MS,
    MAX_CHUNK_BYTES,
    MAX_CONTROL_BYTES,
    MAX_MODEL_BYTES,
    ControlConfig,
    ControlDoc,
    ModelUpdate,
    SignedControl,
    check_fresh,
    check_model,
    decode_control,
    encode_control,
    load_signing_key,
    load_verify_key,
    model_update,
    sign_control,
    verify_control,
)
from edge_tier.control.state import ControlState, ModelState
from edge_tier.errors import ControlRefused, ModelRefused

__all__ = [
    "CLOCK_SKEW_MS",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MODEL",
    "DEFAULT_VALID_MS",
    "MAX_CHUNK_BYTES",
    "MAX_CONTROL_BYTES",
    "MAX_MODEL_BYTES",
    "ControlConfig",
    "ControlDoc",
    "ControlRefused",
    "ControlState",
    "ModelRefused",
    "ModelState",
    "ModelUpdate",
    "SignedControl",
    "check_fresh",
    "check_model",
    "decode_control",
    "encode_control",
    "load_signing_key",
    "load_verify_key",
    "model_update",
    "sign_control",
    "verify_control",
]
