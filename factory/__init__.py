"""factory: a reasoning-data factory for self-improving language models."""

__version__ = "0.1.0"
