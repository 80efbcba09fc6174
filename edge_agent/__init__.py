"""The device daemon (``edge-agent``): raw windows in, kept features out, nothing lost.

``edge_agent.daemon.Agent`` runs the parts under one TaskGroup: the enqueue endpoint
(``endpoint``) takes records and raw windows, the prefilter (``prefilter``) keeps the
interesting windows as features, the queue (``edge_agent.store``) holds them within a byte
budget, the uplink (``uplink``) sends frames and deletes records only on the cloud's receipt,
and the control channel (``control``, ``model_store``) applies signed config changes and
model updates. ``rescue`` recovers what is readable of a damaged queue file. Each is imported
from its own module; the package exports nothing itself.
"""

__all__: list[str] = []
