"""Checkpoints a model starts from that an earlier training stage wrote (PriorCLIP's scene prior,
PriorCLIP open's CLIP fine-tune): the value that asks `rsray train` to train that stage first, the
config check of such a key, and reading the folder (local or s3://, through `rsray.checkpoint`).
A staged model declares its stages on its config class (`earlier_stages`, `initial_weights`);
`rsray.train.stages` trains them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rsray import storage
from rsray.checkpoint import read_checkpoint

TRAIN_FIRST = "train"  # a stage checkpoint key with this value: `rsray train` trains that stage first


def check_stage_checkpoint(key: str, value: str | None) -> Iterator[tuple[str, str]]:
    """A stage checkpoint is null, "train", an s3:// folder, or an existing local folder."""
    if value in (None, TRAIN_FIRST) or storage.is_s3(value):
        return
    if not Path(value).is_dir():
        yield key, f"no such checkpoint folder: {value} (or `train` to train that stage first)"


def read_stage_checkpoint(uri: str, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.pt loaded with weights_only=True, config.yaml as plain data) of an rsray checkpoint
    folder, local or s3://, that a later stage starts from; `key` names the config key in errors."""
    if uri == TRAIN_FIRST:
        raise ValueError(
            f"model.{key}: `train` means: train that stage first, which `rsray train` does "
            "before building this model (it then names the stage's best checkpoint here)"
        )
    state, config = read_checkpoint(uri, context=f"model.{key}: ")
    return state, config
