"""Shards -> batches: reading a split, training pairs, collation, evaluation order, the Ray path."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rsray import storage
from rsray.data.augment import AugmentConfig, train_transform
from rsray.data.loader import (
    BY_IMAGE_ID,
    PairDataset,
    PairSampler,
    ShardMismatch,
    SplitNotFound,
    batch_from_arrow,
    batch_from_rows,
    caption_image_index,
    collate_pairs,
    decode_pairs,
    eval_captions,
    eval_images,
    explode_pairs,
    image_number,
    image_scenes,
    make_train_loader,
    pairs_from_arrow,
    read_split,
    scene_index,
)
from rsray.data.manifest import MANIFEST_FILE, SPLITS, vocab_size
from rsray.data.shards import describe_split, shard_schema

AUG = AugmentConfig(train_resize=36, crop=32, rotation=90.0, eval_resize=24)
WORDS = ["<pad>", "<unk>", "plane", "airport", "beach", "sea", "tree", "road"]
SCENES = ["airport", "beach", "forest"]
N_TRAIN, N_TEST = 12, 4
SHORT = 7  # this train image has 3 captions, every other one 5
DOT = 2  # this train image's last caption is "." (no tokens)
NO_SCENE = 5  # this train image has no scene
LONG_IDS = 40  # caption_input_ids of train image 0, caption 0 is this long


def caption_tokens(i: int, k: int) -> list[int]:
    return [2 + (i + k + j) % 6 for j in range(1 + (3 * i + k) % 4)]  # 1-4 ids, all known words


def shard_rows(split: str, n: int, with_ids: bool) -> pa.Table:
    rows = []
    for i in range(n):
        n_caps = 3 if (split == "train" and i == SHORT) else 5
        captions = [f"caption {k} of {split} image {i}" for k in range(n_caps)]
        tokens = [caption_tokens(i, k) for k in range(n_caps)]
        if split == "train" and i == DOT:
            captions[-1], tokens[-1] = ".", []
        out = io.BytesIO()
        Image.new("RGB", (40, 40), (20 * i, 255 - 20 * i, 100 if split == "train" else 200)).save(out, "JPEG")
        row = {
            "image_id": f"{split}_{i:02d}.jpg",
            "split": split,
            "scene": None if (split == "train" and i == NO_SCENE) else SCENES[i % 3 if split == "train" else 1],
            "source_path": f"/in/{split}_{i:02d}.jpg",
            "captions": captions,
            "caption_tokens": tokens,
            "image": out.getvalue(),
            "image_format": "jpeg",
        }
        if with_ids:
            row["caption_input_ids"] = [[2] + [5 + (i + k) % 20] * (2 + k) + [3] for k in range(n_caps)]
            if split == "train" and i == 0:
                row["caption_input_ids"][0] = [2] + [7] * (LONG_IDS - 2) + [3]
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=shard_schema(with_ids))


def write_output(root, with_ids=False) -> dict:
    """A prepared output as prepare writes it: <root>/<split>/part-*.parquet + manifest.json."""
    tables = {"train": shard_rows("train", N_TRAIN, with_ids), "test": shard_rows("test", N_TEST, with_ids)}
    files = {"train": [tables["train"].slice(0, 7), tables["train"].slice(7)], "test": [tables["test"]]}
    for split, parts in files.items():
        (root / split).mkdir(parents=True)
        for n, part in enumerate(parts):
            pq.write_table(part, root / split / f"part-{n:05d}-0.parquet")
    loc = storage.resolve(root)
    scenes: dict[str, int] = {}
    for table in tables.values():
        for s in table.column("scene").to_pylist():
            if s is not None:
                scenes[s] = scenes.get(s, 0) + 1
    manifest = {
        "schema_version": 1,
        "splits": {s: describe_split(loc, s, storage.list_files(loc.join(s), ".parquet")) for s in SPLITS},
        "scenes": dict(sorted(scenes.items())),
        "vocab": {"min_count": 1, "words": WORDS},
        "tokenizer": "tiny" if with_ids else None,
    }
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))
    return manifest


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    return root, write_output(root)


@pytest.fixture(scope="module")
def train(output):
    return read_split(str(output[0]), "train")


# ----------------------------------------------------------------------------- reading


def test_read_split_in_manifest_order_with_checksums(output, train):
    root, manifest = output
    assert train.num_rows == N_TRAIN
    assert train.column("image_id").to_pylist() == [f"train_{i:02d}.jpg" for i in range(N_TRAIN)]
    assert [f["path"] for f in manifest["splits"]["train"]["files"]] == [
        "train/part-00000-0.parquet",
        "train/part-00001-0.parquet",
    ]
    assert read_split(str(root), "test", verify=True).num_rows == N_TEST
    only = read_split(str(root), "train", columns=["image_id", "caption_tokens"])
    assert only.column_names == ["image_id", "caption_tokens"]
    assert vocab_size(manifest) == len(WORDS)


def test_missing_split_names_the_path(output):
    root, _ = output
    where = re.escape(str(root))
    with pytest.raises(
        SplitNotFound,
        match=rf"{where}/val: split 'val' has no images; splits with images: "
        r"train \(12 images\), test \(4 images\)",
    ):
        read_split(str(root), "val")
    with pytest.raises(SplitNotFound, match=rf"{where}/nope: split 'nope' is not in the manifest"):
        read_split(str(root), "nope")


def test_a_changed_file_is_named_by_what_differs(tmp_path):
    write_output(tmp_path)
    path = tmp_path / "test" / "part-00000-0.parquet"
    original = path.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(flipped))
    read_split(str(tmp_path), "train", verify=True)  # untouched split still fine
    with pytest.raises(ShardMismatch, match="sha256"):
        read_split(str(tmp_path), "test", verify=True)
    pq.write_table(pq.read_table(io.BytesIO(original)).slice(1), path)
    with pytest.raises(ShardMismatch, match=r"part-00000-0.parquet: \d+ bytes, the manifest says \d+ \(truncated"):
        read_split(str(tmp_path), "test")
    path.write_bytes(original)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["splits"]["test"]["files"][0]["rows"] = 5
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ShardMismatch, match="4 rows, the manifest says 5"):
        read_split(str(tmp_path), "test")
    path.unlink()
    with pytest.raises(ShardMismatch, match="part-00000-0.parquet: listed in"):
        read_split(str(tmp_path), "test")


# ----------------------------------------------------------------------------- pairs and batches


def test_one_pair_per_caption_image_major(train):
    data = PairDataset(train, AUG)
    assert len(data) == 5 * N_TRAIN - 2  # one image has 3 captions
    rows = [data.pairs.row(i) for i in range(len(data))]
    images = [r["image_index"] for r in rows]
    assert images == sorted(images) and images.count(SHORT) == 3 and images.count(0) == 5
    expected = [t for per_image in train.column("caption_tokens").to_pylist() for t in per_image]
    assert [r["tokens"] for r in rows] == expected


def test_train_batch_matches_the_model_contract(train):
    loader = make_train_loader(train, AUG, batch_size=8)
    batches = list(loader)
    assert len(batches) == (5 * N_TRAIN - 2) // 8  # drop_last
    batch = batches[0]
    assert set(batch) == {"images", "tokens", "lengths", "image_ids", "scene_ids"}
    assert batch["images"].dtype == torch.float32 and batch["images"].shape == (8, 3, 32, 32)
    assert batch["tokens"].dtype == torch.long and batch["tokens"].shape == (8, int(batch["lengths"].max()))
    for key in ("lengths", "image_ids", "scene_ids"):
        assert batch[key].dtype == torch.long and batch[key].shape == (8,)
    for tokens, length in zip(batch["tokens"], batch["lengths"], strict=True):
        assert length >= 1 and (tokens[:length] > 0).all() and (tokens[length:] == 0).all()


def test_captions_of_one_image_share_its_id_and_image(train):
    data = PairDataset(train, AUG, train=False)  # eval transform: same picture for every caption
    samples = data.__getitems__(range(5))
    assert {s["image_index"] for s in samples} == {0}
    assert all(torch.equal(s["image"], samples[0]["image"]) for s in samples)
    batch = collate_pairs(data.__getitems__(range(len(data))))
    assert batch["image_ids"].tolist() == caption_image_index(train).tolist()


def test_padding_lengths_caps_and_the_unk_rule():
    samples = [
        {"tokens": [5, 6, 7], "image_index": 0, "scene_id": 1},
        {"tokens": [8], "image_index": 0, "scene_id": 1},
        {"tokens": [], "image_index": 3, "scene_id": -1},
    ]
    batch = collate_pairs(samples)
    assert batch["tokens"].tolist() == [[5, 6, 7], [8, 0, 0], [1, 0, 0]]
    assert batch["lengths"].tolist() == [3, 1, 1]
    assert set(batch) == {"tokens", "lengths", "image_ids", "scene_ids"}  # no images in, no images out
    capped = collate_pairs(samples, max_tokens=2)
    assert capped["tokens"].tolist() == [[5, 6], [8, 0], [1, 0]] and capped["lengths"].tolist() == [2, 1, 1]


def test_empty_caption_becomes_one_unk(train):
    batches = list(eval_captions(train, batch_size=7))
    tokens = torch.cat([torch.nn.functional.pad(b["tokens"], (0, 4 - b["tokens"].shape[1])) for b in batches])
    lengths = torch.cat([b["lengths"] for b in batches])
    dot = 5 * DOT + 4  # the last caption of image DOT
    assert tokens[dot].tolist() == [1, 0, 0, 0] and lengths[dot] == 1
    assert (lengths >= 1).all()


def test_eval_captions_in_order_with_their_images(train):
    batches = list(eval_captions(train, batch_size=7))
    index = caption_image_index(train)
    assert index.dtype == torch.long and len(index) == 5 * N_TRAIN - 2
    assert torch.cat([b["image_ids"] for b in batches]).tolist() == index.tolist()
    assert index[:6].tolist() == [0, 0, 0, 0, 0, 1] and (index == SHORT).sum() == 3
    got = [row[:n].tolist() for b in batches for row, n in zip(b["tokens"], b["lengths"], strict=True)]
    expected = [t or [1] for per_image in train.column("caption_tokens").to_pylist() for t in per_image]
    assert got == expected
    assert all("images" not in b and "input_ids" not in b for b in batches)


def test_eval_images_in_order_and_deterministic(train):
    batches = list(eval_images(train, AUG, batch_size=5))
    assert [len(b["image_ids"]) for b in batches] == [5, 5, 2]
    images = torch.cat([b["images"] for b in batches])
    assert images.shape == (N_TRAIN, 3, 24, 24) and images.dtype == torch.float32
    assert torch.cat([b["image_ids"] for b in batches]).tolist() == list(range(N_TRAIN))
    again = torch.cat([b["images"] for b in eval_images(train, AUG, batch_size=12)])
    assert torch.equal(images, again)
    assert not torch.equal(images[0], images[1])  # rows are different pictures


def test_scene_ids_from_the_manifest_agree_across_splits(output, train):
    root, manifest = output
    assert scene_index(manifest) == scene_index(train) == {"airport": 0, "beach": 1, "forest": 2}
    scenes = image_scenes(train)
    assert scenes[NO_SCENE] is None and scenes[1] == "beach"
    ids = torch.cat([b["scene_ids"] for b in eval_images(train, AUG, batch_size=12)])
    assert ids.tolist() == [-1 if s is None else SCENES.index(s) for s in scenes]
    test = read_split(str(root), "test")  # only "beach" there: its id is still the manifest's
    assert {b["scene_ids"].unique().item() for b in eval_captions(test)} == {1}
    assert set(torch.cat([b["scene_ids"] for b in eval_captions(test.replace_schema_metadata())]).tolist()) == {0}


def test_shuffle_is_deterministic_for_a_seed(train):
    def epoch(loader):
        return [(b["image_ids"].tolist(), b["tokens"].tolist(), b["images"]) for b in loader]

    def same(a, b):
        return all(x[:2] == y[:2] and torch.equal(x[2], y[2]) for x, y in zip(a, b, strict=True))

    first, again = make_train_loader(train, AUG, 8, seed=1), make_train_loader(train, AUG, 8, seed=1)
    one, two = epoch(first), epoch(first)  # two epochs of one loader
    assert same(one, epoch(again)) and same(two, epoch(again))
    assert not same(one, two)  # a new order and new augmentations each epoch
    assert not same(one, epoch(make_train_loader(train, AUG, 8, seed=2)))
    in_order = epoch(make_train_loader(train, AUG, 8, shuffle=False))
    assert [i for ids, _, _ in in_order for i in ids] == caption_image_index(train).tolist()[:56]
    workers = make_train_loader(train, AUG, 8, seed=1, num_workers=1)
    assert same(one, epoch(workers))  # augmentation seeds come from the sampler, not the workers


def test_sampler_epochs():
    sampler = PairSampler(10, seed=3)
    a = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == a and sorted(i for i, _ in a) == list(range(10))
    assert list(sampler) != a


def test_ray_path_builds_the_same_batches(train):
    """Arrow pair rows through batch_from_rows == the DataLoader's samples with the same seeds."""
    data = PairDataset(train, AUG)
    keys = [(i, 1000 + i) for i in (0, 9, 20, 33)]
    expected = collate_pairs(data.__getitems__(keys))
    rows = pairs_from_arrow(train)
    picked = [rows[i] for i, _ in keys]
    got = collate_pairs(decode_pairs(picked, train_transform(AUG), [s for _, s in keys]))
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    # a Ray batch: a slice of images, numbered by their ids' hash, scenes from the manifest
    part = explode_pairs(train.slice(4, 3).replace_schema_metadata(), scenes=SCENES, image_index=BY_IMAGE_ID)
    ids = train.column("image_id").to_pylist()[4:7]
    assert part.column("image_index").to_pylist() == [image_number(i) for i in ids for _ in range(5)]
    assert part.column("scene_id").to_pylist() == [1] * 5 + [-1] * 5 + [0] * 5
    assert part.column("caption").to_pylist() == list(range(5)) * 3
    b1, b2 = batch_from_arrow(part, AUG, rng=7), batch_from_rows(part.to_pylist(), AUG, np.random.default_rng(7))
    assert b1["images"].shape == (15, 3, 32, 32) and torch.equal(b1["images"], b2["images"])
    assert explode_pairs(train.slice(4, 3), first_row=4).column("image_index").to_pylist()[::5] == [4, 5, 6]


def test_bert_ids_path(tmp_path):
    manifest = write_output(tmp_path, with_ids=True)
    assert manifest["tokenizer"] == "tiny"
    train = read_split(str(tmp_path), "train")
    batch = next(iter(make_train_loader(train, AUG, batch_size=6, shuffle=False)))
    assert {"input_ids", "attention_mask"} <= set(batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (6, LONG_IDS)
    rows = train.column("caption_input_ids").to_pylist()
    expected = rows[0] + rows[1][:1]
    for row, m, want in zip(ids, mask, expected, strict=True):
        n = len(want)
        assert row[:n].tolist() == want and (row[n:] == 0).all() and m.tolist() == [1] * n + [0] * (LONG_IDS - n)
    short = collate_pairs([{"tokens": [2], "input_ids": rows[0][0], "image_index": 0, "scene_id": 0}], max_input_ids=8)
    assert short["input_ids"].tolist() == [[2, 7, 7, 7, 7, 7, 7, 3]]  # keeps [SEP]
    captions = list(eval_captions(train, batch_size=100))[0]
    assert captions["input_ids"].shape[0] == 5 * N_TRAIN - 2 and "attention_mask" in captions


def test_rows_from_the_prepare_processor_load(tmp_path):
    """Real prepare rows (ImageBatchProcessor, no Ray) go through the same functions."""
    from rsray.data.formats import Record
    from rsray.data.prepare import ImageBatchProcessor, record_row
    from rsray.data.text import Vocabulary

    captions = ("two planes at the airport.", ".", "a red plane", "planes", "airport near a road")
    Image.new("RGB", (50, 40), "blue").save(tmp_path / "a_1.png")
    records = pa.Table.from_pylist([record_row(Record("a_1.png", str(tmp_path / "a_1.png"), "train", "a", captions))])
    vocab = Vocabulary.build(captions, min_count=1)
    table, rejected = ImageBatchProcessor(40, "jpeg", 90, vocab.to_dict(), None, None)(records)
    assert not rejected
    batch = batch_from_rows(pairs_from_arrow(table, scenes=["a"]), AUG, rng=0)
    assert batch["images"].shape == (5, 3, 32, 32) and batch["lengths"].tolist()[1] == 1
    assert batch["tokens"][1, 0] == 1 and batch["scene_ids"].tolist() == [0] * 5
