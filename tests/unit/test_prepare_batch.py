"""The prepare stage's per-batch work without Ray: rows for good images, reasons for bad ones."""

import io

import pyarrow as pa
from PIL import Image

from rsray.config import load_config
from rsray.data.formats import Record
from rsray.data.prepare import ImageBatchProcessor, input_fingerprint, record_row, shard_schema
from rsray.data.text import Vocabulary

CAPTIONS = ("two red planes at the airport.",) * 5


def batch_of(tmp_path, names):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "good_1.png")
    records = [Record(n, str(tmp_path / n), "train", "good", CAPTIONS) for n in names]
    return pa.Table.from_pylist([record_row(r) for r in records])


def processor(tokenizer=None):
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    return ImageBatchProcessor(24, "png", 95, vocab.to_dict(), tokenizer, None)


def test_good_rows_are_shard_rows_and_bad_ones_are_reasons(tmp_path):
    table, rejected = processor()(batch_of(tmp_path, ["good_1.png", "gone_1.png"]))
    assert table.schema.equals(shard_schema(with_input_ids=False))
    assert table.num_rows == 1
    row = table.to_pylist()[0]
    assert row["image_id"] == "good_1.png" and row["captions"] == list(CAPTIONS)
    assert row["caption_tokens"] == [[5, 4, 3, 2]] * 5  # two red planes airport (ids alphabetical on ties)
    assert Image.open(io.BytesIO(row["image"])).size == (24, 24)
    assert rejected == [
        {
            "image_id": "gone_1.png",
            "split": "train",
            "path": str(tmp_path / "gone_1.png"),
            "reason": f"image file not found: {tmp_path / 'gone_1.png'}",
        }
    ]


def test_tokenizer_adds_input_ids(tmp_path, tiny_tokenizer):
    table, _ = processor(str(tiny_tokenizer))(batch_of(tmp_path, ["good_1.png"]))
    assert table.schema.equals(shard_schema(with_input_ids=True))
    ids = table.to_pylist()[0]["caption_input_ids"]
    assert len(ids) == 5 and ids[0][0] == 2 and ids[0][-1] == 3  # [CLS] ... [SEP]


def test_fingerprint_follows_config_and_image_files(tmp_path):
    batch_of(tmp_path, [])
    records = [Record("good_1.png", str(tmp_path / "good_1.png"), "train", None, CAPTIONS)]
    base = input_fingerprint(load_config(None), records, records)
    assert base == input_fingerprint(load_config(None, ["prepare.output=/elsewhere"]), records, records)  # not an input
    assert base != input_fingerprint(load_config(None, ["prepare.image_size=64"]), records, records)
    Image.new("RGB", (41, 30), "blue").save(tmp_path / "good_1.png")
    assert base != input_fingerprint(load_config(None), records, records)
