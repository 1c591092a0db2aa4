"""rsray.data.pairs: the Arrow pair rows Ray Data makes every epoch (the columns are tested in test_loader)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pyarrow as pa
import pytest

from rsray.data.pairs import BY_IMAGE_ID, explode_pairs, image_number, scene_index


def test_the_module_ray_data_tasks_import_does_not_import_torch():
    """A fresh Ray Data task worker imports this module each epoch; torch would add seconds to it."""
    code = "import sys, rsray.data.pairs; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_image_numbers_in_ray_batches_are_the_id_hash():
    """Every task numbers an image the same with nothing but its id: blake2b-64 of it, top bit
    dropped (an int64 >= 0, as a row number is)."""
    manifest = {"splits": {"train": {}}, "scenes": {"port": 1, "farm": 2}}
    batch = pa.table(
        {
            "image_id": ["c", "a"],
            "scene": ["port", None],
            "caption_tokens": pa.array([[[5, 6]], [[7], [8, 9]]], pa.list_(pa.list_(pa.int32()))),
        }
    )
    pairs = explode_pairs(batch, scene_index(manifest), BY_IMAGE_ID)
    c, a = (int.from_bytes(hashlib.blake2b(i, digest_size=8).digest(), "little") >> 1 for i in (b"c", b"a"))
    assert pairs.column("image_index").to_pylist() == [c, a, a]
    assert image_number("c") == c and image_number("00000001") == 7154273288619704537
    assert pairs.column("scene_id").to_pylist() == [1, -1, -1]  # farm=0, port=1; unknown -1
    assert pairs.column("caption").to_pylist() == [0, 0, 1]
    assert pairs.column("tokens").to_pylist() == [[5, 6], [7], [8, 9]]


def test_an_unknown_image_index_mode_is_refused():
    tokens = pa.array([[[5]]], pa.list_(pa.list_(pa.int32())))
    batch = pa.table({"image_id": ["a"], "scene": [None], "caption_tokens": tokens})
    with pytest.raises(ValueError, match="image_index must be 'image_id'"):
        explode_pairs(batch, image_index="id")
