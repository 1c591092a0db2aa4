"""The digest a run's MLflow dataset input carries: which shards, exactly, it used."""

from __future__ import annotations

import copy

from rsray.data.verify import data_digest, dataset_profile


def manifest() -> dict:
    def files(split: str, n: int) -> list[dict]:
        return [{"path": f"{split}/part-{i}", "rows": 3, "sha256": f"{split}{i}" * 8, "bytes": 100} for i in range(n)]

    return {
        "dataset": "rsitmd",
        "splits": {
            "train": {"images": 6, "captions": 30, "files": files("train", 2)},
            "val": {"images": 3, "captions": 15, "files": files("val", 1)},
            "test": {"images": 3, "captions": 15, "files": files("test", 1)},
        },
        "vocab": {"min_count": 5, "words": ["<pad>", "<unk>", "plane"]},
    }


def test_the_digest_follows_the_shards_and_the_tokens_and_nothing_else():
    base = manifest()
    digest = data_digest(base)
    assert len(digest) == 16 and int(digest, 16) >= 0
    reordered = copy.deepcopy(base)
    reordered["splits"]["train"]["files"].reverse()
    reordered["counts"] = {"read": 12}  # bookkeeping that says nothing about the shards' content
    assert data_digest(reordered) == digest
    changed_shard = copy.deepcopy(base)
    changed_shard["splits"]["test"]["files"][0]["sha256"] = "f" * 64
    moved = copy.deepcopy(base)
    moved["splits"]["val"]["files"][0]["path"] = "val/part-9"
    other_vocab = copy.deepcopy(base)
    other_vocab["vocab"]["words"].append("ship")
    other_rule = copy.deepcopy(base)
    other_rule["vocab"]["stopwords"] = "unk"
    digests = {data_digest(m) for m in (changed_shard, moved, other_vocab, other_rule)}
    assert len(digests) == 4 and digest not in digests


def test_the_profile_counts_each_split():
    assert dataset_profile(manifest()) == {
        "splits": {
            "train": {"images": 6, "captions": 30},
            "val": {"images": 3, "captions": 15},
            "test": {"images": 3, "captions": 15},
        },
        "vocabulary": 3,
    }
