"""Typed configuration: YAML files plus `key=value` overrides, refused early with one clear line.

A config file may start with `defaults: [other.yaml, ...]` (paths relative to that file); they are
merged first and the file's own keys win, then the command-line overrides win over everything.
Every key remembers where it was set, so an error names both the key and the file (or the
command line) a user has to fix.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rsray.config_tree import (
    COMMAND_LINE,
    CONF_DIR,
    ConfigError,
    build_section,
    merge_config_file,
    merge_into,
    nest,
    parse_override,
    record_leaves,
)

__all__ = ["COMMAND_LINE", "CONF_DIR", "Config", "ConfigError", "config_from_dict", "load_config"]

# ----------------------------------------------------------------------------- sections


@dataclass
class ValidationConfig:
    """Where validation images come from: a fixed split in the annotations, or k folds of train."""

    mode: str = "folds"  # "folds": fold `fold` of `folds` drawn from train with `seed`; "fixed"
    folds: int = 5  # 5 folds = the protocol's 80/20 train/validation
    fold: int = 0
    seed: int = 0

    def check(self) -> Iterator[tuple[str, str]]:
        if self.mode not in ("folds", "fixed"):
            yield "mode", f"must be 'folds' or 'fixed', got {self.mode!r}"
        if self.folds < 2:
            yield "folds", f"must be at least 2, got {self.folds}"
        if not 0 <= self.fold < self.folds:
            yield "fold", f"must be in [0, {self.folds}), got {self.fold}"


@dataclass
class DataConfig:
    """A dataset as the user has it on disk: annotation format, where files are, scene rule."""

    name: str = "rsray_sample"
    format: str = "karpathy"  # karpathy | precomp | pir | table | webdataset
    root: str = "data/sample"  # folder (or s3:// prefix: webdataset) holding the annotations or shards
    annotations: str = "dataset_rsray_sample.json"  # file in root (karpathy, table); pir: train file
    eval_annotations: str = ""  # pir: the eval/test JSON list, in root
    images: str = "images"  # image folder, relative to root unless absolute
    scenes: str = "filename"  # filename | index (UCM-style numbering) | column | none
    scene_names: list[str] = field(default_factory=list)  # index rule: classes, alphabetical order
    images_per_scene: int = 100  # index rule: consecutive files per class
    captions_per_image: int = 5
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # splits whose captions build the word vocabulary; [train, val, test] = the reference vocabularies
    vocab_splits: list[str] = field(default_factory=lambda: ["train"])
    vocab_min_count: int = 5
    # a stop word in a caption: drop (the protocol's recipe) | unk (kept as <unk>: SWAN's release)
    stopwords: str = "drop"
    tokenizer: str | None = None  # a BERT-family tokenizer: folder, alias or Hub name (rsray.weights)
    shards: str = "*.tar"  # webdataset: the tar files under root (a glob; ** reaches into folders)
    caption_field: str = "captions"  # webdataset: a sample's .json field with its caption(s), when no .txt
    scene_field: str = "scene"  # webdataset: the .json field the "column" scene rule reads

    def check(self) -> Iterator[tuple[str, str]]:
        if self.format not in ("karpathy", "precomp", "pir", "table", "webdataset"):
            yield "format", f"must be karpathy, precomp, pir, table or webdataset, got {self.format!r}"
        if self.format == "webdataset" and self.validation.mode != "folds":
            yield "validation.mode", "a webdataset corpus has no val split of its own: use folds"
        if self.format == "webdataset" and not self.shards:
            yield "shards", "name the tar files under data.root, e.g. '*.tar'"
        if self.scenes not in ("filename", "index", "column", "none"):
            yield "scenes", f"must be filename, index, column or none, got {self.scenes!r}"
        if self.scenes == "index" and not self.scene_names:
            yield "scene_names", "the 'index' scene rule needs the class names in order"
        if self.images_per_scene < 1:
            yield "images_per_scene", f"must be positive, got {self.images_per_scene}"
        if self.captions_per_image < 1:
            yield "captions_per_image", f"must be positive, got {self.captions_per_image}"
        if self.vocab_min_count < 1:
            yield "vocab_min_count", f"must be positive, got {self.vocab_min_count}"
        if self.stopwords not in ("drop", "unk"):
            yield "stopwords", f"must be drop or unk, got {self.stopwords!r}"
        unknown = set(self.vocab_splits) - {"train", "val", "test"}
        if unknown or not self.vocab_splits:
            yield "vocab_splits", f"must be a non-empty subset of train, val, test, got {self.vocab_splits}"


@dataclass
class PrepareConfig:
    """How the prepare stage writes shards: size, encoding, destination, tolerance for bad input."""

    output: str = "data/prepared/rsray_sample"  # local folder or s3://bucket/prefix
    image_size: int = 128  # images are resized (shorter side, then centre crop) once, here
    image_encoding: str = "jpeg"  # jpeg | png: re-encoded once at the prepared size
    jpeg_quality: int = 95
    rows_per_file: int = 1000  # at most this many rows per Parquet shard file
    max_reject_fraction: float = 0.01  # above this the command exits non-zero
    s3_endpoint: str | None = None  # else AWS_ENDPOINT_URL_S3 / AWS defaults
    parallelism: int | None = None  # Ray Data tasks for decoding; None = one per CPU
    # Larger images are rejected from their header (never decoded); at most Pillow's own bomb limit.
    max_image_pixels: int = 64_000_000
    # Longer captions are rejected (a record, with the reason): the longest real RSICD, RSITMD, UCM or
    # Sydney caption is a few hundred characters, and a runaway one would become that many tokens.
    max_caption_chars: int = 2000

    def check(self) -> Iterator[tuple[str, str]]:
        if self.image_size < 16:
            yield "image_size", f"must be at least 16, got {self.image_size}"
        if self.image_encoding not in ("jpeg", "png"):
            yield "image_encoding", f"must be jpeg or png, got {self.image_encoding!r}"
        if not 1 <= self.jpeg_quality <= 100:
            yield "jpeg_quality", f"must be in [1, 100], got {self.jpeg_quality}"
        if self.rows_per_file < 1:
            yield "rows_per_file", f"must be positive, got {self.rows_per_file}"
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            yield "max_reject_fraction", f"must be in [0, 1], got {self.max_reject_fraction}"
        if self.parallelism is not None and self.parallelism < 1:
            yield "parallelism", f"must be positive, got {self.parallelism}"
        if self.max_caption_chars < 1:
            yield "max_caption_chars", f"must be positive, got {self.max_caption_chars}"
        from PIL import Image

        if not 1 <= self.max_image_pixels <= (Image.MAX_IMAGE_PIXELS or 0):
            yield (
                "max_image_pixels",
                f"must be in [1, {Image.MAX_IMAGE_PIXELS}] (Pillow's bomb limit), got {self.max_image_pixels}",
            )


@dataclass
class SampleConfig:
    """The embedded sample dataset: drawn procedurally, so the demo needs no download."""

    images: int = 1000
    image_size: int = 128
    seed: int = 0

    def check(self) -> Iterator[tuple[str, str]]:
        if self.images < 10:
            yield "images", f"must be at least 10, got {self.images}"
        if self.image_size < 32:
            yield "image_size", f"must be at least 32, got {self.image_size}"


PLACEMENTS = ("pack", "spread", "strict_pack", "strict_spread")  # Ray's placement group strategies


@dataclass
class TrainConfig:
    """How a model is trained on Ray Train: workers, epochs, batches, checkpoints, fault tolerance."""

    data: str = "data/prepared/rsray_sample"  # a prepared output (folder or s3://) with manifest.json
    epochs: int = 10
    batch_size: int = 32  # per worker
    # Ray Train workers (one per GPU on a cluster), or [min, max]: an elastic run. It starts with
    # as many as the cluster holds (at least min), goes on with fewer when a node is lost instead of
    # waiting for a replacement, and grows back (up to max) when nodes return, each time resuming
    # from its last checkpoint (Ray Train's ScalingConfig(num_workers=(min, max))).
    num_workers: int | list[int] = 2
    # An elastic run's learning rate when it has fewer than max workers, whose global batch is
    # smaller: linear (the linear scaling rule, Goyal et al. 2017: lr x workers / max, so lr per
    # sample stays as configured for max workers) | constant (the configured lr whatever the batch).
    # Per-step schedules (warmup/cosine) count their steps for max workers in either case.
    elastic_lr: str = "linear"
    # How often a healthy elastic run checks whether more workers could be placed (seconds).
    elastic_resize_s: float = 60.0
    # Custom Ray resources each worker needs besides its CPUs (and GPU), e.g. {accelerator_type:A100: 0.001}
    # to land on such nodes, or a per-node slot resource to allow one worker per node. An elastic
    # run counts the workers it can start from resources alone (Ray Train ignores placement), so a
    # resource each node has once is how "one worker per node" holds there.
    worker_resources: dict[str, float] = field(default_factory=dict)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str = "runs"  # checkpoints and Ray Train results: folder or s3://
    run_name: str = ""  # default: <model>-<dataset>-<time>
    seed: int = 0
    grad_clip: float = 2.0  # 0 = off
    # BatchNorm layers share batch statistics across workers (torch's SyncBatchNorm, as SWAN's
    # release does under --distributed); GPU workers only (PyTorch syncs CUDA tensors only)
    sync_batchnorm: bool = False
    # auto: bf16 on a GPU with native bf16, fp16 with loss scaling on an older one (V100, T4), off
    # on CPU | bf16 | fp16 (with loss scaling) | off (rsray.train.precision)
    amp: str = "auto"
    max_failures: int = 2  # worker-group restarts Ray Train may make, resuming from the last checkpoint
    keep_checkpoints: int = 2  # best by validation mR are kept
    # sync: the upload to storage_path ends the epoch | async: rank 0 writes each epoch's checkpoint
    # to a local folder and Ray Train uploads it in a background thread while the next epoch trains
    # (Ray's CheckpointUploadMode; the epoch's metrics reach the driver once it is uploaded).
    # Measured: 3.77 -> 1.03 s per epoch for a 768 MiB checkpoint (docs/benchmarks.md). The
    # default stays sync until the failure-path tests (node loss, Ctrl-C, sweeps) have run with async.
    checkpoint_upload: str = "sync"
    eval_batch_size: int = 64  # images per batch when rank 0 scores the validation split
    # After training, the driver scores the best checkpoint on the test split and logs it (the
    # numbers a paper reports). false: leave that to a later `rsray evaluate` (on a GPU machine,
    # or when the gallery is large: CMPAGL's ITM stage on a CPU driver takes hours at paper size).
    evaluate_test: bool = True
    # Processes per worker that decode + augment training images (rsray.data.decode); 0 = in the
    # training process. One process manages about 420 pairs/s at 256 px: a GPU worker needs several
    # (cpus_per_worker should cover them).
    decode_workers: int = 0
    # The train split's (image, caption) pair rows made once and held in Ray's object store for the
    # whole run, or read and made again every epoch. Each epoch's read costs seconds before the first
    # batch (measured: 7-9 s per epoch on 600 images in 26 shards), so caching is what keeps Ray
    # close to a bare loop. A pair repeats its image's bytes, so the cache is about (captions per
    # image) x the shard files; auto caches when that fills at most half of the object store.
    cache_train_split: str = "auto"  # auto | always | never
    # Before any worker starts, every shard's size is checked against the manifest, and these splits'
    # sha256 too (the numbers a run reports rest on them; `rsray data verify` checks all).
    verify_checksums: list[str] = field(default_factory=lambda: ["val", "test"])
    # When the cluster cannot place num_workers x (cpus_per_worker CPU [+ 1 GPU]), wait this long for
    # an autoscaler to add nodes, then refuse in one line (Ray Train alone would retry forever).
    resource_wait_s: float = 60.0
    # How Ray Train places the workers' bundles on nodes (ScalingConfig.placement_strategy): pack
    # (Ray's default and its advice for GPU training: as few nodes as possible, so DDP's all-reduce
    # stays inside a node where it can) | spread (one per node where it can) | strict_pack | strict_spread.
    placement: str = "pack"
    # On a cluster of several nodes every node reads train.data and writes train.storage_path, so a
    # local folder is refused before any worker starts unless this confirms that every node mounts
    # the same path (NFS, a shared volume).
    shared_fs_ok: bool = False

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[-1] if self.elastic else self.num_workers

    def check(self) -> Iterator[tuple[str, str]]:
        if self.checkpoint_upload not in ("async", "sync"):
            yield "checkpoint_upload", f"must be async or sync, got {self.checkpoint_upload!r}"
        for name in ("epochs", "batch_size", "keep_checkpoints", "eval_batch_size"):
            if getattr(self, name) < 1:
                yield name, f"must be positive, got {getattr(self, name)}"
        if self.elastic and (len(self.num_workers) != 2 or not 1 <= self.num_workers[0] <= self.num_workers[1]):
            yield "num_workers", f"must be a count or [min, max] with 1 <= min <= max, got {self.num_workers}"
        elif not self.elastic and self.num_workers < 1:
            yield "num_workers", f"must be positive, got {self.num_workers}"
        if self.elastic_lr not in ("linear", "constant"):
            yield "elastic_lr", f"must be linear or constant, got {self.elastic_lr!r}"
        if any(
            key in ("CPU", "GPU") or isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0
            for key, amount in self.worker_resources.items()
        ):
            yield "worker_resources", "custom resources with positive amounts (CPU and GPU have their own keys)"
        if self.elastic_resize_s <= 0:
            yield "elastic_resize_s", f"must be positive, got {self.elastic_resize_s}"
        if self.cpus_per_worker <= 0:
            yield "cpus_per_worker", f"must be positive, got {self.cpus_per_worker}"
        if self.grad_clip < 0:
            yield "grad_clip", f"must be >= 0, got {self.grad_clip}"
        if self.sync_batchnorm and not self.use_gpu:
            yield "sync_batchnorm", "needs use_gpu (PyTorch's SyncBatchNorm syncs GPU tensors only)"
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            yield "amp", f"must be auto, bf16, fp16 or off, got {self.amp!r}"
        if self.max_failures < -1:
            yield "max_failures", f"must be >= -1 (-1: retry forever), got {self.max_failures}"
        if self.decode_workers < 0:
            yield "decode_workers", f"must be >= 0, got {self.decode_workers}"
        if self.resource_wait_s < 0:
            yield "resource_wait_s", f"must be >= 0, got {self.resource_wait_s}"
        if set(self.verify_checksums) - {"train", "val", "test"}:
            yield "verify_checksums", f"must be a subset of train, val, test, got {self.verify_checksums}"
        if self.cache_train_split not in ("auto", "always", "never"):
            yield "cache_train_split", f"must be auto, always or never, got {self.cache_train_split!r}"
        if self.placement not in PLACEMENTS:
            yield "placement", f"must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}"


LOG_CHECKPOINT = ("auto", "always", "never")


@dataclass
class TrackingConfig:
    """Where runs are recorded: MLflow tracking URI (a local SQLite file or an http:// server)."""

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "rsray"
    enabled: bool = True
    retries: int = 5  # a transient failure mid-run is retried this many times, then skipped
    system_metrics: bool = True
    # The best checkpoint as an MLflow model (a pyfunc embedding captions and images), linked to the
    # run's test metrics; with register_as, a new version of that registered model, aliased
    # register_alias (default <model>-<dataset>): `rsray evaluate models:/NAME@ALIAS`.
    log_model: bool = True
    register_as: str = ""
    register_alias: str = ""
    # The best checkpoint (weights, optimizer, RNG: what resumes) copied into the run's MLflow
    # artifacts as best_checkpoint/: always | never | auto (only when train.storage_path is a local
    # folder; a checkpoint on S3 is already durable and shared, so the run gets its URI as the tag
    # best_checkpoint instead of a second upload: 2.3 GiB per run for CMPAGL at paper size).
    log_checkpoint: str = "auto"

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.uri:
            yield "uri", "must not be empty (sqlite:///mlflow.db or http://host:port)"
        if self.log_checkpoint not in LOG_CHECKPOINT:
            yield "log_checkpoint", f"must be one of {', '.join(LOG_CHECKPOINT)}, got {self.log_checkpoint!r}"
        if self.retries < 0:
            yield "retries", f"must be >= 0, got {self.retries}"
        if self.register_alias and not re.fullmatch(r"[\w\-]+", self.register_alias):
            yield "register_alias", f"letters, digits, _ and - only, got {self.register_alias!r}"
        if re.fullmatch(r"latest|v\d+", self.register_alias or ""):
            yield "register_alias", f"{self.register_alias!r} is reserved by MLflow"


@dataclass
class StudyConfig:
    """`rsray study`: one config trained over several seeds and/or validation folds (rsray.study)."""

    name: str = ""  # the parent run and the members' run-name stem; default <model>-<dataset>-study
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    folds: int = 0  # 0: the data's own validation; k >= 2: folds 0..k-1, each prepared and trained

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.seeds:
            yield "seeds", "must list at least one seed"
        elif len(set(self.seeds)) != len(self.seeds):
            yield "seeds", f"lists a seed twice: {self.seeds}"
        if self.folds == 1 or self.folds < 0:
            yield "folds", f"must be 0 (the data's own validation) or at least 2, got {self.folds}"


@dataclass
class Config:
    """Everything one rsray command needs; sections are added as stages land."""

    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    # Typed by the model registry from `model.name` (rsray.models): each model owns its dataclass.
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def check(self) -> Iterator[tuple[str, str]]:
        return iter(())  # sections check themselves; cross-section rules go here

    def source_of(self, key: str) -> str:
        """The file (or 'command line') that set `key`, else 'defaults'."""
        return self.origins.get(key, "defaults")

    def error(self, key: str, problem: str) -> ConfigError:
        """A one-line error about `key`, naming where it was set."""
        return ConfigError(f"{self.source_of(key)}: {key}: {problem}")

    def typed_section(self, name: str, cls: type, skip: tuple[str, ...] = ("name",)):
        """Build dataclass `cls` from the free-form section `name` (e.g. a model's own config),
        with the same checks and one-line errors as the fixed sections."""
        data = {k: v for k, v in getattr(self, name).items() if k not in skip}
        return build_section(cls, data, prefix=f"{name}.", origins=self.origins)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what gets written out and logged)."""

        def plain(value):
            return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "origins"}

    def public_dict(self) -> dict[str, Any]:
        """`to_dict()` with credentials redacted (`rsray.redact`): the only form written to disk,
        MLflow or the console. The process itself keeps using the real values."""
        from rsray.redact import redact_tree

        return redact_tree(self.to_dict())

    def save(self, path: str | Path) -> None:
        """The resolved config as YAML (`load_config` reads it back), credentials redacted."""
        Path(path).write_text(yaml.safe_dump(self.public_dict(), sort_keys=False))


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read `path` (with its defaults chain), apply `key=value` overrides, type-check, validate."""
    tree: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        merge_config_file(Path(path), tree, origins)
    for item in overrides:
        key, value = parse_override(item, yaml.SafeLoader)
        merge_into(tree, nest(key, value), origins, COMMAND_LINE)
    cfg = build_section(Config, tree, prefix="", origins=origins)
    cfg.origins = origins
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "resolved config") -> Config:
    """A resolved config (`Config.to_dict()`, e.g. sent to Ray workers or read from a checkpoint)
    back as a typed, checked Config; errors name `source`."""
    origins: dict[str, str] = {}
    record_leaves(data, origins, source, "")
    cfg = build_section(Config, copy.deepcopy(data), prefix="", origins=origins)
    cfg.origins = origins
    return cfg
