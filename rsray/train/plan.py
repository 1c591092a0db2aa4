"""The run plan: everything about a training run that is settled before an MLflow run or any worker
starts, checked once and handed to what needs it (`rsray.train.run`, the worker loop, the MLflow
records), so nothing reads the manifest again or re-types the model section.

`preflight(cfg)` refuses, each in one line: a bad model section, initial weights that cannot be
resolved or fail their sha256 (`rsray.weights`; Hub names are fetched here), a local folder the other nodes
cannot see, prepared data that differs from its manifest (`rsray.data.verify`), data prepared with
another caption rule than the config names, a resume that would ignore a changed setting
(`run_folder`), and workers the cluster cannot place.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from rsray import storage
from rsray.config import Config
from rsray.data.manifest import Manifest, read_manifest

log = logging.getLogger("rsray.train")


@dataclass
class RunPlan:
    """A checked training run. `cfg` is the resolved copy the workers get (local paths absolute,
    model keys that follow from the data filled in, a run name); `model` is its model section typed
    as the model's config class; `manifest` is `cfg.train.data`'s, read once."""

    cfg: Config
    model: Any
    manifest: Manifest
    start_epoch: int = 0  # the epoch training starts at: after the checkpoint a rerun resumes from
    weights: dict[str, str] = field(default_factory=dict)  # what each initial-weights key resolved to

    @property
    def run_name(self) -> str:
        return self.cfg.train.run_name


def preflight(cfg: Config) -> RunPlan:
    """Check `cfg` as the module docstring says and return its plan."""
    from rsray.data.verify import verify_prepared
    from rsray.models import model_config
    from rsray.train.run_folder import check_resume, resume_point
    from rsray.train.scaling import check_every_node_sees_the_paths, wait_for_resources

    model_config(cfg)
    weights = fetch_initial_weights(cfg)  # Hub names into this machine's cache, digests checked
    check_every_node_sees_the_paths(cfg)
    manifest = read_manifest(cfg.train.data, cfg.prepare.s3_endpoint)
    verify_prepared(cfg.train.data, cfg.prepare.s3_endpoint, tuple(cfg.train.verify_checksums), manifest=manifest)
    stopwords = check_caption_rule(cfg, manifest)
    cfg = absolute_paths(copy.deepcopy(cfg))
    cfg.data.stopwords = stopwords  # the checkpoint's config says how its captions were tokenized
    fill_model_from_data(cfg, manifest)
    if not cfg.train.run_name:
        cfg.train.run_name = default_run_name(cfg)
    point = resume_point(cfg)
    if point is not None:
        check_resume(cfg, point)
    wait_for_resources(cfg)
    start = point.epoch + 1 if point is not None else 0
    return RunPlan(cfg=cfg, model=model_config(cfg), manifest=manifest, start_epoch=start, weights=weights)


def fetch_initial_weights(cfg: Config) -> dict[str, str]:
    """Every initial-weights value of the model section resolved on the driver (`rsray.weights`),
    before any worker starts: Hub names are downloaded once into this machine's cache (workers read
    it), a wrong sha256 is refused naming the key. {key: what it resolved to (name, revision, digest)}."""
    from rsray.weights import WeightsError, fetch_all

    try:
        found = fetch_all(cfg.model)
    except WeightsError as exc:
        raise cfg.error(exc.key or "model", str(exc)) from None
    for key, resolved in found.items():
        log.info("initial weights %s: %s (%s)", key, resolved.record(), resolved.path)
    return {key: resolved.record() for key, resolved in found.items()}


def default_run_name(cfg: Config) -> str:
    """<model>-<dataset>-<time>, the dataset named by the prepared data's manifest (the data the run
    reads), or `data.name` when the manifest cannot be read yet (preflight then says why)."""
    try:
        dataset = read_manifest(cfg.train.data).get("dataset") or cfg.data.name
    except Exception:  # preflight reports the real problem in one line
        dataset = cfg.data.name
    return f"{cfg.model.get('name', 'model')}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def absolute_paths(cfg: Config) -> Config:
    """Local paths a worker reads, made absolute (workers need not share the driver's cwd)."""

    def absolute(value):
        if (
            isinstance(value, str)
            and value
            and not storage.is_s3(value)
            and not os.path.isabs(value)
            and os.path.exists(value)
        ):
            return os.path.abspath(value)
        return value

    uri = cfg.tracking.uri  # sqlite:///relative.db is relative to the cwd: pin it to the driver's
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        cfg.tracking.uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    cfg.train.data = absolute(cfg.train.data)
    cfg.data.tokenizer = absolute(cfg.data.tokenizer)

    def absolute_model_paths(section: dict) -> None:  # nested too (priorclip_open's clip: {checkpoint})
        for key, value in list(section.items()):
            if isinstance(value, dict):
                absolute_model_paths(value)
            elif key.endswith(("_path", "_checkpoint")) or key in ("checkpoint", "path"):
                section[key] = absolute(value)

    absolute_model_paths(cfg.model)
    return cfg


def check_caption_rule(cfg: Config, manifest: Manifest) -> str:
    """The stop-word rule `train.data` was prepared with. A config that names `data.stopwords` (a
    release preset does) must train on data prepared that way: the shards hold the token ids, so
    a mismatch would silently train the other recipe."""
    prepared = manifest["vocab"].get("stopwords", "drop")
    if cfg.source_of("data.stopwords") != "defaults" and prepared != cfg.data.stopwords:
        raise cfg.error(
            "data.stopwords",
            f"is {cfg.data.stopwords}, but {cfg.train.data} was prepared with stopwords {prepared}: "
            f"prepare it again with data.stopwords={cfg.data.stopwords}",
        )
    return prepared


def fill_model_from_data(cfg: Config, manifest: Manifest) -> None:
    """Model keys that follow from the prepared data, filled in before any worker starts so that
    every worker and the checkpoint's config.yaml agree. A model config may define
    `check_data(manifest)` (yields (key, problem), like `check`) and `from_data(manifest)` (returns
    {key: value}); the scene prior sizes its classifier to the manifest's scenes this way."""
    from rsray.models import model_config

    typed = model_config(cfg)
    if not hasattr(typed, "from_data"):
        return
    for key, problem in getattr(typed, "check_data", lambda _: ())(manifest):
        raise cfg.error(f"model.{key}", problem)
    cfg.model.update(typed.from_data(manifest))
    model_config(cfg)
