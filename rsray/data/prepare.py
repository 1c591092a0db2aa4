"""The prepare stage: annotation records -> validated, resized images + tokens -> Parquet shards.

Ray Data does the per-image work (read, decode, validate, resize, re-encode, tokenize) in
parallel tasks and writes one folder of Parquet files per split, locally or on S3. The driver
only reads annotations, builds the vocabulary and writes `manifest.json` last, so a manifest
means a complete output. Nothing is dropped silently: every record is either written or listed
in the manifest with its reason, and `read == written + rejected` is checked before returning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rsray import storage
from rsray.config import Config
from rsray.data.formats import Record, check_record, read_records
from rsray.data.images import ImageRejected, process_image
from rsray.data.text import Vocabulary, build_vocabulary, load_tokenizer

log = logging.getLogger("rsray.prepare")

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


class TooManyRejections(RuntimeError):
    """More records were rejected than `prepare.max_reject_fraction` allows (output is written)."""


def shard_schema(with_input_ids: bool) -> pa.Schema:
    """Columns of every shard; `caption_input_ids` only when a BERT-family tokenizer is set."""
    fields = [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("scene", pa.string()),
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        pa.field("caption_tokens", pa.list_(pa.list_(pa.int32())), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("image_format", pa.string(), nullable=False),
    ]
    if with_input_ids:
        fields.append(pa.field("caption_input_ids", pa.list_(pa.list_(pa.int32()))))
    return pa.schema(fields)


@dataclass
class PrepareResult:
    manifest: dict[str, Any]
    output: str
    skipped: bool  # True when the output was already up to date
    seconds: float
    workers: list[str] = field(default_factory=list)  # host:pid of the processes that did the work


# ----------------------------------------------------------------------------- per-batch work

class ImageBatchProcessor:
    """Ray Data UDF: one batch of records in, one Arrow table of shard rows (or reasons) out."""

    def __init__(self, size: int, encoding: str, quality: int, vocab: dict, tokenizer: str | None,
                 s3_endpoint: str | None):
        self.size, self.encoding, self.quality = size, encoding, quality
        self.vocab = Vocabulary.from_dict(vocab)
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer else None
        self.s3_endpoint = s3_endpoint
        self.schema = (shard_schema(self.tokenizer is not None)
                       .append(pa.field("reject_reason", pa.string()))
                       .append(pa.field("worker", pa.string())))  # which process did it (dropped)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out: dict[str, list] = {name: [] for name in self.schema.names}
        for row in rows:
            image, reason = self._image(row["path"])
            out["image_id"].append(row["image_id"])
            out["split"].append(row["split"])
            out["scene"].append(row["scene"])
            out["source_path"].append(row["path"])
            out["captions"].append(row["captions"])
            out["caption_tokens"].append([self.vocab.encode(c) for c in row["captions"]])
            out["image"].append(image)
            out["image_format"].append(self.encoding)
            out["reject_reason"].append(reason)
            out["worker"].append(self.worker)
            if self.tokenizer is not None:
                out["caption_input_ids"].append(self.tokenizer(row["captions"])["input_ids"])
        return pa.Table.from_pydict(out, schema=self.schema)

    def _image(self, path: str) -> tuple[bytes, str | None]:
        try:
            data = storage.read_bytes(storage.resolve(path, self.s3_endpoint))
        except FileNotFoundError:
            return b"", f"image file not found: {path}"
        except OSError as exc:
            return b"", f"cannot read image file {path}: {exc}"
        try:
            return process_image(data, self.size, self.encoding, self.quality), None
        except ImageRejected as exc:
            return b"", str(exc)


# ----------------------------------------------------------------------------- the stage

def prepare(cfg: Config, force: bool = False) -> PrepareResult:
    """Run the prepare stage for `cfg.data` into `cfg.prepare.output`; idempotent unless `force`."""
    import ray
    from ray.data.expressions import col

    from rsray.runtime import configure_data_context, ensure_ray

    ensure_ray()
    configure_data_context()
    started = time.perf_counter()
    data_cfg, prep = cfg.data, cfg.prepare
    out = storage.resolve(prep.output, prep.s3_endpoint)

    records = read_records(data_cfg)
    if not records:
        raise cfg.error("data.root", f"no records found in {data_cfg.root}")
    accepted, rejected = _check_captions(records, data_cfg.captions_per_image)
    fingerprint = _fingerprint(cfg, records)

    if not force:
        previous = _existing_manifest(out)
        if previous and previous.get("input_fingerprint") == fingerprint and _files_intact(out, previous):
            log.info("%s is up to date (same input and config); nothing to do", out.uri)
            return PrepareResult(previous, out.uri, skipped=True, seconds=time.perf_counter() - started)

    vocab = build_vocabulary(accepted, splits=tuple(data_cfg.vocab_splits), min_count=data_cfg.vocab_min_count)
    log.info("read %d records (%d rejected by caption checks); vocabulary: %d entries",
             len(records), len(rejected), len(vocab))

    for split in SPLITS:  # replace a previous output cleanly: no stale shards survive
        storage.remove_tree(out.join(split))
    storage.remove_tree(out.join(MANIFEST))

    workers = prep.parallelism or _cluster_cpus()
    n_blocks = max(1, min(len(accepted), workers * 4))
    items = [_record_row(r) for r in accepted]
    processed = (
        ray.data.from_items(items, override_num_blocks=n_blocks)
        .map_batches(
            ImageBatchProcessor,
            fn_constructor_kwargs=dict(size=prep.image_size, encoding=prep.image_encoding,
                                       quality=prep.jpeg_quality, vocab=vocab.to_dict(),
                                       tokenizer=data_cfg.tokenizer, s3_endpoint=prep.s3_endpoint),
            batch_format="pyarrow", batch_size=max(1, min(32, len(items) // n_blocks)),
            compute=ray.data.ActorPoolStrategy(size=workers),
        )
        .materialize()
    )
    outcome = processed.select_columns(["image_id", "split", "source_path", "reject_reason", "worker"]).take_all()
    workers = sorted({row["worker"] for row in outcome})  # now: the processes that did the work
    rejected += [{"image_id": row["image_id"], "split": row["split"], "path": row["source_path"],
                  "reason": row["reject_reason"]} for row in outcome if row["reject_reason"] is not None]

    good = processed.filter(expr=col("reject_reason").is_null()).drop_columns(["reject_reason", "worker"])
    split_info = {}
    for split in SPLITS:
        rows = good.filter(expr=col("split") == split)
        split_info[split] = _write_split(rows, out.join(split), split, prep.rows_per_file)

    manifest = _manifest(cfg, records, rejected, split_info, vocab, fingerprint)
    storage.write_bytes(out.join(MANIFEST), json.dumps(manifest, indent=1).encode())
    counts = manifest["counts"]
    log.info("wrote %d images to %s (%d rejected; images processed by %d Ray workers)",
             counts["written"], out.uri, counts["rejected"], len(workers))
    result = PrepareResult(manifest, out.uri, skipped=False, seconds=time.perf_counter() - started,
                           workers=workers)
    fraction = counts["rejected"] / max(1, counts["read"])
    if fraction > prep.max_reject_fraction:
        raise TooManyRejections(
            f"{counts['rejected']} of {counts['read']} records rejected ({fraction:.1%}), above "
            f"prepare.max_reject_fraction={prep.max_reject_fraction}; reasons in {out.join(MANIFEST).uri}")
    return result


def _check_captions(records: list[Record], per_image: int) -> tuple[list[Record], list[dict]]:
    """Split records into usable ones and rejections (bad captions, duplicate image ids)."""
    accepted, rejected, seen = [], [], set()
    for record in records:
        reason = check_record(record, per_image)
        if reason is None and record.image_id in seen:
            reason = f"duplicate image_id {record.image_id!r}"
        if reason is None:
            accepted.append(record)
            seen.add(record.image_id)
        else:
            rejected.append({"image_id": _printable(record.image_id), "split": record.split,
                             "path": _printable(record.path), "reason": reason})
    return accepted, rejected


def _printable(text: str) -> str:
    """Manifest text must be valid UTF-8 even when the input was not."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _record_row(record: Record) -> dict:
    return {"image_id": record.image_id, "path": record.path, "split": record.split,
            "scene": record.scene, "captions": list(record.captions)}


def _write_split(rows, loc: storage.Location, split: str, rows_per_file: int) -> dict:
    """Write one split as deterministic files part-00000.parquet, ... and describe them."""
    from ray.data import SaveMode
    from ray.data.datasource import FilenameProvider

    class _SplitFiles(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}.parquet"

    n_rows = rows.count()
    if n_rows == 0:
        return {"images": 0, "captions": 0, "files": []}
    n_files = math.ceil(n_rows / rows_per_file)
    rows.repartition(n_files).write_parquet(
        loc.uri if storage.is_s3(loc.uri) else loc.path, filesystem=loc.fs,
        filename_provider=_SplitFiles(), mode=SaveMode.OVERWRITE)  # names are fixed, so overwrite
    files = []
    for path in storage.list_files(loc, ".parquet"):
        meta = pq.read_metadata(path, filesystem=loc.fs)
        files.append({"path": f"{split}/{path.rsplit('/', 1)[1]}", "rows": meta.num_rows,
                      "sha256": storage.sha256_of(loc.fs, path),
                      "bytes": loc.fs.get_file_info(path).size})
    table = pq.read_table(loc.path, filesystem=loc.fs, columns=["image_id", "captions"])
    return {
        "images": table.num_rows,
        "captions": int(pc.sum(pc.list_value_length(table["captions"])).as_py() or 0),
        "image_ids": sorted(table["image_id"].to_pylist()),
        "files": files,
    }


def _manifest(cfg: Config, records, rejected, split_info, vocab: Vocabulary, fingerprint: str) -> dict:
    written = sum(info["images"] for info in split_info.values())
    scenes: dict[str, int] = {}
    for r in records:
        if r.scene is not None:
            scenes[r.scene] = scenes.get(r.scene, 0) + 1
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "dataset": cfg.data.name,
        "format": cfg.data.format,
        "input_fingerprint": fingerprint,
        "counts": {"read": len(records), "written": written, "rejected": len(rejected)},
        "splits": split_info,
        "validation": {"mode": cfg.data.validation.mode, "folds": cfg.data.validation.folds,
                       "fold": cfg.data.validation.fold, "seed": cfg.data.validation.seed},
        "image_size": cfg.prepare.image_size,
        "image_encoding": cfg.prepare.image_encoding,
        "scenes": dict(sorted(scenes.items())),
        "vocab": vocab.to_dict(),
        "vocab_splits": list(cfg.data.vocab_splits),
        "tokenizer": cfg.data.tokenizer,
        "rejected": sorted(rejected, key=lambda r: (r["split"], r["image_id"])),
        "config": cfg.to_dict(),
    }
    if manifest["counts"]["read"] != written + len(rejected):  # the no-silent-loss invariant
        raise RuntimeError(f"prepare lost records: read {len(records)}, written {written}, "
                           f"rejected {len(rejected)}")
    return manifest


def _fingerprint(cfg: Config, records: list[Record]) -> str:
    """Hash of everything the output depends on: config, records, and each image file's size+mtime."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in cfg.to_dict().items() if k in ("data", "prepare")}
    settings["prepare"] = {k: v for k, v in settings["prepare"].items() if k not in ("output", "parallelism")}
    digest.update(json.dumps([SCHEMA_VERSION, settings], sort_keys=True).encode())
    for r in records:
        digest.update(repr((r.image_id, r.path, r.split, r.scene, r.captions)).encode("utf-8", "surrogateescape"))
    by_fs: dict[int, tuple] = {}
    for r in records:
        loc = storage.resolve(r.path, cfg.prepare.s3_endpoint)
        by_fs.setdefault(id(type(loc.fs)), (loc.fs, []))[1].append(loc.path)
    for fs, paths in by_fs.values():
        for info in fs.get_file_info(paths):
            digest.update(f"{info.path}:{info.size}:{info.mtime_ns}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _existing_manifest(out: storage.Location) -> dict | None:
    loc = out.join(MANIFEST)
    if not storage.exists(loc):
        return None
    try:
        return json.loads(storage.read_bytes(loc))
    except (ValueError, OSError):
        return None


def _files_intact(out: storage.Location, manifest: dict) -> bool:
    expected = {f["path"]: f["bytes"] for info in manifest.get("splits", {}).values() for f in info["files"]}
    for rel, size in expected.items():
        info = out.fs.get_file_info(out.join(*rel.split("/")).path)
        if info.size != size:
            return False
    return True


def _cluster_cpus() -> int:
    import ray
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def read_manifest(uri: str, s3_endpoint: str | None = None) -> dict:
    """Load a prepared output's manifest (used by inspect, training and tests)."""
    loc = storage.resolve(uri, s3_endpoint).join(MANIFEST)
    if not storage.exists(loc):
        raise FileNotFoundError(f"{loc.uri}: no manifest (has the prepare stage finished here?)")
    return json.loads(storage.read_bytes(loc))
