"""rsray.data.pairs: the Arrow pair rows Ray Data makes every epoch (the columns are tested in test_loader)."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa

from rsray.data.pairs import explode_pairs, image_numbers, scene_index


def test_the_module_ray_data_tasks_import_does_not_import_torch():
    """A fresh Ray Data task worker imports this module each epoch; torch would add seconds to it."""
    code = "import sys, rsray.data.pairs; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_image_numbers_follow_the_manifest_order_in_ray_batches():
    manifest = {"splits": {"train": {"image_ids": ["a", "b", "c"]}}, "scenes": {"port": 1, "farm": 2}}
    batch = pa.table(
        {
            "image_id": ["c", "a"],
            "scene": ["port", None],
            "caption_tokens": pa.array([[[5, 6]], [[7], [8, 9]]], pa.list_(pa.list_(pa.int32()))),
        }
    )
    pairs = explode_pairs(batch, scene_index(manifest), image_numbers(manifest, "train"))
    assert pairs.column("image_index").to_pylist() == [2, 0, 0]
    assert pairs.column("scene_id").to_pylist() == [1, -1, -1]  # farm=0, port=1; unknown -1
    assert pairs.column("caption").to_pylist() == [0, 0, 1]
    assert pairs.column("tokens").to_pylist() == [[5, 6], [7], [8, 9]]
