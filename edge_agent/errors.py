"""The agent's errors: each says what went wrong and where."""

from edge_tier.errors import EdgeTierError


class AgentError(EdgeTierError):
    """Base for everything the agent raises on purpose."""


class StoreError(AgentError):
    """The on-device queue cannot do what was asked."""


class QueueInUse(StoreError):
    """Another process has the queue open for writing."""


class QueueFull(StoreError):
    """The byte budget is spent and the policy is to block the producer."""


class BadRecord(AgentError):
    """A producer sent a record that cannot be queued (shape, dtype, metadata)."""


class RecordTooLarge(StoreError):
    """A record that no upload frame can carry (the agent's or the cloud's frame limit)."""


class DiskFull(StoreError):
    """The filesystem has no room even after evicting by policy and giving up the reserve
    (what is left is in flight to the cloud): try again once receipts have freed some."""
