"""The cloud services of edge-tier (``cloud-ingest``): ingest, tier-two workers, the result API.

Each service is imported from its own module (``cloud_ingest.ingest.Ingest``,
``cloud_ingest.worker.Worker``, ``cloud_ingest.api.ResultApi``; ``cloud_ingest.cli`` loads
only the one it runs), so the package itself exports nothing and importing its config
does not import NATS.
"""

__all__: list[str] = []
