"""The built-in demo: a small trained Wan-like video DiT, its procedural data and sampler."""
