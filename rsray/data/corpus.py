"""The prepare stage for a streamed corpus (`data.format: webdataset`), in Ray Data passes.

The record formats are read into a list of records in the driver; a corpus of millions of pairs
is not. Every pass here is a Ray Data job on the cluster's nodes, reading the shards where they
are (a local folder or s3://), and the driver holds only what is small whatever the corpus size:

1. candidates: each sample checked and its image resized (`rsray.data.webdataset`), written with
   its reason when refused to `<output>/_candidates/`;
2. duplicates: a key in more than one shard (among samples whose captions passed) is kept from the
   first shard by name, as the record readers keep a key's first record; the others are refused;
3. summary: each block's samples read, word counts (the kept samples of `data.vocab_splits`),
   samples per scene and refusals, made in its task and summed by the driver as they stream in
   (the vocabulary by the record formats' rule: `Vocabulary.from_counts`);
4. shards: the kept samples tokenized and written by split, as every format's are (`write_shards`);
   the refusals, with their reasons, go to `rejected.parquet`, counted by reason in the manifest.

The input fingerprint comes from one listing of the shards (path, size, modification time), not a
request per image; an unchanged corpus prepares again as nothing to do.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from rsray import storage
from rsray.config import Config
from rsray.data import output
from rsray.data.manifest import fingerprint_settings
from rsray.data.shards import (
    FOLDER,
    PrepareResult,
    cluster_cpus,
    files_intact,
    overwrite,
    read_parquet_files,
    shard_names,
    shard_schema,
    write_shards,
)
from rsray.data.text import Vocabulary, load_tokenizer, word_counts
from rsray.data.webdataset import (
    CANDIDATE_SCHEMA,
    CAPTIONS,
    CandidateRows,
    candidate_settings,
    listing_lines,
    shard_files,
)

log = logging.getLogger("rsray.prepare")

BATCH = 32  # samples per map batch in the first pass: a few MB of raw images


def prepare_corpus(cfg: Config, out: storage.Location, force: bool, started: float) -> PrepareResult:
    """Prepare `cfg.data` (a webdataset corpus) into `out`, while this command holds its lock."""

    root, shards = shard_files(cfg.data, cfg.prepare.s3_endpoint)
    if not shards:
        raise cfg.error("data.shards", f"no file under {root.uri} matches {cfg.data.shards!r}")
    try:
        state = output.inspect_output(out)
    except output.NotAnRsrayOutput as exc:
        raise cfg.error("prepare.output", str(exc)) from None
    fingerprint = corpus_fingerprint(cfg, listing_lines(root, shards))
    previous = state.previous
    if not force and previous and previous.get("input_fingerprint") == fingerprint and files_intact(out, previous):
        log.info("%s is up to date (same corpus and config); nothing to do", out.uri)
        return PrepareResult(previous, out.uri, skipped=True, seconds=time.perf_counter() - started)
    log.info("%d shard(s) under %s", len(shards), root.uri)
    staging = output.begin(out, state)
    candidates_at = out.join(output.CANDIDATES)
    settings = json.dumps(candidate_settings(cfg, root))
    with _tar_problems_named(cfg):
        _check_samples(cfg, root, shards, settings, candidates_at)
    files = storage.list_files(candidates_at, ".parquet")
    candidates = read_parquet_files(files, candidates_at.fs, schema=CANDIDATE_SCHEMA)
    partitions = max(1, min(len(files), cluster_cpus()))  # Ray Data's default, 200, is for large joins
    kept_from = duplicated_keys(candidates, partitions)
    summary = summarize(candidates, kept_from, cfg)
    min_count = cfg.data.vocab_min_count
    vocab = Vocabulary.from_counts(summary.words, min_count=min_count, stopwords=cfg.data.stopwords)
    log.info(
        "checked %d samples (%d refused, %d key(s) in more than one shard); vocabulary: %d entries",
        summary.read,
        len(summary.rejected),
        len(kept_from),
        len(vocab),
    )
    shard_settings = json.dumps(
        dict(
            vocab=vocab.to_dict(),
            tokenizer=cfg.data.tokenizer,
            encoding=cfg.prepare.image_encoding,
            kept_from=kept_from,
        )
    )
    rows = candidates.map_batches(
        _shard_batch, fn_kwargs=dict(settings=shard_settings), batch_format="pyarrow", batch_size=None
    )
    write_shards(rows, staging, cfg.prepare)
    manifest = output.complete(out, cfg, summary.read, dict(summary.scenes), summary.rejected, vocab, fingerprint)
    return PrepareResult(manifest, out.uri, skipped=False, seconds=time.perf_counter() - started)


def _check_samples(cfg: Config, root: storage.Location, shards: list, settings: str, into: storage.Location) -> None:
    """The first pass: every sample of every shard checked and resized in the task that reads its
    shard, written with its reason to `into`. One read task per shard and one file per block, named
    in order: the same corpus gives the same files and rows in the same order, wherever it is read
    from."""
    import ray

    (
        ray.data.read_webdataset(
            [info.path for info in shards], filesystem=root.fs, decoder=None, override_num_blocks=len(shards)
        )
        .map_batches(
            _candidate_batch,
            fn_kwargs=dict(settings=settings),
            batch_format="pyarrow",
            batch_size=BATCH,
            concurrency=cfg.prepare.parallelism,
        )
        .write_parquet(into.path, filesystem=into.fs, mode=overwrite(), filename_provider=shard_names())
    )


# Ray Data's reader refuses a tar whose samples it cannot tell apart, with a long trace
_NOT_ADJACENT = re.compile(r"tar entries for key '([^']*)' are not contiguous in the archive \(tar is ([^)]*)\)")
_TWICE = re.compile(r"(\S+): duplicate file name in tar file")


@contextlib.contextmanager
def _tar_problems_named(cfg: Config):
    """A shard Ray Data's WebDataset reader cannot split into samples is one line naming it."""
    try:
        yield
    except Exception as exc:
        text = str(exc)
        if found := _NOT_ADJACENT.search(text):
            key, tar = found.groups()
            raise cfg.error(
                "data.shards",
                f"{tar}: the files of sample {key!r} are not next to each other; write the tar with its "
                "entries sorted by name (tar --sort=name)",
            ) from None
        if found := _TWICE.search(text):
            raise cfg.error(
                "data.shards", f"{found.group(1)} is in its tar twice, so its sample cannot be told apart"
            ) from None
        raise


def corpus_fingerprint(cfg: Config, listing: list[str]) -> str:
    """Hash of the config the output depends on and the shards' listing (names, sizes, times)."""
    digest = hashlib.sha256(fingerprint_settings(cfg))
    for line in listing:
        digest.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


# ----------------------------------------------------------------------------- Ray Data task bodies


@functools.lru_cache(maxsize=4)
def _candidates_for(settings: str) -> CandidateRows:
    return CandidateRows(**json.loads(settings))


def _candidate_batch(batch: pa.Table, settings: str) -> pa.Table:
    return _candidates_for(settings)(batch)


def _counted(row_or_batch: dict[str, Any]) -> bool:
    """A sample that takes part in the duplicate rule: its captions (and files) passed."""
    return row_or_batch["rejected_at"] != CAPTIONS


def _is_duplicate(image_id: str, shard: str, rejected_at: str | None, kept_from: dict[str, str]) -> bool:
    return rejected_at != CAPTIONS and image_id in kept_from and kept_from[image_id] != shard


def duplicated_keys(candidates: Any, partitions: int) -> dict[str, str]:
    """{key: the shard it is kept from} for each key in more than one shard; small, whatever the
    corpus (a Ray Data group-by over the keys, never a list of them in the driver)."""
    from ray.data.aggregate import Count, Min

    counted = candidates.select_columns(["image_id", "shard", "rejected_at"]).filter(_counted)
    groups = counted.groupby("image_id", num_partitions=partitions).aggregate(
        Count(alias_name="n"), Min("shard", alias_name="first")
    )
    return {row["image_id"]: row["first"] for row in groups.filter(lambda row: row["n"] > 1).take_all()}


@dataclass
class CorpusSummary:
    """What the driver keeps of a corpus, summed from the tasks' summaries of their blocks: small
    whatever the corpus size but for the refusals (rare: prepare.max_reject_fraction)."""

    read: int = 0
    words: Counter = field(default_factory=Counter)  # content words of the vocabulary's samples
    scenes: Counter = field(default_factory=Counter)  # samples read per scene
    rejected: list[dict] = field(default_factory=list)

    def add(self, block: dict) -> None:
        self.read += block["read"]
        self.words.update(block["words"])
        self.scenes.update(block["scenes"])
        self.rejected += block["rejected"]


def _summarize(batch: pa.Table, vocab_splits: list[str], kept_from: dict[str, str]) -> pa.Table:
    """One block's summary (a JSON row): samples read, word counts of the samples the vocabulary
    is drawn from (captions passed, not a duplicate, in `data.vocab_splits`; image refusals count,
    as in the record formats, where the vocabulary is drawn before images are read), samples per
    scene, and its refusals with their reasons."""
    words: Counter = Counter()
    scenes: Counter = Counter()
    rejected = []
    rows = batch.to_pylist()
    for row in rows:
        duplicate = _is_duplicate(row["image_id"], row["shard"], row["rejected_at"], kept_from)
        if row["scene"] is not None:
            scenes[row["scene"]] += 1
        if row["rejected_at"] != CAPTIONS and not duplicate and row["split"] in vocab_splits:
            words.update(word_counts(row["captions"]))
        reason = (
            f"duplicate image_id {row['image_id']!r} (kept from {kept_from[row['image_id']]})"
            if duplicate
            else row["reason"]
        )
        if reason is not None:
            rejected.append(
                {"image_id": row["image_id"], "split": row["split"], "path": row["source_path"], "reason": reason}
            )
    summary = {"read": len(rows), "words": words, "scenes": scenes, "rejected": rejected}
    return pa.table({"summary": [json.dumps(summary)]})


def summarize(candidates: Any, kept_from: dict[str, str], cfg: Config) -> CorpusSummary:
    """The candidates' summary: one Ray Data pass, each block summarized in its task; the driver
    sums the summaries as they stream in."""
    columns = ["image_id", "split", "source_path", "shard", "captions", "reason", "rejected_at", "scene"]
    blocks = candidates.select_columns(columns).map_batches(
        _summarize,
        fn_kwargs=dict(vocab_splits=list(cfg.data.vocab_splits), kept_from=kept_from),
        batch_format="pyarrow",
        batch_size=None,
    )
    total = CorpusSummary()
    for batch in blocks.iter_batches(batch_format="pyarrow", batch_size=None):
        for text in batch["summary"].to_pylist():
            total.add(json.loads(text))
    return total


class _Tokens:
    def __init__(self, vocab: dict, tokenizer: str | None, encoding: str, kept_from: dict[str, str]):
        self.vocab, self.encoding = Vocabulary.from_dict(vocab), encoding
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer else None
        self.kept_from = kept_from
        self.schema = shard_schema(self.tokenizer is not None).append(pa.field(FOLDER, pa.string()))


@functools.lru_cache(maxsize=4)
def _tokens_for(settings: str) -> _Tokens:
    return _Tokens(**json.loads(settings))


def _shard_batch(batch: pa.Table, settings: str) -> pa.Table:
    """Kept samples of a candidates batch as shard rows, tokenized; refusals leave the stream."""
    tokens = _tokens_for(settings)
    out: dict[str, list] = {name: [] for name in tokens.schema.names}
    for row in batch.to_pylist():
        if row["reason"] is not None or _is_duplicate(row["image_id"], row["shard"], None, tokens.kept_from):
            continue
        for name in ("image_id", "split", "scene", "source_path", "captions", "image"):
            out[name].append(row[name])
        out["caption_tokens"].append([tokens.vocab.encode(c) for c in row["captions"]])
        out["image_format"].append(tokens.encoding)
        if tokens.tokenizer is not None:
            out["caption_input_ids"].append(tokens.tokenizer(row["captions"])["input_ids"])
        out[FOLDER].append(row["split"])
    return pa.Table.from_pydict(out, schema=tokens.schema)
