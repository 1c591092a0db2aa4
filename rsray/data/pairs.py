"""(image, caption) pair rows from prepared image rows, in Arrow: no torch, so the Ray Data
tasks that run `explode_pairs` every epoch start in a fraction of a second (importing torch in a
fresh task worker costs about 2 s on a small machine, once per epoch).

`explode_pairs(image_table, scenes, image_index)` (vectorised; `pairs_from_arrow` gives the same
as Python dicts) returns one row per (image, caption) pair, with columns
  image        binary   the encoded image (only when the input has an `image` column)
  image_index  int64    the image's number in its split (default: its row, + `first_row`)
  scene_id     int64    index of the scene in the sorted scene names, -1 when unknown
  caption      int32    which of the image's captions
  tokens       list<int32>  the caption's word ids (`caption_tokens`)
  input_ids    list<int32>  its BERT-family ids, only when the shard has `caption_input_ids`
A Ray Data pipeline can `map_batches(explode_pairs, batch_format="pyarrow", fn_kwargs=...)` over
the image dataset and shuffle the pairs. Ray batches do not know their rows' position in the
split, so pass `image_index=BY_IMAGE_ID` there: each image is numbered by a 64-bit hash of its
image_id (`image_number`), the same in every task, on every node and in every epoch, with no list
of the split's ids to send to the tasks (a corpus of millions would send it to each). Only equality
matters to the losses (captions of one image are positives of each other), and that holds either
way; two ids share a number with probability about n²/2⁶⁴ (5e-8 at a million images).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCENES_KEY = b"rsray.scenes"  # schema metadata read_split adds: the manifest's sorted scene names
SPLIT_KEY = b"rsray.split"
BY_IMAGE_ID = "image_id"  # explode_pairs(image_index=BY_IMAGE_ID): number images by `image_number`


def scene_index(source: Any) -> dict[str, int]:
    """Scene name -> class index, names sorted. `source`: a manifest dict (its `scenes`), a table
    from `read_split` (the manifest's names it carries; otherwise the table's own scenes), names,
    or a map keyed by names (a manifest's `scenes` counts, or a scene_index result: idempotent).

    Pass the manifest (or a table from read_split) wherever ids must agree across splits or batches:
    a bare table or Ray batch without that metadata only knows its own scenes."""
    if isinstance(source, pa.Table):
        meta = (source.schema.metadata or {}).get(SCENES_KEY)
        if meta is not None:
            names = json.loads(meta)
        elif "scene" in source.column_names:
            names = [s for s in pc.unique(source.column("scene")).to_pylist() if s is not None]
        else:
            names = []
    elif isinstance(source, Mapping) and "scenes" in source and "splits" in source:  # a manifest
        names = list(source["scenes"] or {})
    else:  # names, or a map whose keys are the names (a manifest's `scenes`, a scene_index result)
        names = list(source or [])
    return {name: i for i, name in enumerate(sorted(set(names)))}


def image_number(image_id: str) -> int:
    """The image's number in Ray batches: blake2b(image_id)'s first 8 bytes with the top bit
    dropped, so it needs nothing but the id and, like a row number, is never negative (-1 stays
    free for "no image", as in CMPAGL's empty queue slots)."""
    digest = hashlib.blake2b(image_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def image_scenes(table: pa.Table) -> list[str | None]:
    """Scene name of each image row (None when unknown), for scene recall SR@K."""
    return table.column("scene").to_pylist()


def scene_ids(table: pa.Table, scenes: Mapping[str, int]) -> np.ndarray:
    return np.array([scenes.get(s, -1) if s is not None else -1 for s in image_scenes(table)], dtype=np.int64)


def caption_counts(table: pa.Table) -> np.ndarray:
    """Captions per image row."""
    return pc.list_value_length(table.column("caption_tokens")).to_numpy(zero_copy_only=False).astype(np.int64)


def flat_lists(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list<int> column as (values, offsets) numpy arrays: row i = values[offsets[i]:offsets[i+1]]."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.int64), offsets


def _image_index(table: pa.Table, image_index: Any, first_row: int) -> np.ndarray:
    if image_index is None:
        return np.arange(first_row, first_row + table.num_rows, dtype=np.int64)
    if isinstance(image_index, str):
        if image_index != BY_IMAGE_ID:
            raise ValueError(f"image_index must be {BY_IMAGE_ID!r}, a sequence or None, got {image_index!r}")
        return np.array([image_number(i) for i in table.column("image_id").to_pylist()], dtype=np.int64)
    out = np.asarray(image_index, dtype=np.int64)
    if out.shape != (table.num_rows,):
        raise ValueError(f"image_index has shape {out.shape}, expected ({table.num_rows},)")
    return out


def explode_pairs(table: pa.Table, scenes: Any = None, image_index: Any = None, first_row: int = 0) -> pa.Table:
    """Image rows (shard schema) -> one row per (image, caption); columns in the module docstring.

    `scenes`: a scene map or anything `scene_index` takes (default: the table's own). `image_index`:
    None (row position + `first_row`), a sequence with one number per row, or BY_IMAGE_ID
    (`image_number` of each row's image_id, for Ray batches)."""
    scenes = scene_index(table if scenes is None else scenes)
    counts = caption_counts(table)
    parents = np.repeat(np.arange(table.num_rows, dtype=np.int64), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    columns: dict[str, pa.Array | pa.ChunkedArray] = {}
    if "image" in table.column_names:
        columns["image"] = table.column("image").take(pa.array(parents))
    columns["image_index"] = pa.array(_image_index(table, image_index, first_row)[parents])
    columns["scene_id"] = pa.array(scene_ids(table, scenes)[parents])
    columns["caption"] = pa.array((np.arange(len(parents), dtype=np.int64) - starts).astype(np.int32))
    columns["tokens"] = pc.list_flatten(table.column("caption_tokens"))
    if "caption_input_ids" in table.column_names:
        ids = table.column("caption_input_ids")
        id_counts = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
        if ids.null_count or not np.array_equal(np.asarray(id_counts, dtype=np.int64), counts):
            raise ValueError("caption_input_ids does not have one entry per caption in every row")
        columns["input_ids"] = pc.list_flatten(ids)
    return pa.table(columns)


def pairs_from_arrow(table: pa.Table, scenes: Any = None, image_index: Any = None, first_row: int = 0) -> list[dict]:
    """`explode_pairs` as a list of dicts (pair rows for `decode_pairs` / `batch_from_rows`)."""
    return explode_pairs(table, scenes, image_index, first_row).to_pylist()
