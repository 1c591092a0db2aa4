"""The training stream: the train split's shards as a Ray Dataset of (image, caption) pair rows, and
one worker's epoch of decoded batches from its shard of it.

The driver builds the Dataset (`train_dataset`) over the Parquet files the manifest lists, local or
s3://, exploded to pair rows by `rsray.data.pairs.explode_pairs` in Ray Data tasks. When the pairs
fit, they are made once and held in Ray's object store for the whole run (`train.cache_train_split`);
otherwise every epoch reads and explodes the shards again. Ray Train hands each worker an equal
streaming shard; the worker shuffles it locally (seeded by seed, epoch, rank) and decodes and
augments each batch with the same function the local DataLoader path uses (`pair_batches`).

Ray is imported inside `train_dataset` only: the workers import this module for `pair_batches`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rsray import storage
from rsray.data.manifest import Manifest, train_pairs

SHUFFLE_BUFFER_BATCHES = 8  # local shuffle buffer per worker, in batches (at least 1000 pairs)


def train_dataset(cfg: Any, manifest: Manifest, first_epoch: int = 0):
    """The train split's shard files (listed in `manifest`, the manifest of `cfg.train.data`) as a
    Ray Dataset of (image, caption) pair rows, in a block order fixed by `train.seed` and the epoch.

    Ray Data reseeds the block order by its execution count (one execution per epoch); a run resumed
    at `first_epoch` starts that count there, so its epochs read in the order the uninterrupted run's
    did (otherwise its first epoch would repeat epoch 0's order)."""
    import ray
    import ray.data

    from rsray.data.pairs import BY_IMAGE_ID, explode_pairs, scene_index  # no torch: fast task start
    from rsray.data.shards import read_parquet_files

    files = manifest["splits"].get("train", {}).get("files")
    if not files:
        raise cfg.error("train.data", f"{cfg.train.data} has no train split to train on")
    pairs = train_pairs(manifest)
    if pairs < cfg.train.batch_size * cfg.train.max_workers:
        raise cfg.error(
            "train.batch_size",
            f"{pairs} training pairs give no full batch of {cfg.train.batch_size} "
            f"on each of {cfg.train.max_workers} workers",
        )
    root = storage.resolve(cfg.train.data, cfg.prepare.s3_endpoint)
    columns = ["image_id", "scene", "caption_tokens", "image"]
    if manifest.get("tokenizer"):
        columns.append("caption_input_ids")
    # Ray Data's Parquet reader V1, one block per shard file (`read_parquet_files`: V2 starts 32
    # footer-reader actors per read, 10 s inside a sweep trial). One block per file also keeps the
    # shuffled pair order (so a seed's run) independent of the CPUs free at the moment.
    paths = [root.join(*f["path"].split("/")).path for f in files]
    dataset = read_parquet_files(paths, root.fs).select_columns(columns)
    explode = {
        "fn": explode_pairs,
        "batch_format": "pyarrow",
        "fn_kwargs": {"scenes": scene_index(manifest), "image_index": BY_IMAGE_ID},
    }
    shuffle_blocks = {"seed": ray.data.RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True)}
    # Pair rows repeat their image's bytes once per caption: the cache holds about that many times the shards.
    pair_bytes = sum(f["bytes"] for f in files) * pairs / max(1, manifest["splits"]["train"].get("images", 1))
    if cache_train_split(
        cfg.train.cache_train_split, pair_bytes, ray.cluster_resources().get("object_store_memory", 0)
    ):
        # read and explode once; every epoch replays the pair blocks in a new order, with no task to start
        stream = dataset.map_batches(**explode).materialize().randomize_block_order(**shuffle_blocks)
    else:
        stream = dataset.randomize_block_order(**shuffle_blocks).map_batches(**explode)
    stream.context.enable_progress_bars = False  # runs every epoch; rank 0 logs one line per epoch instead
    # RandomSeedConfig(reseed_after_execution) mixes the seed with the context's execution index, a
    # counter Ray Data keeps privately (2.60: DataContext._execution_idx, +1 per finished execution);
    # the resume test fails if a Ray release renames it
    if not hasattr(stream.context, "_execution_idx"):
        raise RuntimeError("this Ray Data has no DataContext._execution_idx: a resumed run could not keep its order")
    stream.context._execution_idx = first_epoch
    return stream


def cache_train_split(setting: str, pair_bytes: float, object_store_bytes: float) -> bool:
    """Whether to hold the train split's pair rows in Ray's object store (`train.cache_train_split`):
    always, never, or (auto) when they fill at most half of the cluster's object store."""
    if setting != "auto":
        return setting == "always"
    return pair_bytes <= 0.5 * object_store_bytes


def pair_batches(shard, batch_size: int, decoder, seed: int, epoch: int, rank: int):
    """Training batches of one epoch from this worker's shard of pair rows (a Ray DataIterator),
    decoded by `decoder` (a `rsray.data.decode.BatchDecoder`), in full batches only."""
    rng = np.random.default_rng([seed, epoch, rank])  # each batch's augmentation seed is drawn from it
    shuffle_seed = int(np.random.SeedSequence([seed, epoch, rank, 1]).generate_state(1)[0])
    pairs = shard.iter_batches(
        batch_size=batch_size,
        batch_format="pyarrow",
        drop_last=True,
        local_shuffle_buffer_size=max(1000, SHUFFLE_BUFFER_BATCHES * batch_size),
        local_shuffle_seed=shuffle_seed,
    )
    return decoder.batches(pairs, rng)
