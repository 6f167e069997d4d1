"""adapterhub-local: train, version, merge and publish LoRA adapters."""

__version__ = "0.1.0"
