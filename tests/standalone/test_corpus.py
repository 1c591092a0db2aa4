"""A WebDataset corpus prepared by Ray Data's tasks from moto's S3 and from local tar files: bad
samples refused with their reasons, a duplicated key kept once, the same shards from both places,
and an unchanged corpus prepared again as nothing to do."""

from __future__ import annotations

import io
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rsray import storage
from rsray.config import load_config
from rsray.data.manifest import read_rejections
from rsray.data.prepare import prepare
from rsray.data.synthetic.webdataset import corpus_shards, sample_files, tar_bytes
from rsray.data.text import Vocabulary

pytestmark = pytest.mark.integration

GOOD, PER_SHARD, SIZE = 40, 10, 48
FIVE = "\n".join(["a grey runway", "two planes", "a terminal building", "planes near a runway", "an airport"])


def _huge_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (300, 300), "green").save(out, format="PNG")
    return out.getvalue()


def defects_shard() -> bytes:
    """One more shard: a corrupt image, a sample without captions, a key already in the first
    shard and an image over the pixel limit (90,000 pixels; the test allows 50,000)."""
    return tar_bytes(
        [
            ("bad-image.jpg", b"not a jpeg at all"),
            ("bad-image.txt", FIVE.encode()),
            *sample_files(3, 0, SIZE),  # key 00000003 again: a duplicate
            ("huge.png", _huge_png()),
            ("huge.txt", FIVE.encode()),
            ("no-caption.jpg", sample_files(7, 0, SIZE)[0][1]),
        ]
    )


EXPECTED_REASONS = {
    "bad-image": "cannot decode image",
    "00000003": "duplicate image_id '00000003' (kept from corpus-000000.tar)",
    "huge": "image too large",
    "no-caption": "no captions: the sample has no .txt or .json file",
}


def shards() -> list[tuple[str, bytes]]:
    return [*corpus_shards(GOOD, PER_SHARD, SIZE), ("corpus-000099.tar", defects_shard())]


def corpus_config(root: str, output: str):
    return load_config(
        "presets/cpu-tiny",
        [
            "data.name=corpus",
            "data.format=webdataset",
            f"data.root={root}",
            "data.scenes=none",
            "data.validation.mode=folds",
            "data.vocab_min_count=2",
            f"prepare.output={output}",
            "prepare.image_size=32",
            "prepare.max_image_pixels=50000",
            "prepare.max_reject_fraction=0.5",
        ],
    )


def shard_image_ids(output: str, split: dict) -> list[str]:
    """The image ids in a split's shards, in file order (the manifest lists only the files)."""
    out = storage.resolve(output)
    paths = [out.join(*f["path"].split("/")).path for f in split["files"]]
    tables = [pq.read_table(path, filesystem=out.fs, columns=["image_id"]) for path in paths]
    return [image_id for table in tables for image_id in table["image_id"].to_pylist()]


@pytest.fixture(scope="module")
def on_s3(ray_cluster, s3_endpoint, s3_bucket):
    """The corpus uploaded to moto's S3, prepared from there into S3."""
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for name, data in shards():
        client.put_object(Bucket=s3_bucket, Key=f"corpus/shards/{name}", Body=data)
    cfg = corpus_config(f"s3://{s3_bucket}/corpus/shards", f"s3://{s3_bucket}/corpus/prepared")
    return cfg, prepare(cfg)


def test_a_corpus_on_s3_is_prepared_with_every_refusal_and_its_reason(on_s3):
    cfg, result = on_s3
    manifest = result.manifest
    assert manifest["counts"] == {"read": GOOD + 4, "written": GOOD, "rejected": 4}
    rejected = read_rejections(result.output)
    reasons = {r["image_id"]: r["reason"] for r in rejected}
    assert set(reasons) == set(EXPECTED_REASONS)
    for key, words in EXPECTED_REASONS.items():
        assert reasons[key].startswith(words), (key, reasons[key])
    paths = {r["image_id"]: r["path"] for r in rejected}
    kinds = {g["reason"]: g["count"] for g in manifest["rejections"]["by_reason"]}
    assert kinds == {"cannot decode image": 1, "duplicate image_id '…'": 1, "image too large": 1, "no captions": 1}
    assert paths["huge"] == "corpus-000099.tar#huge"
    splits = manifest["splits"]
    assert splits["test"]["images"] == 0
    assert splits["train"]["images"] + splits["val"]["images"] == GOOD
    assert 0 < splits["val"]["images"] < GOOD / 2  # fold 0 of 5, drawn by key
    kept = shard_image_ids(result.output, splits["train"]) + shard_image_ids(result.output, splits["val"])
    assert "00000003" in kept and len(kept) == len(set(kept)) == GOOD  # the duplicate kept from its first shard


def test_shard_rows_hold_the_resized_images_and_the_corpus_vocabulary_tokens(on_s3):
    cfg, result = on_s3
    out = storage.resolve(result.output)
    vocab = Vocabulary.from_dict(result.manifest["vocab"])
    first = result.manifest["splits"]["train"]["files"][0]["path"]
    table = pq.read_table(out.join(*first.split("/")).path, filesystem=out.fs)
    row = table.to_pylist()[0]
    assert Image.open(io.BytesIO(row["image"])).size == (32, 32)
    assert row["caption_tokens"] == [vocab.encode(c) for c in row["captions"]]
    assert row["source_path"] == f"corpus-{int(row['image_id']) // PER_SHARD:06d}.tar#{row['image_id']}"


def test_the_same_corpus_as_local_tar_files_gives_byte_identical_shards(on_s3, tmp_path):
    _, from_s3 = on_s3
    folder = tmp_path / "shards"
    folder.mkdir()
    for name, data in shards():
        (folder / name).write_bytes(data)
    local = prepare(corpus_config(str(folder), str(tmp_path / "prepared")))
    files = {split: info["files"] for split, info in local.manifest["splits"].items()}
    assert files == {split: info["files"] for split, info in from_s3.manifest["splits"].items()}
    assert local.manifest["vocab"] == from_s3.manifest["vocab"]
    assert local.manifest["rejections"] == from_s3.manifest["rejections"]  # the file's checksum too


def test_an_unchanged_corpus_prepares_again_as_nothing_to_do(on_s3):
    cfg, first = on_s3
    again = prepare(cfg)
    assert again.skipped and again.manifest == first.manifest


def test_a_karpathy_dataset_whose_files_are_on_s3_prepares_as_from_a_local_folder(
    prepared, s3_endpoint, s3_bucket, tmp_path
):
    """The session's tiny sample (annotations and images) uploaded to S3 and prepared from there:
    the same records, splits, vocabulary and shard rows as from the local folder; only each row's
    source path says where its image was read."""
    from rsray.data.manifest import read_manifest

    local = read_manifest(prepared)
    folder = local["config"]["data"]["root"]
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for path in Path(folder).rglob("*"):
        if path.is_file():
            client.upload_file(str(path), s3_bucket, f"sample-src/{path.relative_to(folder).as_posix()}")
    root = f"s3://{s3_bucket}/sample-src"
    cfg = load_config("presets/cpu-tiny", [f"data.root={root}", f"prepare.output={tmp_path / 'from-s3'}"])
    from_s3 = prepare(cfg).manifest
    for key in ("counts", "vocab", "rejections", "scenes"):
        assert from_s3[key] == local[key], key
    for split, info in local["splits"].items():  # the same files, rows and captions (source_path differs)
        got = from_s3["splits"][split]
        assert (got["images"], got["captions"]) == (info["images"], info["captions"])
        assert [(f["path"], f["rows"]) for f in got["files"]] == [(f["path"], f["rows"]) for f in info["files"]]
        assert shard_image_ids(str(tmp_path / "from-s3"), got) == shard_image_ids(prepared, info)
    first = local["splits"]["train"]["files"][0]["path"]
    a, b = pq.read_table(Path(prepared) / first), pq.read_table(tmp_path / "from-s3" / first)
    assert a.drop_columns(["source_path"]).equals(b.drop_columns(["source_path"]))
    assert b["source_path"][0].as_py() == f"{root}/images/{b['image_id'][0].as_py()}"


def test_a_tar_whose_sample_files_are_apart_is_one_line_naming_it(ray_cluster, tmp_path):
    """Ray Data's reader cannot tell such samples apart and stops with a long trace: prepare says
    which tar and which key, in one line."""
    from rsray.config_tree import ConfigError

    first, second = sample_files(0, 0, SIZE), sample_files(1, 0, SIZE)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "apart.tar").write_bytes(tar_bytes([first[0], second[0], first[1], second[1]]))
    with pytest.raises(ConfigError) as refused:
        prepare(corpus_config(str(tmp_path / "shards"), str(tmp_path / "out")))
    message = str(refused.value)
    assert "\n" not in message
    assert f"data.shards: {tmp_path / 'shards' / 'apart.tar'}: the files of sample '00000000' are not next" in message
