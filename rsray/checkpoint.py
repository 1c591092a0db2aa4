"""The layout of an rsray checkpoint folder, written and read here: what training writes
(`write_checkpoint`), later stages start from and evaluation loads. It sits below models, training
and evaluation so that each reads the same files without importing the others.

A checkpoint folder (local or s3://) holds `state.pt`, loaded with `weights_only=True` (tensors
and plain data only, never arbitrary pickles): model, optimizer, scheduler, epoch, RNG state and
history; and `config.yaml`, the resolved config it was trained with.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
import yaml

from rsray import storage

STATE_FILE, CONFIG_FILE = "state.pt", "config.yaml"
# A checkpoint's parent is its run's folder (`train.storage_path/train.run_name`), beside Ray Train's
# record of the checkpoints it registered and, while a driver runs it, the run lock
# (`rsray.train.run_folder.RunLock`, written with `rsray.locks`).
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
RUN_LOCK_FILE = "rsray-run.json"


class UnreadableCheckpoint(ValueError):
    """A `state.pt` that is refused (it holds more than tensors and plain data) or is not a
    checkpoint at all (truncated, another format); the message is one line naming it."""


def load_state(source: str | Path | bytes, where: str = "", mmap: bool = False) -> dict[str, Any]:
    """A `state.pt` (path or its bytes) on the CPU, with `weights_only=True`. `where` names it in
    errors (defaults to the path). `mmap` (a path only): tensors stay in the file's pages until
    touched, so what a caller never reads (the optimizer's moments, when it only scores) costs no
    memory."""
    import pickle
    import struct

    where = where or str(source if not isinstance(source, bytes) else STATE_FILE)
    try:
        if isinstance(source, bytes):
            return torch.load(io.BytesIO(source), map_location="cpu", weights_only=True)
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise UnreadableCheckpoint(
            f"{where}: refused for safety: it holds Python objects other than tensors and plain data, "
            "which loading would run as code; rsray loads only what `rsray train` writes"
        ) from None
    except (RuntimeError, EOFError, ValueError, struct.error) as exc:
        reason = " ".join(str(exc).split()).split(". ")[0][:120]
        raise UnreadableCheckpoint(
            f"{where}: not a readable checkpoint (truncated or not a state.pt: {reason})"
        ) from None


def read_checkpoint(uri: str, s3_endpoint: str | None = None, context: str = "") -> tuple[dict[str, Any], dict]:
    """(state.pt, config.yaml as plain data) of the checkpoint folder `uri`, local or s3://.
    A missing file is a FileNotFoundError naming it; `context` (e.g. the config key that named the
    folder, "model.clip_checkpoint: ") starts the message."""
    source = storage.resolve(uri, s3_endpoint)
    for name in (STATE_FILE, CONFIG_FILE):
        if not storage.exists(source.join(name)):
            raise FileNotFoundError(
                f"{context}{source.join(name).uri}: not found (is {uri} an rsray checkpoint folder?)"
            )
    where = f"{context}{source.join(STATE_FILE).uri}"
    if isinstance(source.fs, pafs.LocalFileSystem):
        state = load_state(Path(source.join(STATE_FILE).path), where=where, mmap=True)
    else:  # downloaded to a file first: held as bytes and as tensors, it took twice its size in memory
        with tempfile.TemporaryDirectory(prefix="rsray-state-") as folder:
            local = Path(folder) / STATE_FILE
            storage.reading(
                lambda: storage.download(source.join(STATE_FILE), local), f"read {source.join(STATE_FILE).uri}"
            )
            state = load_state(local, where=where, mmap=True)  # the mapping outlives the file's name
    config = yaml.safe_load(storage.read_bytes(source.join(CONFIG_FILE)))
    return state, config


def load_checkpoint_state(checkpoint) -> dict[str, Any]:
    """The `state.pt` dict of a `ray.train.Checkpoint` (tensors on CPU)."""
    with checkpoint.as_directory() as folder:
        return load_state(Path(folder) / STATE_FILE)


def write_checkpoint(
    folder: str | Path,
    config: Any,
    *,
    model: dict[str, Any],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    epoch: int,
    rng: dict[str, Any],
    lr_scale: float,
    metrics: dict[str, float],
    history: list[dict[str, float]],
    mlflow_run_id: str | None,
    grad_scaler: dict[str, Any] | None = None,
    initial_weights: dict[str, str] | None = None,
) -> None:
    """Write a training checkpoint into `folder`: `state.pt` (state dicts, the epoch just trained, the
    RNG states, the elastic lr factor already in the optimizer's and scheduler's state, this epoch's
    metrics, the run's history, the MLflow run it was logged to, where `rsray evaluate` adds its
    numbers, under fp16 the GradScaler's state, and what each initial-weights key resolved to:
    name, Hub revision, sha256) and `config.yaml` (the resolved `rsray.config.Config`)."""
    folder = Path(folder)
    state = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "epoch": epoch,
        "rng": rng,
        "lr_scale": lr_scale,
        "metrics": dict(metrics),
        "history": history,
        "mlflow_run_id": mlflow_run_id,
    }
    if initial_weights:
        state["initial_weights"] = dict(initial_weights)
    if grad_scaler is not None:  # fp16's loss scale, so a resumed run does not search for it again
        state["grad_scaler"] = grad_scaler
    torch.save(state, folder / STATE_FILE)
    config.save(folder / CONFIG_FILE)
