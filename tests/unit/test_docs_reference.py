"""The generated reference pages (docs/gen/config_ref.py, run by `make docs`) name every key of
every config section and of every registered model's config class."""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "docs" / "gen"))

import config_ref

from rsray.config import Config


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if f.name == "origins" or f.name.startswith("_"):
            continue
        hint = hints[f.name]
        keys += leaf_keys(hint, f"{prefix}{f.name}.") if dataclasses.is_dataclass(hint) else [prefix + f.name]
    return keys


def test_the_config_reference_names_every_key_of_every_section():
    page = config_ref.config_page()
    keys = [key for key in leaf_keys(Config) if key != "model"]  # `model:` is typed per model: the next test
    missing = [key for key in keys if f"| `{key}` |" not in page]  # one table row per key
    assert missing == []


def test_the_model_reference_names_every_key_of_every_model():
    page = config_ref.model_config_page()
    models = config_ref.registered()
    assert len(models) == 8
    missing = [(name, key) for name, _, cfg in models for key in leaf_keys(cfg) if f"| `{key}` |" not in page]
    assert missing == []
