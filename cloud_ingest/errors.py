"""The cloud services' errors: each says what went wrong and where."""

from edge_tier.errors import EdgeTierError


class IngestError(EdgeTierError):
    """Base for everything the cloud side raises on purpose."""


class StreamSetupError(IngestError):
    """A JetStream stream or bucket could not be created or brought up to date."""


class Tier2ModelError(IngestError):
    """The tier-two model or its runtime cannot be used; the message names the file and the reason."""


class ModelCheckError(IngestError):
    """``cloud-ingest model check`` cannot run the model on its features (unreadable file, wrong shape)."""
