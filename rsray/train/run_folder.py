"""A training run's folder (`train.storage_path/train.run_name`): who is using it, and what a rerun resumes.

Ray Train resumes a run whose folder already holds registered checkpoints, so a run name is both
an address and a promise. Two guards keep it:

- `RunLock`: a small `rsray-run.json` in the folder while a run is live (host, pid, a heartbeat
  refreshed every HEARTBEAT_S seconds, the Ray node). A second run with that name is refused in one
  line while the first one lives; a lock whose heartbeat is older than STALE_S, or whose process is
  gone (same host), or whose Ray node the cluster has declared dead (a lost machine: a sweep's
  trial restarted elsewhere must not wait STALE_S for it), or that names this very process, is
  stale and taken over. The lock is created atomically (`rsray.locks`: an exclusive create locally,
  a conditional PUT on S3), so of two runs started in the same instant exactly one trains.
- `check_resume`: the config a rerun would resume with is compared to the config of the checkpoint
  Ray Train will resume from (the latest one it registered). Resuming restores weights, optimizer,
  scheduler and RNG states, so a change to anything that shapes them (the model section, learning
  rate, batch size, workers, seed, data) would be silently ignored: it is refused instead, naming
  the key. Keys a resumed run does honour (`RESUME_MAY_CHANGE`: more epochs, logging, checkpoint
  keeping, decode processes) may change.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import yaml

from rsray import storage
from rsray.checkpoint import CONFIG_FILE, RUN_LOCK_FILE, SNAPSHOT_FILE
from rsray.config import Config, config_from_dict
from rsray.locks import HeldElsewhere, HolderLock

log = logging.getLogger("rsray.train")

LOCK_FILE = RUN_LOCK_FILE
RESUME_MAY_CHANGE = (
    "train.epochs",
    "train.max_failures",
    "train.keep_checkpoints",
    "train.checkpoint_upload",
    "train.eval_batch_size",
    "train.decode_workers",
    "train.cache_train_split",
    "train.verify_checksums",
    "train.cpus_per_worker",
    "train.resource_wait_s",
    "train.storage_path",
    "train.run_name",
    "tracking.",
    "prepare.",
    "sample.",
    "data.",  # the raw dataset's description; training reads train.data, which must not change
)


def run_folder(cfg: Config) -> storage.Location:
    """The folder Ray Train writes the run to (resolved as `build_trainer` resolves it)."""
    return storage.resolve(cfg.train.storage_path).join(cfg.train.run_name)


# ----------------------------------------------------------------------------- one live run per name


class RunLock:
    """Held while a run trains (a context manager); refuses a name a live run holds
    (`rsray.locks.HolderLock`: created atomically, heartbeat, stale holders taken over)."""

    def __init__(self, cfg: Config):
        self.cfg, self.folder = cfg, run_folder(cfg)
        self.lock = self.folder.join(LOCK_FILE)
        self._held = HolderLock(self.lock, "rsray-run-heartbeat")

    def __enter__(self) -> RunLock:
        try:
            self._held.__enter__()
        except HeldElsewhere as held:
            raise self.cfg.error(
                "train.run_name",
                f"{self.cfg.train.run_name!r} is in use by a live run ({held.who()}, {self.lock.uri}); "
                "choose another train.run_name or wait for it to end",
            ) from None
        return self

    def __exit__(self, *exc: Any) -> None:
        self._held.__exit__(*exc)


# ----------------------------------------------------------------------------- resuming


@dataclass
class ResumePoint:
    epoch: int  # the epoch the latest registered checkpoint finished; training resumes at epoch + 1
    checkpoint: storage.Location
    config: dict  # that checkpoint's config.yaml


def resume_point(cfg: Config) -> ResumePoint | None:
    """The checkpoint Ray Train will resume `cfg`'s run from, or None for a fresh run."""
    folder = run_folder(cfg)
    snapshot = folder.join(SNAPSHOT_FILE)
    if not storage.exists(snapshot):
        return None
    try:
        latest = json.loads(storage.read_bytes(snapshot)).get("latest_checkpoint_result")
        if not latest:
            return None
        checkpoint = folder.join(latest["checkpoint_dir_name"])
        config = config_from_dict(yaml.safe_load(storage.read_bytes(checkpoint.join(CONFIG_FILE)))).public_dict()
        return ResumePoint(int(latest["metrics"]["epoch"]), checkpoint, config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError) as exc:
        raise cfg.error(
            "train.run_name",
            f"{folder.uri} holds checkpoints, but where the run would resume cannot be read "
            f"({type(exc).__name__}: {exc}); choose a new train.run_name",
        ) from None


def check_resume(cfg: Config, point: ResumePoint) -> None:
    """Refuse (one line) a change resuming would ignore; otherwise say where the run resumes."""
    was, now = _flat(point.config), _flat(cfg.public_dict())
    changed = [
        key
        for key in sorted(set(was) | set(now))
        if was.get(key) != now.get(key) and not key.startswith(RESUME_MAY_CHANGE)
    ]
    if changed:
        shown = "; ".join(
            f"{key}: {was.get(key, 'unset')!r} there, {now.get(key, 'unset')!r} now" for key in changed[:3]
        )
        raise cfg.error(
            changed[0],
            f"run {cfg.train.run_name!r} would resume from epoch {point.epoch} of {point.checkpoint.uri}, "
            f"which was trained with other values ({shown}{' ...' if len(changed) > 3 else ''}); resuming restores "
            "the checkpoint's weights, optimizer and RNG and would ignore them: use a new train.run_name, or "
            "set them back",
        )
    left = (
        f"epochs {point.epoch + 1}..{cfg.train.epochs - 1} to go"
        if point.epoch + 1 < cfg.train.epochs
        else f"nothing left to train with train.epochs={cfg.train.epochs}"
    )
    log.info("resuming run %s from epoch %d (%s): %s", cfg.train.run_name, point.epoch, point.checkpoint.uri, left)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
