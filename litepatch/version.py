"""The litepatch version: recorded in recipes (``measured.litepatch_version``) and re-exported by the package."""

__version__ = "0.1.0"
