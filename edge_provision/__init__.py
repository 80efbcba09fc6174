"""The fleet's identities and credentials (``edge-provision``).

``edge_provision.fleet.Fleet``: the CA, the model-signing key and the registry of devices,
applications and tokens, and the broker configs and ACLs made from it;
``edge_provision.control``: signed config changes and model updates for devices.
"""

__all__: list[str] = []
