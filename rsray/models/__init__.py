"""Retrieval models: the contract (base), the registry, and one module per model (imported to register)."""

from rsray.models import (  # noqa: F401  (imported to register each model)
    clip,
    cmpagl,
    dove,
    priorclip,
    priorclip_open,
    scene_prior,
    swan,
    vsepp,
)
from rsray.models.base import Batch, RetrievalModel
from rsray.models.registry import build_model, model_config, register_model, registered_models

__all__ = ["Batch", "RetrievalModel", "build_model", "model_config", "register_model", "registered_models"]
