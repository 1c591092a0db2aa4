"""The prepared output's manifest: the one contract between `rsray prepare` and every later stage.

Prepare builds it (`build_manifest`) and writes it last (`write_manifest`), so a manifest means a
complete output; training, evaluation, the loader, verification and `rsray data inspect` read it
with `read_manifest`. Its shape is written down here as TypedDicts (what a reader may rely on);
on disk it stays plain JSON, so a manifest from before these types still reads.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, TypedDict

import pyarrow as pa
import pyarrow.parquet as pq

from rsray import storage

MANIFEST_FILE = "manifest.json"
IN_PROGRESS_FILE = "prepare-in-progress.json"  # the marker an unfinished prepare leaves
PRODUCER = "rsray prepare"
# 2: the refused records moved from the manifest into REJECTED_FILE, summarised by reason ("rejections")
# 3: the splits list no image ids (the shards hold them; a manifest's size no longer grows per image)
SCHEMA_VERSION = 3
REJECTED_FILE = "rejected.parquet"  # every refused record with its reason, next to the manifest
EXAMPLES_PER_REASON = 3
SPLITS = ("train", "val", "test")
_LEGACY_KEYS = {"schema_version", "input_fingerprint", "counts", "splits"}  # manifests before `producer`


class ShardFile(TypedDict):
    path: str  # relative to the output, e.g. "train/part-00000-0.parquet"
    rows: int
    sha256: str
    bytes: int


class SplitInfo(TypedDict):
    images: int
    captions: int
    files: list[ShardFile]


class Counts(TypedDict):
    read: int
    written: int
    rejected: int


class ReasonCount(TypedDict):
    reason: str  # the reason with its names and numbers left out, e.g. "image file not found"
    count: int
    examples: list[str]  # image ids, the first few


class Rejections(TypedDict):
    count: int
    by_reason: list[ReasonCount]  # most frequent first
    file: ShardFile  # REJECTED_FILE: {image_id, split, path, reason} per record, by (split, image_id)


class Manifest(TypedDict, total=False):
    producer: str
    schema_version: int
    dataset: str
    format: str
    input_fingerprint: str
    counts: Counts
    splits: dict[str, SplitInfo]
    validation: dict[str, Any]  # mode, folds, fold, seed
    image_size: int
    image_encoding: str
    scenes: dict[str, int]  # scene -> images, sorted by name
    vocab: dict[str, Any]  # `rsray.data.text.Vocabulary.to_dict()`: words, min_count, stopwords, ...
    vocab_splits: list[str]
    tokenizer: str | None
    rejections: Rejections  # the refused records: counts by reason; every one in REJECTED_FILE
    config: dict[str, Any]  # the prepare's config, credentials redacted


class LostRecords(RuntimeError):
    """A manifest whose counts do not add up: prepare would have lost a record silently."""


def scene_counts(records: list) -> dict[str, int]:
    """Images per scene label among `records` (those without a scene are not counted)."""
    scenes: dict[str, int] = {}
    for r in records:
        if r.scene is not None:
            scenes[r.scene] = scenes.get(r.scene, 0) + 1
    return scenes


def build_manifest(
    cfg: Any,
    read: int,
    scenes: dict[str, int],
    rejected: list[dict],
    rejected_file: ShardFile,
    split_info: dict[str, SplitInfo],
    vocab: Any,
    fingerprint: str,
) -> Manifest:
    """The manifest of one prepare: `read` records (images per scene among them: `scenes`),
    `rejected` with reasons (as written to `rejected_file`), the splits' shards as written
    (`split_info`), the vocabulary and the input fingerprint. Raises LostRecords unless every
    record read is written or rejected (the no-silent-loss invariant)."""
    written = sum(info["images"] for info in split_info.values())
    manifest: Manifest = {
        "producer": PRODUCER,
        "schema_version": SCHEMA_VERSION,
        "dataset": cfg.data.name,
        "format": cfg.data.format,
        "input_fingerprint": fingerprint,
        "counts": {"read": read, "written": written, "rejected": len(rejected)},
        "splits": split_info,
        "validation": {
            "mode": cfg.data.validation.mode,
            "folds": cfg.data.validation.folds,
            "fold": cfg.data.validation.fold,
            "seed": cfg.data.validation.seed,
        },
        "image_size": cfg.prepare.image_size,
        "image_encoding": cfg.prepare.image_encoding,
        "scenes": dict(sorted(scenes.items())),
        "vocab": vocab.to_dict(),
        "vocab_splits": list(cfg.data.vocab_splits),
        "tokenizer": cfg.data.tokenizer,
        "rejections": {"count": len(rejected), "by_reason": reasons_summary(rejected), "file": rejected_file},
        "config": cfg.public_dict(),
    }
    if read != written + len(rejected):
        raise LostRecords(f"prepare lost records: read {read}, written {written}, rejected {len(rejected)}")
    return manifest


REJECTION_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("split", pa.string()), ("path", pa.string()), ("reason", pa.string())]
)


def write_rejections(out: storage.Location, rejected: list[dict]) -> ShardFile:
    """Every refused record, sorted by (split, image_id), as REJECTED_FILE in `out`; its file entry."""
    rows = sorted(rejected, key=lambda r: (r["split"], r["image_id"]))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=REJECTION_SCHEMA), sink)
    data = sink.getvalue().to_pybytes()
    storage.write_bytes(out.join(REJECTED_FILE), data)
    return {"path": REJECTED_FILE, "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def read_rejections(uri: str, s3_endpoint: str | None = None) -> list[dict[str, Any]]:
    """The refused records of the prepared output `uri`: {image_id, split, path, reason} each."""
    data = storage.read_bytes(storage.resolve(uri, s3_endpoint).join(REJECTED_FILE))
    return pq.read_table(pa.BufferReader(data)).to_pylist()


def reasons_summary(rejected: list[dict]) -> list[ReasonCount]:
    """The refusals counted by reason (names, paths and numbers left out of the reason), most
    frequent first, with the first few image ids of each."""
    groups: dict[str, ReasonCount] = {}
    for record in sorted(rejected, key=lambda r: (r["split"], r["image_id"])):
        kind = reason_kind(record["reason"])
        group = groups.setdefault(kind, {"reason": kind, "count": 0, "examples": []})
        group["count"] += 1
        if len(group["examples"]) < EXAMPLES_PER_REASON:
            group["examples"].append(record["image_id"])
    return sorted(groups.values(), key=lambda g: (-g["count"], g["reason"]))


def reason_kind(reason: str) -> str:
    """A reason without what is particular to one record: "image file not found: /d/a.jpg" ->
    "image file not found"; "expected 5 captions, got 4" -> "expected N captions, got N";
    "duplicate image_id 'a' (kept from s.tar)" -> "duplicate image_id '…'"."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", reason.split(": ", 1)[0])
    text = re.sub(r"\s*\([^)]*\)", "", text)  # "(kept from shard-7.tar)"
    return re.sub(r"\d+(?:[,.]\d+)*", "N", text).strip()


def fingerprint_settings(cfg: Any) -> bytes:
    """The start of every input fingerprint: the schema version and the `data` and `prepare`
    settings an output depends on (not where it is written or how many tasks wrote it)."""
    settings = {k: v for k, v in cfg.to_dict().items() if k in ("data", "prepare")}
    settings["prepare"] = {k: v for k, v in settings["prepare"].items() if k not in ("output", "parallelism")}
    if settings["data"].get("stopwords") == "drop":  # the recipe before the switch: earlier outputs stay current
        del settings["data"]["stopwords"]
    return json.dumps([SCHEMA_VERSION, settings], sort_keys=True).encode()


def write_manifest(out: storage.Location, manifest: Manifest) -> None:
    storage.write_bytes(out.join(MANIFEST_FILE), json.dumps(manifest, indent=1).encode())


def read_manifest(uri: str, s3_endpoint: str | None = None) -> Manifest:
    """The manifest of the prepared output `uri` (local or s3://); a missing one is one line saying
    whether a prepare started there and did not finish."""
    root = storage.resolve(uri, s3_endpoint)
    loc = root.join(MANIFEST_FILE)
    if not storage.exists(loc):
        if storage.exists(root.join(IN_PROGRESS_FILE)):
            raise FileNotFoundError(
                f"{loc.uri}: no manifest: a prepare started here and did not finish "
                f"({IN_PROGRESS_FILE} is there); run `rsray prepare` with the same config again to complete it"
            )
        raise FileNotFoundError(f"{loc.uri}: no manifest (has the prepare stage finished here?)")
    return json.loads(storage.read_bytes(loc))


def is_rsray_manifest(data: object) -> bool:
    """Whether `data` is a manifest rsray wrote (by its producer, or the schema of older ones)."""
    if not isinstance(data, dict):
        return False
    return data.get("producer") == PRODUCER or (
        "producer" not in data and _LEGACY_KEYS <= set(data) and data.get("schema_version") == 1
    )


def vocab_size(manifest: Manifest) -> int:
    """Entries of the word vocabulary, <pad> (0) and <unk> (1) included: the embedding table size."""
    return len(manifest["vocab"]["words"])


def train_pairs(manifest: Manifest) -> int:
    """(image, caption) pairs of the train split: what one epoch trains on."""
    return manifest["splits"]["train"]["captions"]
