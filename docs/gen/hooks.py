"""mkdocs hook: adds the generated reference pages to the build (nothing is written into docs/).

- reference/config.md        every config key (docs/gen/config_ref.py)
- reference/model-config.md  every key of each registered model's config (docs/gen/config_ref.py)
- reference/cli.md           every stage's --help (docs/gen/cli_ref.py)

They are made from the code of the checkout being built (rsray must be importable: `make docs`
uses the project's .venv), so they cannot drift from it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_ref
import config_ref

log = logging.getLogger("mkdocs.hooks.rsray")


def on_files(files: Files, config) -> Files:
    config_ref.UNCOMMENTED.clear()
    pages = {
        "reference/config.md": config_ref.config_page(),
        "reference/model-config.md": config_ref.model_config_page(),
        "reference/cli.md": cli_ref.cli_page(),
    }
    for uri, content in pages.items():
        files.append(File.generated(config, uri, content=content))
    if config_ref.UNCOMMENTED:  # info, not a warning: the reference is complete either way
        keys = sorted(set(config_ref.UNCOMMENTED))
        log.info(
            "config reference: %d keys have no comment of their own in the source (mkdocs -v lists them)", len(keys)
        )
        log.debug("keys without a comment: %s", ", ".join(keys))
    return files
