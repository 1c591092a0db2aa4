"""WebDataset samples as candidate rows, without Ray: captions from .txt or .json, the same reasons
as the record readers, the validation fold from a hash of the key, the shard listing."""

import hashlib
import io
import json
import tarfile
from collections import Counter
from dataclasses import asdict

import pyarrow as pa
import pytest
from PIL import Image

from rsray import storage
from rsray.config import DataConfig, ValidationConfig, load_config
from rsray.data.synthetic.webdataset import corpus_shards, sample_files, write_corpus
from rsray.data.text import Vocabulary, word_counts
from rsray.data.webdataset import (
    CANDIDATE_SCHEMA,
    CAPTIONS,
    IMAGE,
    CandidateRows,
    captions_and_scene,
    fold_of,
    listing_lines,
    shard_files,
    split_of,
)

FIVE = ["two red planes at the airport", "a runway", "planes near a terminal", "an airport", "grey tarmac"]


def jpeg(size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, format="JPEG")
    return out.getvalue()


def rows(cfg: DataConfig | None = None, max_pixels: int = 64_000_000) -> CandidateRows:
    cfg = cfg or DataConfig(format="webdataset", scenes="column")
    return CandidateRows(asdict(cfg), "/corpus", 24, "jpeg", 90, max_pixels, 2000)


def block(samples: list[dict]) -> pa.Table:
    """Samples as read_webdataset's block holds them: a DataFrame of every file suffix seen, where
    a sample without one of them holds NaN (a Python object column, as Ray Data keeps it)."""
    import pandas as pd
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(pd.DataFrame.from_records(samples)).to_arrow()


def sample(key="0001", **files) -> dict:
    return {"__key__": key, "__url__": "/corpus/part/a.tar", **files}


def test_txt_captions_are_its_lines_and_json_gives_a_list_a_field_or_one_caption():
    cfg = DataConfig(format="webdataset")
    assert captions_and_scene(sample(txt=b"\n a\n b \n\n"), cfg) == (("a", "b"), None, None)
    assert captions_and_scene(sample(json=b'["a", " b"]'), cfg) == (("a", "b"), None, None)
    meta = json.dumps({"captions": ["x", "y"], "scene": "airport"}).encode()
    assert captions_and_scene(sample(json=meta), cfg) == (("x", "y"), "airport", None)
    text_field = DataConfig(caption_field="text")
    assert captions_and_scene(sample(json=b'{"text": "one"}'), text_field) == (("one",), None, None)
    # the .txt wins over the .json's captions; the scene still comes from the .json
    assert captions_and_scene(sample(txt=b"t", json=meta), cfg) == (("t",), "airport", None)


@pytest.mark.parametrize(
    "files, reason",
    [
        ({}, "no captions: the sample has no .txt or .json file"),
        ({"json": b"{not json"}, "0001.json is not valid JSON"),
        ({"json": b'{"other": 1}'}, '0001.json: its field "captions" is not a caption or a list of captions'),
        ({"json": b"[1, 2]"}, "0001.json: its list is not a caption or a list of captions"),
    ],
)
def test_a_sample_without_usable_caption_text_says_why(files, reason):
    assert captions_and_scene(sample(**files), DataConfig())[2].startswith(reason)


def test_a_good_sample_is_a_resized_row_named_relative_to_the_root():
    row = rows()(block([sample(jpg=jpeg(), txt="\n".join(FIVE).encode())]))
    assert row.schema.equals(CANDIDATE_SCHEMA)
    (got,) = row.to_pylist()
    assert got["reason"] is None and got["rejected_at"] is None
    assert got["shard"] == "part/a.tar" and got["source_path"] == "part/a.tar#0001"
    assert got["captions"] == FIVE and got["split"] == split_of("0001", ValidationConfig())
    assert Image.open(io.BytesIO(got["image"])).size == (24, 24)


def test_refused_samples_carry_the_record_readers_reasons_and_where_they_were_refused():
    five = "\n".join(FIVE).encode()
    batch = [
        sample("a", txt=five),  # no image
        sample("b", jpg=jpeg(), txt=b"only one caption"),
        sample("c", jpg=b"not an image", txt=five),
        sample("d", png=jpeg((100, 100)), txt=five),  # any image suffix; over the pixel limit below
        sample("e", jpg=jpeg(), txt=five.replace(b"a runway", b"!!!")),
    ]
    got = {r["image_id"]: r for r in rows(max_pixels=5000)(block(batch)).to_pylist()}
    assert got["a"]["reason"].startswith("no image: the sample has none of .jpg, .jpeg, .png")
    assert got["b"]["reason"] == "expected 5 captions, got 1"
    assert got["c"]["reason"].startswith("cannot decode image")
    assert got["d"]["reason"].startswith("image too large")
    assert got["e"]["reason"] == "caption 2 has no words (only symbols or invisible characters)"
    assert [got[k]["rejected_at"] for k in "abcde"] == [CAPTIONS, CAPTIONS, IMAGE, IMAGE, CAPTIONS]
    assert all(got[k]["image"] == b"" for k in "abcde")


def test_the_fold_is_a_hash_of_seed_and_key_so_any_machine_and_order_agree():
    for key in ("key-17", "00000003", "a/b/c", "x"):
        digest = hashlib.blake2b(b"3\x00" + key.encode(), digest_size=8).digest()
        assert fold_of(key, 7, 3) == int.from_bytes(digest, "big") % 7, key
    folds = Counter(fold_of(f"{i:08d}", 5, 0) for i in range(5000))
    assert sorted(folds) == [0, 1, 2, 3, 4] and min(folds.values()) > 900  # near 1/5 each
    assert split_of("key-17", ValidationConfig(folds=5, fold=fold_of("key-17", 5, 3), seed=3)) == "val"
    assert split_of("key-17", ValidationConfig(folds=5, fold=(fold_of("key-17", 5, 3) + 1) % 5, seed=3)) == "train"


def test_the_scene_rule_applies_to_keys_as_to_file_names():
    meta = json.dumps({"captions": FIVE, "scene": "harbor"}).encode()
    column = rows(DataConfig(format="webdataset", scenes="column"))(block([sample(jpg=jpeg(), json=meta)]))
    assert column.to_pylist()[0]["scene"] == "harbor"
    none = rows(DataConfig(format="webdataset", scenes="none"))(block([sample(jpg=jpeg(), json=meta)]))
    assert none.to_pylist()[0]["scene"] is None


def test_shards_are_listed_once_by_pattern_with_sizes_and_times(tmp_path):
    write_corpus(tmp_path / "a", n_images=4, per_shard=2, image_size=32)
    (tmp_path / "a" / "notes.txt").write_text("not a shard")
    (tmp_path / "a" / "more").mkdir()
    (tmp_path / "a" / "more" / "x.tar").write_bytes(b"")
    root, infos = shard_files(DataConfig(root=str(tmp_path / "a"), shards="*.tar"), None)
    names = [line.split(":")[0] for line in listing_lines(root, infos)]
    assert names == ["corpus-000000.tar", "corpus-000001.tar", "more/x.tar"]
    root, infos = shard_files(DataConfig(root=str(tmp_path / "a"), shards="corpus-*.tar"), None)
    assert len(infos) == 2 and root == storage.resolve(tmp_path / "a")


def test_the_synthetic_corpus_keeps_a_samples_files_adjacent_and_is_deterministic():
    (_, data), *_ = corpus_shards(3, per_shard=3, image_size=32)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == [f"0000000{i}.{suffix}" for i in range(3) for suffix in ("jpg", "txt")]
    assert data == next(corpus_shards(3, per_shard=3, image_size=32))[1]
    assert json.loads(sample_files(4, 0, 32, "json")[1][1])["scene"]


def test_vocabulary_from_summed_counts_is_the_vocabulary_of_the_captions():
    captions = FIVE * 3 + ["a lone word"]
    halves = word_counts(captions[:7]) + word_counts(captions[7:])
    for min_count in (1, 2, 3):
        for rule in ("drop", "unk"):
            assert Vocabulary.from_counts(halves, min_count, rule) == Vocabulary.build(captions, min_count, rule)


def test_a_webdataset_config_needs_fold_validation_and_a_shard_pattern():
    from rsray.config_tree import ConfigError

    with pytest.raises(ConfigError, match="data.validation.mode: a webdataset corpus has no val split of its own"):
        load_config("presets/cpu-tiny", ["data.format=webdataset", "data.validation.mode=fixed"])
    with pytest.raises(ConfigError, match="data.shards: name the tar files under data.root"):
        load_config("presets/cpu-tiny", ["data.format=webdataset", "data.validation.mode=folds", "data.shards="])
