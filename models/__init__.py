"""Models, their manifests, and the scripts and data generator that build them."""
