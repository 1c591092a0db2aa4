"""Model registry: each model file registers its class with its config dataclass; one factory builds any.

    @register_model("swan", SwanConfig)
    class Swan(RetrievalModel): ...

    model = build_model(load_config("model/swan-tiny"), vocab=vocab.itos)

A model class is constructed as `cls(config, vocab_size=..., vocab=...)`, where `config` is its
own dataclass typed from the `model:` section (everything but `name`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

from rsray.config import Config
from rsray.models.base import RetrievalModel

_MODELS: dict[str, tuple[type[RetrievalModel], type]] = {}


def register_model(name: str, config_cls: type) -> Callable[[type[RetrievalModel]], type[RetrievalModel]]:
    """Class decorator: make `name` buildable from a config whose `model.name` is `name`."""

    def decorate(cls: type[RetrievalModel]) -> type[RetrievalModel]:
        if name in _MODELS and _MODELS[name][0] is not cls:
            raise ValueError(f"model name {name!r} is already registered by {_MODELS[name][0].__qualname__}")
        _MODELS[name] = (cls, config_cls)
        cls.model_name = name
        cls.config_cls = config_cls
        return cls

    return decorate


def registered_models() -> list[str]:
    """Names a config's `model.name` may take, sorted."""
    return sorted(_MODELS)


def _lookup(cfg: Config) -> tuple[type[RetrievalModel], type]:
    name = cfg.model.get("name")
    if name is None:
        raise cfg.error("model.name", f"missing: choose one of {', '.join(registered_models())}")
    if name not in _MODELS:
        raise cfg.error("model.name", f"unknown model {name!r}; known: {', '.join(registered_models())}")
    return _MODELS[name]


def model_class(cfg: Config) -> type[RetrievalModel]:
    """The class `model.name` names (its class attributes, e.g. `two_tower`, without building it)."""
    return _lookup(cfg)[0]


def model_config(cfg: Config) -> Any:
    """The `model:` section typed as the named model's config dataclass (checked, one-line errors)."""
    _, config_cls = _lookup(cfg)
    return cfg.typed_section("model", config_cls)


def build_model(cfg: Config, vocab_size: int | None = None, vocab: Sequence[str] | None = None) -> RetrievalModel:
    """The model `cfg.model["name"]` with its typed config.

    `vocab` (the word list, id -> word) is needed only when the config names a word-vectors file
    (`glove_path`); it also gives `vocab_size` when that is not passed.
    """
    cls, config_cls = _lookup(cfg)
    config = cfg.typed_section("model", config_cls)
    if vocab is not None:
        vocab = list(vocab)
        if vocab_size is not None and vocab_size != len(vocab):
            raise ValueError(f"vocab_size {vocab_size} disagrees with the {len(vocab)}-word vocabulary")
        vocab_size = len(vocab)
    if getattr(config, "glove_path", None) and vocab is None:
        raise cfg.error("model.glove_path", "loading word vectors needs the vocabulary: pass vocab= to build_model")
    return cls(config, vocab_size=vocab_size, vocab=vocab)


def initial_weight_keys(name: str) -> tuple[str, ...]:
    """The model keys of model `name` that name files read only for its initial weights (pretrained
    backbone, word vectors, an earlier stage), as its config class declares in `initial_weights`."""
    if name not in _MODELS:
        return ()
    return tuple(getattr(_MODELS[name][1], "initial_weights", ()))


def build_for_loading(cfg: Config, vocab_size: int) -> RetrievalModel:
    """The model of a saved run, to load its saved state into. The files that only gave the run its
    initial weights (`initial_weight_keys`: pretrained backbone, word vectors, the scene prior)
    are not read, so a checkpoint evaluates on a machine without them (a cluster's /mnt/weights on
    a laptop). Files that define the architecture (a CLIP or BERT folder, PriorCLIP open's stage 1)
    are still read."""
    cfg = copy.deepcopy(cfg)
    for key in initial_weight_keys(model_class(cfg).model_name):
        if cfg.model.get(key):
            cfg.model[key] = None
    return build_model(cfg, vocab_size=vocab_size)
