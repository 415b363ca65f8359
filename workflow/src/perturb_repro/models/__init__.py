"""Models behind one interface (``fit`` / ``sample``), looked up by the config's ``type``."""

from .base import MODEL_REGISTRY, ModelContext, PerturbationModel, get_model

__all__ = ["MODEL_REGISTRY", "ModelContext", "PerturbationModel", "get_model"]
