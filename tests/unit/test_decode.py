"""rsray.data.decode: batches decoded in worker processes equal those decoded in this process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsray.config import load_config
from rsray.data.augment import AugmentConfig
from rsray.data.decode import BatchDecoder
from rsray.data.pairs import explode_pairs, scene_index
from rsray.data.prepare import prepare_in_process
from rsray.data.synthetic import generate_sample

AUG = AugmentConfig(train_resize=36, crop=32, rotation=90.0, hflip=True, eval_resize=32)


@pytest.fixture(scope="module")
def pair_tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    generate_sample(root, n_images=12, image_size=48, seed=0, progress=False)
    tables, _ = prepare_in_process(load_config("presets/cpu-tiny", [f"data.root={root}"]))
    pairs = explode_pairs(tables["train"], scene_index(tables["train"]))
    return [pairs.slice(start, 8) for start in range(0, pairs.num_rows - 7, 8)]


def decoded(pair_tables, workers: int, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    with BatchDecoder(AUG, workers) as decoder:
        return list(decoder.batches(pair_tables, np.random.default_rng(seed)))


def test_processes_give_the_same_batches_in_the_same_order(pair_tables):
    here, two = decoded(pair_tables, 0), decoded(pair_tables, 2)
    assert len(here) == len(two) == len(pair_tables)
    for a, b in zip(here, two, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(here[0]["images"], decoded(pair_tables, 0, seed=4)[0]["images"])  # the seed matters


def test_a_decoder_serves_epoch_after_epoch(pair_tables):
    with BatchDecoder(AUG, 1) as decoder:
        first = list(decoder.batches(pair_tables[:2], np.random.default_rng(0)))
        second = list(decoder.batches(pair_tables[:2], np.random.default_rng(0)))
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(first, second, strict=True))


def test_only_a_few_batches_are_decoded_ahead(pair_tables):
    pulled = []

    def stream():
        for table in pair_tables:
            pulled.append(table)
            yield table

    with BatchDecoder(AUG, 1, prefetch=2) as decoder:
        batches = decoder.batches(stream(), np.random.default_rng(0))
        next(batches)
        assert len(pulled) == 2  # the first batch waits for the prefetch window, not the whole stream
        assert sum(1 for _ in batches) == len(pair_tables) - 1


def test_a_negative_process_count_is_refused():
    with pytest.raises(ValueError, match="decode workers must be >= 0"):
        BatchDecoder(AUG, -1)
