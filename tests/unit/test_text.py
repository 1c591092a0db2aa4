"""Words, the word vocabulary and the local BERT-family tokenizer."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from rsray.data.text import (
    PAD_ID,
    STOP_WORDS,
    UNK_ID,
    Vocabulary,
    build_vocabulary,
    content_words,
    load_tokenizer,
    words,
)


def test_words_lowercase_and_strip_punctuation():
    assert words("Many planes, parked at the AIRPORT .") == ["many", "planes", "parked", "at", "the", "airport"]
    assert words("  a  blue-green sea ;  ( ) the water's edge!") == ["a", "blue-green", "sea", "the", "water", "edge"]
    assert words("...") == [] and words("") == []


def test_stop_words_dropped():
    assert 120 <= len(STOP_WORDS) <= 200
    assert not {"near", "beside", "around", "across", "along", "behind"} & STOP_WORDS  # where things are
    assert {"the", "a", "is", "are", "of", "and", "there", "with"} <= STOP_WORDS
    assert not {"two", "red", "large", "planes", "many"} & STOP_WORDS  # numbers, colours, sizes are content
    assert content_words("There are two red planes in the airport.") == ["two", "red", "planes", "airport"]


CAPTIONS = ["two planes at the airport"] * 5 + ["a plane at the airport"] * 5 + ["one boat"] * 4 + ["zebra"]


def test_vocabulary_order_min_count_and_specials():
    vocab = Vocabulary.build(CAPTIONS, min_count=5)
    # airport 10; planes, plane, two 5 each (alphabetical); boat/one seen 4 times, zebra once: dropped
    assert vocab.itos == ["<pad>", "<unk>", "airport", "plane", "planes", "two"]
    assert vocab.stoi["<pad>"] == PAD_ID == 0 and vocab.stoi["<unk>"] == UNK_ID == 1
    assert len(vocab) == 6
    assert len(Vocabulary.build(CAPTIONS, min_count=1)) == 2 + 7


def test_vocabulary_is_deterministic():
    shuffled = CAPTIONS[::-1]
    assert Vocabulary.build(shuffled).itos == Vocabulary.build(CAPTIONS).itos


def test_encode_unknown_and_stop_words():
    vocab = Vocabulary.build(CAPTIONS, min_count=5)
    assert vocab.encode("Two PLANES near a boat, airport.") == [5, 4, UNK_ID, UNK_ID, 2]  # near: content, unseen
    assert vocab.encode("the of and") == []


def test_stop_words_kept_as_unk_is_swans_release_rule():
    """stopwords=unk: the same vocabulary (no stop words in it), but a stop word stays in the
    sequence as <unk>, in place; so the caption's last word can be an <unk>."""
    dropped = Vocabulary.build(CAPTIONS, min_count=5)
    kept = Vocabulary.build(CAPTIONS, min_count=5, stopwords="unk")
    assert kept.itos == dropped.itos and kept != dropped
    assert kept.encode("Two PLANES near a boat, at the airport.") == [5, 4, UNK_ID, UNK_ID, UNK_ID, UNK_ID, UNK_ID, 2]
    assert kept.encode("planes of the") == [4, UNK_ID, UNK_ID]  # last-word pooling reads an <unk>
    assert Vocabulary.from_dict(kept.to_dict()) == kept
    legacy = {"min_count": 5, "words": dropped.itos}  # a manifest written before the switch
    assert Vocabulary.from_dict(legacy) == dropped
    with pytest.raises(ValueError, match="stopwords must be drop or unk"):
        Vocabulary(dropped.itos, stopwords="keep")


def test_save_load_round_trip(tmp_path):
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded == vocab and loaded.encode("one boat zebra") == vocab.encode("one boat zebra")
    assert Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab
    with pytest.raises(ValueError, match="<pad>"):
        Vocabulary(["airport", "<unk>"])


def test_build_vocabulary_uses_chosen_splits():
    records = [
        SimpleNamespace(split="train", captions=("harbour boats",) * 5),
        SimpleNamespace(split="test", captions=("desert dunes",) * 5),
    ]
    assert build_vocabulary(records).itos[2:] == ["boats", "harbour"]
    assert build_vocabulary(records, splits=("train", "test")).itos[2:] == ["boats", "desert", "dunes", "harbour"]


def test_tokenizer_loads_from_local_folder(tiny_tokenizer):
    tokenizer = load_tokenizer(tiny_tokenizer)
    ids = tokenizer("two planes at the airport.")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "[CLS]",
        "two",
        "plane",
        "##s",
        "at",
        "the",
        "air",
        "##port",
        ".",
        "[SEP]",
    ]


def test_tokenizer_missing_path_errors(tmp_path):
    with pytest.raises(ValueError, match="no-such-tokenizer"):
        load_tokenizer(tmp_path / "no-such-tokenizer")
