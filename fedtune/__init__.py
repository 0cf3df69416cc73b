"""fedtune: federated and multitask personalization of Vision Transformers on edge devices."""

__version__ = "0.1.0"
