"""Shards of a prepared output, for every input format: their schema, how a Ray Data stream of
shard rows is written into the staging folder (one folder per split, deterministic file names),
and how the written files are described in the manifest."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rsray import storage


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


def rows_per_task(n_rows: int, prep) -> int:
    """Enough tasks to keep every CPU busy (x8: short tasks leave little idle tail), none larger
    than one shard file."""
    tasks = (prep.parallelism or cluster_cpus()) * 8
    return max(1, min(prep.rows_per_file, math.ceil(n_rows / tasks)))


FOLDER = "_folder"  # a copy of `split` naming the output folder; not stored in the files


# Encoded JPEG/PNG bytes do not compress: spend no CPU on the image column.
SHARD_COMPRESSION = {"image": "none", "captions": "snappy", "caption_tokens": "snappy"}


def overwrite():
    from ray.data import SaveMode

    return SaveMode.OVERWRITE  # empties the folder written to: only ever the staging folder, wholly ours


def shard_names():
    """Deterministic shard names (part-00000-0.parquet, ...) so a rewrite gives the same files."""
    from ray.data.datasource import FilenameProvider

    class ShardNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}"

    return ShardNames()


def read_parquet_files(paths: list[str], filesystem: Any, **options: Any) -> Any:
    """These Parquet files as a Ray Dataset, one block per file, with Ray Data's Parquet reader V1:
    Ray 2.60's default reader (V2) starts 32 footer-reader actors for every read, new processes that
    cost 3 s of each read on an idle 2-core machine (measured; `rsray.data.stream` reads the train
    split the same way). The files are listed already, so V1 loses nothing. Our choice, scoped to
    this read."""
    import ray.data

    context = ray.data.DataContext.get_current()
    use_v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths, filesystem=filesystem, override_num_blocks=len(paths), **options)
    finally:
        context.use_datasource_v2 = use_v2


def write_shards(dataset: Any, staging: storage.Location, prep: Any) -> None:
    """Write a Ray Data stream of shard rows (with the FOLDER column naming each row's split) into
    <staging>/<split>/: at most `prep.rows_per_file` rows per file. Blocks must not mix splits, so
    each map task writes one file into one split's folder; the folder comes from FOLDER used as a
    directory partition, and the `split` column stays in the file."""
    dataset.write_parquet(
        staging.path,
        filesystem=staging.fs,
        partition_cols=[FOLDER],
        partitioning_flavor=None,
        filename_provider=shard_names(),
        max_rows_per_file=prep.rows_per_file,
        mode=overwrite(),
        compression=SHARD_COMPRESSION,
    )


def describe_split(out: storage.Location, split: str, paths: list[str]) -> dict:
    """Counts and per-file checksums of one split's shards (`paths`: the files this prepare wrote),
    read back from storage one file at a time: only the captions column, never the image ids (the
    driver's memory stays flat however large the split)."""
    loc = out.join(split)

    def describe(path: str) -> dict:
        captions = storage.reading(lambda: pq.read_table(path, filesystem=loc.fs, columns=["captions"]), path)
        return {
            "path": f"{split}/{path.rsplit('/', 1)[1]}",
            "rows": captions.num_rows,
            "sha256": storage.sha256_of(loc.fs, path),
            "bytes": loc.fs.get_file_info(path).size,
            "captions": int(pc.sum(pc.list_value_length(captions["captions"])).as_py() or 0),
        }

    with ThreadPoolExecutor(max_workers=8) as pool:  # hashing releases the GIL; S3 reads overlap
        described = list(pool.map(describe, paths))
    captions = sum(f.pop("captions") for f in described)
    return {"images": sum(f["rows"] for f in described), "captions": captions, "files": described}


def files_intact(out: storage.Location, manifest: dict) -> bool:
    """Whether every file the manifest lists (shards, and the rejected records' file) is there at
    its size: an unchanged input with a damaged output is prepared again."""
    expected = {f["path"]: f["bytes"] for info in manifest.get("splits", {}).values() for f in info["files"]}
    if "rejections" in manifest:
        expected[manifest["rejections"]["file"]["path"]] = manifest["rejections"]["file"]["bytes"]
    for rel, size in expected.items():
        info = out.fs.get_file_info(out.join(*rel.split("/")).path)
        if info.size != size:
            return False
    return True


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
