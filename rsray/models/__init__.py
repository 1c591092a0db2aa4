"""Retrieval models: the contract (base), the registry, and one module per model (imported to register)."""
from rsray.models.base import Batch, RetrievalModel
from rsray.models.registry import build_model, model_config, register_model, registered_models
from rsray.models import clip, swan, vsepp  # noqa: F401  (registers the models)
from rsray.models import dove  # noqa: F401  (registers DOVE)
from rsray.models import priorclip, priorclip_open, scene_prior  # noqa: F401  (PriorCLIP, its stage 2, its prior)

__all__ = ["Batch", "RetrievalModel", "build_model", "model_config", "register_model", "registered_models"]
