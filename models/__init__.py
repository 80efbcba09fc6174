"""The shipped models: their files, manifest and report.

Installed as the data package ``edge_tier.model.shipped`` (see pyproject.toml), which is how
the agent and the workers find them (``edge_tier.model.manifest.DEFAULT_MANIFEST``). The
scripts that rebuild them are in ``models/build/`` and are not part of the wheel.
"""
