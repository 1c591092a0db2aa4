"""Dataset statistics on a handmade set whose answers are known."""

from __future__ import annotations

from rsray.data.formats import Record
from rsray.data.stats import dataset_statistics, format_statistics


def make(name: str, split: str, scene: str | None, captions: list[str]) -> Record:
    return Record(name, f"images/{name}", split, scene, tuple(captions))


# caption lengths in words ("." is no word): 2,3,3,5,6 | 2,2,2,2,2 | 10,1 | 3,3,3
RECORDS = [
    make(
        "beach_1.jpg",
        "train",
        "beach",
        ["sandy beach", "a sandy beach", "the sandy beach .", "a b c d e", "one two three four five six"],
    ),
    make("beach_2.jpg", "train", "beach", ["sandy beach"] * 5),
    make("00001.jpg", "val", None, ["river " * 10, "river"]),
    make("port_3.jpg", "test", "port", ["boats in harbour"] * 3),
]


def test_statistics_known_answers():
    stats = dataset_statistics(RECORDS)
    assert stats["splits"] == {
        "train": {"images": 2, "captions": 10},
        "val": {"images": 1, "captions": 2},
        "test": {"images": 1, "captions": 3},
    }
    assert stats["scenes"] == {"beach": 2, "port": 1}
    assert stats["images_without_scene"] == 1
    lengths = [2, 3, 3, 5, 6] + [2] * 5 + [10, 1] + [3] * 3
    assert stats["caption_length"]["min"] == 1 and stats["caption_length"]["max"] == 10
    assert stats["caption_length"]["mean"] == round(sum(lengths) / len(lengths), 2)
    assert stats["caption_length"]["median"] == 3.0
    assert 6 < stats["caption_length"]["p95"] <= 10
    # train content words: sandy x8, beach x8, b c d e one two three four five six x1
    assert stats["vocab_size"] == 2 + 2
    assert stats["vocab_splits"] == ["train"] and stats["vocab_min_count"] == 5


def test_vocab_splits_and_min_count():
    stats = dataset_statistics(RECORDS, vocab_splits=("train", "val", "test"), vocab_min_count=3)
    assert stats["vocab_size"] == 2 + 5  # sandy, beach, river (11), boats, harbour (3 each)
    assert stats["vocab_splits"] == ["train", "val", "test"]


def test_format_statistics_is_readable():
    text = format_statistics(dataset_statistics(RECORDS))
    assert "train" in text and "total" in text and "beach" in text
    assert "1 images without a scene" in text and "4 entries" in text
    assert dataset_statistics([])["splits"] == {}
    format_statistics(dataset_statistics([]))  # an empty dataset still prints


def test_format_statistics_of_a_manifest_summary():
    """`rsray data inspect` on a prepared output passes fewer keys (no caption lengths)."""
    text = format_statistics(
        {"splits": {"train": {"images": 3, "captions": 15}}, "scenes": {"beach": 3}, "vocab_size": 12, "rejected": 1}
    )
    assert "rejected images: 1" in text and "12 entries" in text and "caption length" not in text
