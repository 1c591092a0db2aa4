"""Retrieval models: the contract (base), the registry, and one module per model (imported to register)."""
from rsray.models.base import Batch, RetrievalModel
from rsray.models.registry import build_model, model_config, register_model, registered_models
from rsray.models import swan, vsepp  # noqa: F401  (registers the models)

__all__ = ["Batch", "RetrievalModel", "build_model", "model_config", "register_model", "registered_models"]
