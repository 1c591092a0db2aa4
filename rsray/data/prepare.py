"""The prepare stage: annotation records -> validated, resized images + tokens -> Parquet shards.

Ray Data does the per-image work (read, decode, validate, resize, re-encode, tokenize) in
parallel tasks and writes one folder of Parquet files per split, locally or on S3. The driver
only reads annotations, builds the vocabulary and writes `manifest.json` last, so a manifest
means a complete output; `rsray.data.output` decides which files at the output are rsray's and
replaces only those. Nothing is dropped silently: every record is either written or listed
in the manifest with its reason, and `read == written + rejected` is checked before returning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from rsray import storage
from rsray.config import Config
from rsray.data import output
from rsray.data.formats import Record, check_record, read_records
from rsray.data.images import MAX_PIXELS, ImageRejected, process_image
from rsray.data.manifest import (
    MANIFEST_FILE,
    REJECTED_FILE,
    SPLITS,
    fingerprint_settings,
    scene_counts,
)
from rsray.data.shards import (
    FOLDER,
    SHARD_COMPRESSION,  # noqa: F401  (the prepare benchmark's name for it)
    PrepareResult,
    files_intact,
    rows_per_task,
    shard_schema,
    write_shards,
)
from rsray.data.text import Vocabulary, build_vocabulary, load_tokenizer
from rsray.locks import HeldElsewhere, HolderLock
from rsray.ray_errors import errors_name
from rsray.runtime import configure_data_context, ensure_ray

log = logging.getLogger("rsray.prepare")


class TooManyRejections(RuntimeError):
    """More records were rejected than `prepare.max_reject_fraction` allows (output is written)."""


# ----------------------------------------------------------------------------- per-batch work


class ImageBatchProcessor:
    """One batch of records in, shard rows and rejections out; the same code with or without Ray."""

    def __init__(
        self,
        size: int,
        encoding: str,
        quality: int,
        vocab: dict,
        tokenizer: str | None,
        s3_endpoint: str | None,
        max_pixels: int = MAX_PIXELS,
    ):
        self.size, self.encoding, self.quality, self.max_pixels = size, encoding, quality, max_pixels
        self.vocab = Vocabulary.from_dict(vocab)
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer else None
        self.s3_endpoint = s3_endpoint
        self.schema = shard_schema(self.tokenizer is not None)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> tuple[pa.Table, list[dict]]:
        out: dict[str, list] = {name: [] for name in self.schema.names}
        rejected = []
        for row in batch.to_pylist():
            image, reason = self._image(row["path"])
            if reason is not None:
                rejected.append(
                    {"image_id": row["image_id"], "split": row["split"], "path": row["path"], "reason": reason}
                )
                continue
            out["image_id"].append(row["image_id"])
            out["split"].append(row["split"])
            out["scene"].append(row["scene"])
            out["source_path"].append(row["path"])
            out["captions"].append(row["captions"])
            out["caption_tokens"].append([self.vocab.encode(c) for c in row["captions"]])
            out["image"].append(image)
            out["image_format"].append(self.encoding)
            if self.tokenizer is not None:
                out["caption_input_ids"].append(self.tokenizer(row["captions"])["input_ids"])
        return pa.Table.from_pydict(out, schema=self.schema), rejected

    def _image(self, path: str) -> tuple[bytes, str | None]:
        try:
            data = storage.read_bytes(storage.resolve(path, self.s3_endpoint))
        except FileNotFoundError:
            return b"", f"image file not found: {path}"
        except OSError as exc:
            return b"", f"cannot read image file {path}: {exc}"
        try:
            return process_image(data, self.size, self.encoding, self.quality, self.max_pixels), None
        except ImageRejected as exc:
            return b"", str(exc)


@functools.lru_cache(maxsize=4)
def _processor_for(settings: str) -> ImageBatchProcessor:
    """One processor per worker process and settings: the vocabulary and tokenizer load once."""
    return ImageBatchProcessor(**json.loads(settings))


def _process_batch(batch: pa.Table, settings: str, ledger) -> pa.Table:
    """Ray Data task body: process a batch; rejections (rare) go to the ledger, not the shards."""
    import ray

    processor = _processor_for(settings)
    table, rejected = processor(batch)
    table = table.append_column(FOLDER, table["split"])
    first_batch_here = ledger not in _REPORTED_TO
    if rejected or first_batch_here:
        ray.get(ledger.record.remote(processor.worker, rejected))
        _REPORTED_TO.append(ledger)
    return table


_REPORTED_TO: list = []  # ledgers this process has already introduced itself to


class BatchLedger:
    """A Ray actor that hears from the batches: rejections, and which processes did the work.

    Rejections leave the data stream here, so shards hold only good rows and nothing is lost."""

    def __init__(self):
        self.rejected, self.workers = [], set()

    def record(self, worker: str, rejected: list[dict]) -> None:
        self.rejected += rejected
        self.workers.add(worker)

    def summary(self) -> tuple[list[dict], list[str]]:
        return self.rejected, sorted(self.workers)


# ----------------------------------------------------------------------------- the stage


def prepare(cfg: Config, force: bool = False) -> PrepareResult:
    """Run the prepare stage for `cfg.data` into `cfg.prepare.output`; idempotent unless `force`."""

    corpus = cfg.data.format == "webdataset"  # a streamed corpus: rsray.data.corpus
    if not corpus:
        check_input_paths(cfg)
    elif cfg.data.tokenizer:
        fetch_tokenizer(cfg)
    ensure_ray()
    configure_data_context()
    started = time.perf_counter()
    out = storage.resolve(cfg.prepare.output, cfg.prepare.s3_endpoint)
    lock = HolderLock(out.join(output.LOCK_FILE), "rsray-prepare-heartbeat")
    try:
        lock.__enter__()  # one prepare per output at a time: two would delete each other's shards
    except HeldElsewhere as held:
        raise cfg.error(
            "prepare.output",
            f"{out.uri} is being written by another prepare ({held.who()}); wait for it to end or choose "
            "another prepare.output",
        ) from None
    try:
        if corpus:
            from rsray.data.corpus import prepare_corpus

            return _checked(cfg, out, prepare_corpus(cfg, out, force, started))
        return _prepare_into(cfg, out, force, started)
    finally:
        lock.__exit__(None, None, None)


def _prepare_into(cfg: Config, out: storage.Location, force: bool, started: float) -> PrepareResult:
    """The stage itself, while this command holds `out`'s prepare lock."""
    import ray

    data_cfg, prep = cfg.data, cfg.prepare
    ledger = ray.remote(num_cpus=0)(BatchLedger).remote()  # its process starts while we read
    try:
        records = read_records(data_cfg, prep.s3_endpoint)
        if not records:
            raise cfg.error("data.root", f"no records found in {data_cfg.root}")
        accepted, rejected = _check_captions(records, data_cfg.captions_per_image, prep.max_caption_chars)
        try:
            state = output.inspect_output(out)
        except output.NotAnRsrayOutput as exc:
            raise cfg.error("prepare.output", str(exc)) from None
        previous = state.previous
        with ThreadPoolExecutor(max_workers=1) as background:
            fingerprint = background.submit(input_fingerprint, cfg, records, accepted)  # stats every image: overlap it
            if (
                not force
                and previous
                and previous.get("input_fingerprint") == fingerprint.result()
                and files_intact(out, previous)
            ):
                log.info("%s is up to date (same input and config); nothing to do", out.uri)
                return PrepareResult(previous, out.uri, skipped=True, seconds=time.perf_counter() - started)

            vocab = build_vocabulary(
                accepted, tuple(data_cfg.vocab_splits), data_cfg.vocab_min_count, data_cfg.stopwords
            )
            log.info(
                "read %d records (%d rejected by caption checks); vocabulary: %d entries",
                len(records),
                len(rejected),
                len(vocab),
            )
            staging = output.begin(out, state)  # rsray's earlier files go; nobody else's
            settings = json.dumps(
                dict(
                    size=prep.image_size,
                    encoding=prep.image_encoding,
                    quality=prep.jpeg_quality,
                    vocab=vocab.to_dict(),
                    tokenizer=data_cfg.tokenizer,
                    s3_endpoint=prep.s3_endpoint,
                    max_pixels=prep.max_image_pixels,
                )
            )
            with errors_name(staging.uri):  # pyarrow's write errors do not name the file
                _process_and_write([record_row(r) for r in accepted], staging, settings, ledger, prep)
            image_rejections, workers = ray.get(ledger.summary.remote())
            rejected = rejected + image_rejections
            manifest = output.complete(
                out, cfg, len(records), scene_counts(records), rejected, vocab, fingerprint.result()
            )
    finally:
        ray.kill(ledger)

    result = PrepareResult(manifest, out.uri, skipped=False, seconds=time.perf_counter() - started, workers=workers)
    return _checked(cfg, out, result)


def _checked(cfg: Config, out: storage.Location, result: PrepareResult) -> PrepareResult:
    """Say what a prepare wrote; raise TooManyRejections above `prepare.max_reject_fraction`."""
    if result.skipped:
        return result
    counts = result.manifest["counts"]
    processes = f"; images processed by {len(result.workers)} Ray worker processes" if result.workers else ""
    log.info("wrote %d images to %s (%d rejected%s)", counts["written"], out.uri, counts["rejected"], processes)
    fraction = counts["rejected"] / max(1, counts["read"])
    if fraction > cfg.prepare.max_reject_fraction:
        raise TooManyRejections(
            f"{counts['rejected']} of {counts['read']} records rejected ({fraction:.1%}), above "
            f"prepare.max_reject_fraction={cfg.prepare.max_reject_fraction}; reasons in "
            f"{out.join(MANIFEST_FILE).uri} (by reason) and {out.join(REJECTED_FILE).uri} (every record)"
        )
    return result


def _process_and_write(items: list[dict], out: storage.Location, settings: str, ledger, prep) -> None:
    """All splits in one Ray Data job: parallel map tasks, each writing its rows to <out>/<split>/
    (`out` is the staging folder: Ray Data's overwrite mode empties it first).

    Blocks never mix splits (one input dataset per split, then a union), so each map task writes
    one file of at most `rows_per_file` rows into its split's folder. The folder comes from a
    copy of the split column used as a directory partition; the `split` column stays in the file."""
    import ray

    per_task = rows_per_task(len(items), prep)
    parts = []
    for split in SPLITS:
        table = pa.Table.from_pylist([item for item in items if item["split"] == split], schema=RECORD_SCHEMA)
        if table.num_rows:
            parts.append(ray.data.from_arrow([table.slice(i, per_task) for i in range(0, table.num_rows, per_task)]))
    dataset = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    rows = dataset.map_batches(
        _process_batch,
        fn_kwargs=dict(settings=settings, ledger=ledger),
        batch_format="pyarrow",
        batch_size=min(32, per_task),
        concurrency=prep.parallelism,
    )
    write_shards(rows, out, prep)


def prepare_in_process(cfg: Config, batch_size: int = 32) -> tuple[dict[str, pa.Table], Vocabulary]:
    """The stage's per-batch work in this process, without Ray or files: shard tables per split.

    For the prepare benchmark's baseline and for single-process tests; rejected records are
    simply left out here (the Ray stage is the one that reports them)."""
    records = read_records(cfg.data)
    accepted, _ = _check_captions(records, cfg.data.captions_per_image, cfg.prepare.max_caption_chars)
    vocab = build_vocabulary(accepted, tuple(cfg.data.vocab_splits), cfg.data.vocab_min_count, cfg.data.stopwords)
    process = ImageBatchProcessor(
        cfg.prepare.image_size,
        cfg.prepare.image_encoding,
        cfg.prepare.jpeg_quality,
        vocab.to_dict(),
        cfg.data.tokenizer,
        cfg.prepare.s3_endpoint,
        cfg.prepare.max_image_pixels,
    )
    rows = pa.Table.from_pylist([record_row(r) for r in accepted], schema=RECORD_SCHEMA)
    table = pa.concat_tables([process(rows.slice(i, batch_size))[0] for i in range(0, rows.num_rows, batch_size)])
    return {split: table.filter(pc.equal(table["split"], split)) for split in SPLITS}, vocab


def check_input_paths(cfg: Config) -> None:
    """Refuse a missing dataset folder before starting anything, naming the key and its file."""
    root = Path(cfg.data.root)
    if not storage.is_s3(cfg.data.root) and not root.is_dir():  # on S3 a missing file is named when read
        raise cfg.error("data.root", f"folder {root} does not exist")
    images = Path(cfg.data.images) if Path(cfg.data.images).is_absolute() else root / cfg.data.images
    if not storage.is_s3(cfg.data.root) and not storage.is_s3(cfg.data.images) and not images.is_dir():
        raise cfg.error("data.images", f"folder {images} does not exist")
    if cfg.data.tokenizer:
        fetch_tokenizer(cfg)


def fetch_tokenizer(cfg: Config) -> None:
    """A Hub name is fetched here, once; the map tasks read the cache."""
    from rsray.weights import WeightsError, resolve

    try:
        resolve(cfg.data.tokenizer, fetch=True)
    except WeightsError as exc:
        raise cfg.error("data.tokenizer", str(exc)) from None


def _file_infos(fs: Any, paths: list[str]) -> list[Any]:
    """Size and modification time of each path: locally a stat each; on S3 from listings of the
    folders that hold them (a request per thousand objects, not one per image), as FileInfo."""
    import pyarrow.fs as pafs

    if not isinstance(fs, pafs.S3FileSystem):
        return fs.get_file_info(paths)
    listed: dict[str, Any] = {}
    for folder in sorted({path.rsplit("/", 1)[0] for path in paths}):
        for info in fs.get_file_info(pafs.FileSelector(folder, recursive=False, allow_not_found=True)):
            listed[info.path] = info
    return [listed.get(path, pafs.FileInfo(path, pafs.FileType.NotFound)) for path in paths]


def _check_captions(
    records: list[Record], per_image: int, max_caption_chars: int | None = None
) -> tuple[list[Record], list[dict]]:
    """Split records into usable ones and rejections (bad captions, duplicate image ids)."""
    accepted, rejected, seen = [], [], set()
    for record in records:
        reason = check_record(record, per_image, max_caption_chars)
        if reason is None and record.image_id in seen:
            reason = f"duplicate image_id {record.image_id!r}"
        if reason is None:
            accepted.append(record)
            seen.add(record.image_id)
        else:
            rejected.append(
                {
                    "image_id": _printable(record.image_id),
                    "split": record.split,
                    "path": _printable(record.path),
                    "reason": reason,
                }
            )
    return accepted, rejected


def _printable(text: str) -> str:
    """Manifest text must be valid UTF-8 even when the input was not."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


RECORD_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("split", pa.string()),
        ("scene", pa.string()),
        ("captions", pa.list_(pa.string())),
    ]
)


def record_row(record: Record) -> dict:
    return {
        "image_id": record.image_id,
        "path": record.path,
        "split": record.split,
        "scene": record.scene,
        "captions": list(record.captions),
    }


def input_fingerprint(cfg: Config, records: list[Record], accepted: list[Record]) -> str:
    """Hash of everything the output depends on: config, records, and each accepted image file's
    size+mtime (rejected records' paths are never touched: they may point outside the dataset)."""
    digest = hashlib.sha256(fingerprint_settings(cfg))
    for r in records:
        digest.update(repr((r.image_id, r.path, r.split, r.scene, r.captions)).encode("utf-8", "surrogateescape"))
    by_fs: dict[int, tuple] = {}
    for r in accepted:
        loc = storage.resolve(r.path, cfg.prepare.s3_endpoint)
        by_fs.setdefault(id(type(loc.fs)), (loc.fs, []))[1].append(loc.path)
    for fs, paths in by_fs.values():
        for info in _file_infos(fs, paths):
            digest.update(f"{info.path}:{info.size}:{info.mtime_ns}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()
