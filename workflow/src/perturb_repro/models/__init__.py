"""Models behind one interface (``fit`` / ``sample``), looked up by the config's ``type``; each type described
once by its :class:`ModelSpec` in ``MODEL_SPECS``."""

from .base import MODEL_REGISTRY, MODEL_SPECS, ModelContext, ModelSpec, PerturbationModel, get_model, spec_of

__all__ = ["MODEL_REGISTRY", "MODEL_SPECS", "ModelContext", "ModelSpec", "PerturbationModel", "get_model", "spec_of"]
