"""The model runtime both tiers share: the manifest, the feature stages and the signal generator.

The shipped model files themselves are the data package ``edge_tier.model.shipped`` (the
repository's ``models/``).
"""
