"""The cloud services' errors: each says what went wrong and where."""


class IngestError(Exception):
    """Base for everything the cloud side raises on purpose."""


class StreamSetupError(IngestError):
    """A JetStream stream or bucket could not be created or brought up to date."""


class ModelError(IngestError):
    """The tier-two model or its runtime cannot be used; the message names the file and the reason."""
