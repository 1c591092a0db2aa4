"""Prepared shards -> model batches (the dict of tensors `rsray.models.base` describes).

Reading: `read_split(uri, split)` loads the Parquet files the manifest lists for a split, in
manifest order (local folder or s3://), optionally checking each file's sha256. Row i of that
table is image i of the split everywhere below: its `image_ids` value, its row in evaluation.

The contract shared by the local DataLoader and the Ray Train loop
-------------------------------------------------------------------
Both paths go through the same three plain functions, so a batch is made the same way whether its
rows come from a `torch.utils.data.DataLoader` or from
`ray.train.get_dataset_shard("train").iter_batches(batch_format="pyarrow")`:

1. `explode_pairs(image_table, scenes, image_index)`: one row per (image, caption) pair, in
   Arrow (`rsray.data.pairs`, re-exported here; its docstring lists the columns). It has no torch
   in it, so the Ray Data tasks that run it every epoch start fast.
2. `decode_pairs(rows, transform, seeds)`: pair rows -> samples (decoded, transformed image
   tensor + the row's ids). Sample i's augmentation is a function of `seeds[i]` only (see
   `rsray.data.augment`), so results do not depend on workers, batching or the process.
3. `collate_pairs(samples)` -> Batch with exactly the keys of base.py.
`batch_from_rows(rows, augment, rng)` / `batch_from_arrow(pair_table, augment, rng)` chain 2 and 3,
drawing one seed per row from `rng` (a numpy Generator, or an int seed).

Text conventions (collate_pairs): `tokens` are padded with 0 (<pad>) to the longest caption of the
batch, after capping each caption at `max_tokens` (default 64) ids. A caption with no known word
(RSICD has captions that are just ".") would have zero tokens; it becomes a single <unk> (id 1), so
`lengths` is always >= 1 and a GRU never sees an empty sequence. `input_ids` are padded with 0 (the
[PAD] id of BERT vocabularies) with an `attention_mask` of 1 on real ids; a caption longer than
`max_input_ids` (default 128) keeps its first max_input_ids - 1 ids and its last one ([SEP]).

Training order: `make_train_loader` samples with `PairSampler`, which draws the permutation and a
per-pair augmentation seed from numpy's Generator seeded by (seed, epoch): the same seed gives the
same batches and the same augmentations, whatever `num_workers`; each epoch (each new iteration of
the loader, or `loader.sampler.set_epoch(e)`) gets a new order and new augmentations.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rsray import storage
from rsray.data.augment import AugmentConfig, eval_transform, reseed, seeded_rng, train_transform
from rsray.data.images import decode_image
from rsray.data.manifest import read_manifest
from rsray.data.pairs import (  # noqa: F401 - the Arrow half of this module's contract, re-exported
    BY_IMAGE_ID,
    SCENES_KEY,
    SPLIT_KEY,
    caption_counts,
    explode_pairs,
    flat_lists,
    image_number,
    image_scenes,
    pairs_from_arrow,
    scene_ids,
    scene_index,
)
from rsray.data.text import PAD_ID, UNK_ID
from rsray.data.verify import ShardMismatch

Batch = dict[str, torch.Tensor]
Transform = Callable[[Any], torch.Tensor]

MAX_TOKENS = 64
MAX_INPUT_IDS = 128
INPUT_PAD_ID = 0  # [PAD] in BERT-family vocabularies


class SplitNotFound(FileNotFoundError):
    """The prepared output has no (non-empty) split of that name."""


# ----------------------------------------------------------------------------- reading


def read_split(
    uri: str, split: str, s3_endpoint: str | None = None, columns: Sequence[str] | None = None, verify: bool = False
) -> pa.Table:
    """All shard files of `split` under the prepared output `uri`, concatenated in manifest order.

    `columns` reads a subset (e.g. without `image` for caption-only work). `verify` checks each
    file's sha256 against the manifest. The table's schema metadata carries the manifest's scene
    names (`scene_index(table)` uses them), so scene ids agree across splits."""
    manifest = read_manifest(uri, s3_endpoint)
    root = storage.resolve(uri, s3_endpoint)
    splits = manifest.get("splits", {})
    info = splits.get(split)
    if not info or not info.get("files"):
        present = [f"{name} ({i.get('images', 0)} images)" for name, i in splits.items() if i.get("files")]
        reason = "has no images" if info is not None else "is not in the manifest"
        raise SplitNotFound(
            f"{root.join(split).uri}: split {split!r} {reason}; splits with images: {', '.join(present) or 'none'}"
        )

    def read_one(entry: dict) -> pa.Table:
        loc = root.join(*entry["path"].split("/"))
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.NotFound:
            raise ShardMismatch(f"{loc.uri}: listed in {root.join('manifest.json').uri} but missing")
        if "bytes" in entry and info.size != entry["bytes"]:
            raise ShardMismatch(
                f"{loc.uri}: {info.size} bytes, the manifest says {entry['bytes']} "
                "(truncated or changed after prepare; run prepare again)"
            )
        if verify:
            digest = storage.sha256_of(loc.fs, loc.path)
            if digest != entry["sha256"]:
                raise ShardMismatch(
                    f"{loc.uri}: sha256 {digest} differs from the manifest's {entry['sha256']} "
                    "(file changed after prepare; run prepare again)"
                )

        def read() -> pa.Table:
            with loc.fs.open_input_file(loc.path) as handle:
                # pre_buffer: the column chunks in a few coalesced GETs, not one small ranged GET each
                # (fewer requests on S3, and none too small for a throttling reply: storage.reading)
                wanted = list(columns) if columns is not None else None
                return pq.ParquetFile(handle, pre_buffer=True).read(columns=wanted)

        table = storage.reading(read, f"read {loc.uri}")
        if table.num_rows != entry["rows"]:
            raise ShardMismatch(f"{loc.uri}: {table.num_rows} rows, the manifest says {entry['rows']}")
        return table

    files = info["files"]
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:  # overlaps S3 reads and hashing
        tables = list(pool.map(read_one, files))
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    metadata = dict(table.schema.metadata or {})
    metadata[SCENES_KEY] = json.dumps(sorted(manifest.get("scenes") or {})).encode()
    metadata[SPLIT_KEY] = split.encode()
    return table.replace_schema_metadata(metadata)


def caption_image_index(table: pa.Table) -> torch.Tensor:
    """LongTensor[n_captions]: caption j (in `eval_captions` order) -> its image's row."""
    counts = caption_counts(table)
    return torch.from_numpy(np.repeat(np.arange(len(counts), dtype=np.int64), counts))


# ----------------------------------------------------------------------------- pairs (Arrow)

# ----------------------------------------------------------------------------- samples and batches


def _as_transform(augment: AugmentConfig | Transform, train: bool) -> Transform:
    if isinstance(augment, AugmentConfig):
        return train_transform(augment) if train else eval_transform(augment)
    if not callable(augment):
        raise TypeError(f"expected an AugmentConfig or a transform, got {type(augment).__name__}")
    return augment


def decode_pairs(
    rows: Sequence[Mapping], transform: Transform | None, seeds: Sequence[int] | None = None
) -> list[dict]:
    """Pair rows -> samples: {"image": float [3,H,W] (when the row has image bytes), "tokens",
    "input_ids" (when present), "image_index", "scene_id"}. With `seeds`, row i's augmentation is
    drawn from seeds[i] alone (torch's global CPU RNG is restored afterwards)."""
    if seeds is not None and len(seeds) != len(rows):
        raise ValueError(f"{len(seeds)} seeds for {len(rows)} rows")
    samples = []
    with seeded_rng() if seeds is not None else contextlib.nullcontext():
        for i, row in enumerate(rows):
            sample = {
                "tokens": row["tokens"],
                "image_index": int(row["image_index"]),
                "scene_id": int(row["scene_id"]) if row.get("scene_id") is not None else -1,
            }
            if row.get("input_ids") is not None:
                sample["input_ids"] = row["input_ids"]
            if row.get("image") is not None and transform is not None:
                if seeds is not None:
                    reseed(seeds[i])
                sample["image"] = transform(decode_image(row["image"]))
            samples.append(sample)
    return samples


def _pad(sequences: list[Sequence[int]], pad: int) -> torch.Tensor:
    out = torch.full((len(sequences), max(len(s) for s in sequences)), pad, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out


def collate_pairs(
    samples: Sequence[Mapping], max_tokens: int = MAX_TOKENS, max_input_ids: int = MAX_INPUT_IDS
) -> Batch:
    """Samples -> the base.py batch: images (if the samples have them), tokens, lengths,
    input_ids + attention_mask (if they have them), image_ids, scene_ids."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    batch: Batch = {}
    if "image" in samples[0]:
        batch["images"] = torch.stack([s["image"] for s in samples])
    tokens = [list(s["tokens"][:max_tokens]) or [UNK_ID] for s in samples]  # "." -> [<unk>]
    batch["tokens"] = _pad(tokens, PAD_ID)
    batch["lengths"] = torch.tensor([len(t) for t in tokens], dtype=torch.long)
    with_ids = ["input_ids" in s for s in samples]
    if any(with_ids):
        if not all(with_ids):
            raise ValueError("some samples have input_ids and some do not")
        ids = [list(s["input_ids"]) for s in samples]
        ids = [x if len(x) <= max_input_ids else x[: max_input_ids - 1] + x[-1:] for x in ids]
        batch["input_ids"] = _pad(ids, INPUT_PAD_ID)
        mask = torch.zeros_like(batch["input_ids"])
        for i, x in enumerate(ids):
            mask[i, : len(x)] = 1
        batch["attention_mask"] = mask
    batch["image_ids"] = torch.tensor([s["image_index"] for s in samples], dtype=torch.long)
    batch["scene_ids"] = torch.tensor([s["scene_id"] for s in samples], dtype=torch.long)
    return batch


def _seeds(rng: np.random.Generator | int | None, n: int) -> list[int] | None:
    if rng is None:
        return None
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    return rng.integers(0, 2**63 - 1, size=n, dtype=np.int64).tolist()


def batch_from_rows(
    rows: Sequence[Mapping],
    augment: AugmentConfig | Transform,
    rng: np.random.Generator | int | None = None,
    max_tokens: int = MAX_TOKENS,
    max_input_ids: int = MAX_INPUT_IDS,
    train: bool = True,
) -> Batch:
    """Pair rows (`pairs_from_arrow`, Ray batches' `to_pylist()`) -> a training Batch.

    `augment`: an AugmentConfig (its train pipeline, or eval with train=False) or a ready transform
    (build it once per worker to save a little time). `rng`: one seed per row is drawn from it, so
    give each Ray worker its own Generator, e.g. default_rng([seed, epoch, rank]); None leaves the
    augmentation to torch's global RNG."""
    samples = decode_pairs(rows, _as_transform(augment, train), _seeds(rng, len(rows)))
    return collate_pairs(samples, max_tokens, max_input_ids)


def batch_from_arrow(
    pairs: pa.Table, augment: AugmentConfig | Transform, rng: np.random.Generator | int | None = None, **kwargs
) -> Batch:
    """`batch_from_rows` on an Arrow table of pair rows (the output of `explode_pairs`)."""
    return batch_from_rows(pairs.to_pylist(), augment, rng, **kwargs)


# ----------------------------------------------------------------------------- datasets


class _Rows:
    """Per-pair fields of an exploded pair table as numpy arrays (cheap to index, fork-friendly)."""

    def __init__(self, pairs: pa.Table):
        self.image_index = pairs.column("image_index").to_numpy()
        self.scene_id = pairs.column("scene_id").to_numpy()
        self.caption = pairs.column("caption").to_numpy()
        self.tokens = flat_lists(pairs.column("tokens"))
        self.input_ids = flat_lists(pairs.column("input_ids")) if "input_ids" in pairs.column_names else None

    def __len__(self) -> int:
        return len(self.image_index)

    def row(self, i: int) -> dict:
        values, offsets = self.tokens
        out = {
            "image_index": int(self.image_index[i]),
            "scene_id": int(self.scene_id[i]),
            "tokens": values[offsets[i] : offsets[i + 1]].tolist(),
        }
        if self.input_ids is not None:
            values, offsets = self.input_ids
            out["input_ids"] = values[offsets[i] : offsets[i + 1]].tolist()
        return out


class PairDataset(Dataset):
    """One item per (image, caption) pair of a split table, image-major (image 0's captions first).

    An item key is a pair index, or (pair index, seed) as `PairSampler` yields; the item is a
    sample for `collate_pairs`. `image_ids` are image rows in `table`; `scene_ids` index the sorted
    scene names of `scenes` (manifest, names or map; default: those `read_split` attached)."""

    def __init__(self, table: pa.Table, augment: AugmentConfig | Transform, scenes: Any = None, train: bool = True):
        self.transform = _as_transform(augment, train)
        self.images = table.column("image")
        self.pairs = _Rows(
            explode_pairs(table.drop_columns(["image"]), scenes if scenes is not None else scene_index(table))
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def row(self, i: int) -> dict:
        """The pair row (image bytes included) of pair i."""
        out = self.pairs.row(i)
        out["image"] = self.images[out["image_index"]].as_py()
        return out

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[dict]:
        indices = [k[0] if isinstance(k, tuple) else k for k in keys]
        seeds = [k[1] for k in keys] if keys and all(isinstance(k, tuple) for k in keys) else None
        return decode_pairs([self.row(int(i)) for i in indices], self.transform, seeds)


class PairSampler(Sampler):
    """Yields (pair index, augmentation seed), shuffled or in order, from numpy's Generator seeded
    by (seed, epoch). Each iteration uses the current epoch, then moves to the next."""

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        seeds = rng.integers(0, 2**63 - 1, size=self.n, dtype=np.int64)
        return iter(zip(order.tolist(), seeds.tolist(), strict=True))


def make_train_loader(
    table: pa.Table,
    augment: AugmentConfig | Transform,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
    max_tokens: int = MAX_TOKENS,
    max_input_ids: int = MAX_INPUT_IDS,
    scenes: Any = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader of training batches over all (image, caption) pairs of `table`.

    Deterministic for a seed (order and augmentation, any num_workers); a new order each epoch."""
    dataset = PairDataset(table, augment, scenes)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=PairSampler(len(dataset), shuffle, seed),
        collate_fn=functools.partial(collate_pairs, max_tokens=max_tokens, max_input_ids=max_input_ids),
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


class ImageDataset(Dataset):
    """Evaluation images in table order: item i = {"image", "image_index": i, "scene_id"}."""

    def __init__(self, table: pa.Table, augment: AugmentConfig | Transform, scenes: Any = None):
        self.transform = _as_transform(augment, train=False)
        self.images = table.column("image")
        self.scene_ids = scene_ids(table, scene_index(table if scenes is None else scenes))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = decode_image(self.images[i].as_py())
        return {"image": self.transform(image), "image_index": int(i), "scene_id": int(self.scene_ids[i])}


def collate_images(samples: Sequence[Mapping]) -> Batch:
    """Image samples -> {"images", "image_ids", "scene_ids"}."""
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "image_ids": torch.tensor([s["image_index"] for s in samples], dtype=torch.long),
        "scene_ids": torch.tensor([s["scene_id"] for s in samples], dtype=torch.long),
    }


def eval_images(
    table: pa.Table, augment: AugmentConfig | Transform, batch_size: int = 64, scenes: Any = None, num_workers: int = 0
) -> Iterator[Batch]:
    """Image batches in table order (the eval transform of an AugmentConfig): images, image_ids, scene_ids."""
    dataset = ImageDataset(table, augment, scenes)
    if num_workers > 0:
        yield from DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_images
        )
        return
    for start in range(0, len(dataset), batch_size):
        yield collate_images([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


def eval_captions(
    table: pa.Table,
    batch_size: int = 256,
    max_tokens: int = MAX_TOKENS,
    max_input_ids: int = MAX_INPUT_IDS,
    scenes: Any = None,
) -> Iterator[Batch]:
    """Caption batches in order (image 0's captions, then image 1's, ...): tokens, lengths,
    input_ids/attention_mask when present, image_ids (= `caption_image_index`), scene_ids."""
    text = table.drop_columns([c for c in ("image",) if c in table.column_names])
    rows = _Rows(explode_pairs(text, scenes if scenes is not None else scene_index(table)))
    for start in range(0, len(rows), batch_size):
        samples = [rows.row(i) for i in range(start, min(start + batch_size, len(rows)))]
        yield collate_pairs(samples, max_tokens, max_input_ids)
