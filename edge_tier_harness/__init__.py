"""The floor above the services: the demo, and what tests and benchmarks run them with.

- ``brokers``: real mosquitto and nats-server processes, started, killed and restarted
- ``services``: edge-tier's own services as child processes, and their status and metrics
- ``testkit``: the configs, waits and CPU meters tests and benchmarks share (one copy)
- ``demo``: ``make demo``, the whole tiered pipeline on embedded defaults

Installed with the wheel (the demo runs from it), imported by no service.
"""

__all__: list[str] = []
