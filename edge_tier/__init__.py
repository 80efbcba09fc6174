"""edge-tier's shared floor: what the device and the cloud must agree on, and nothing else.

It imports no deployable (``edge_agent``, ``cloud_ingest``, ``edge_provision``) and nothing
of the cloud side (NATS, onnxruntime): the agent imports it whole. Import the module you
need; the package exports nothing itself, so importing one part does not load the rest.

- ``edge_tier.wire``: the upload frame, receipts, statuses and results (docs/wire-format.md)
- ``edge_tier.control``: the signed control document and the device's answer to it
- ``edge_tier.topics``: every MQTT topic, NATS subject, header, stream, bucket, consumer
- ``edge_tier.model``: model manifests, feature stages, the shipped models
- ``edge_tier.errors``: ``EdgeTierError`` and the errors every part shares
- ``edge_tier.config``, ``logs``, ``cli``, ``tasks``: how every service loads its config,
  logs, runs until a signal and keeps its loops
- ``edge_tier.mqtt``: the one bridge between paho-mqtt's threads and asyncio
- ``edge_tier.http``, ``ratelimit``, ``tokens``: what the HTTP services share
"""

__all__: list[str] = []
