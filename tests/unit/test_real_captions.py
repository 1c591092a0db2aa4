"""The readers on the real caption files in ../shared/datasets (counts from its README).

Run with `pytest -s -m real_data tests/unit/test_real_captions.py` to see the summary table.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import pytest

from rsray.config import DataConfig, ValidationConfig
from rsray.data.detect import detect_format
from rsray.data.formats import Record, check_record, read_karpathy, read_records
from rsray.data.text import build_vocabulary

DATASETS = Path(os.environ.get("RSRAY_SHARED_DATASETS", Path(__file__).resolve().parents[3] / "shared" / "datasets"))

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(
        not DATASETS.is_dir(), reason=f"real caption files not found at {DATASETS} (set RSRAY_SHARED_DATASETS)"
    ),
]

UCM_SCENES = [
    "agricultural",
    "airplane",
    "baseballdiamond",
    "beach",
    "buildings",
    "chaparral",
    "denseresidential",
    "forest",
    "freeway",
    "golfcourse",
    "harbor",
    "intersection",
    "mediumresidential",
    "mobilehomepark",
    "overpass",
    "parkinglot",
    "river",
    "runway",
    "sparseresidential",
    "storagetanks",
    "tenniscourt",
]

# folder: ((train images, captions), (test images, captions), scene rule, scene count range, unusable images)
EXPECTED = {
    "rsicd": ((9828, 49140), (1093, 5465), "filename", (30, 31), 3),  # 3 train images with a " ." caption
    "rsitmd": ((4291, 21455), (452, 2260), "filename", (32, 33), 4),  # 4 images with 5 blank caption lines
    "ucm": ((1680, 8400), (210, 1050), "index", (21, 21), 0),
    "sydney": ((497, 2485), (58, 290), "none", (0, 0), 0),
}
REFERENCE_VOCAB = {"rsitmd": 1349, "rsicd": 1225}  # shipped with AMFMN/GaLR/SWAN: words + <unk>, no <pad>


def config(name: str) -> DataConfig:
    scenes = EXPECTED[name][2]
    return DataConfig(
        name=name,
        format="precomp",
        root=str(DATASETS / f"{name}_captions"),
        scenes=scenes,
        scene_names=UCM_SCENES if scenes == "index" else [],
        validation=ValidationConfig(seed=0),
    )


@cache
def records(name: str) -> tuple[Record, ...]:
    return tuple(read_records(config(name)))


def counts(recs, splits) -> tuple[int, int]:
    chosen = [r for r in recs if r.split in splits]
    return len(chosen), sum(len(r.captions) for r in chosen)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_counts_scenes_and_checks(name):
    train, test, _, (lo, hi), unusable = EXPECTED[name]
    recs = records(name)
    assert counts(recs, ("train", "val")) == train  # folds: train + val together are the annotations' train
    assert counts(recs, ("test",)) == test
    n_val = counts(recs, ("val",))[0]
    assert abs(n_val - train[0] / 5) <= 1  # fold 0 of 5: 20 %
    assert lo <= len({r.scene for r in recs} - {None}) <= hi
    assert sum(check_record(r, 5) is not None for r in recs) == unusable


def test_rsicd_numbered_images_have_no_scene():
    assert sum(r.scene is None for r in records("rsicd")) == 921


def test_ucm_index_rule():
    scenes = {r.image_id: r.scene for r in records("ucm")}
    by_scene = {s: [n for n, sc in scenes.items() if sc == s] for s in UCM_SCENES}
    assert all(by_scene.values())  # every class has images
    assert scenes.get("1.tif", "agricultural") == "agricultural"
    assert all(100 * i < int(n.split(".")[0]) <= 100 * (i + 1) for i, s in enumerate(UCM_SCENES) for n in by_scene[s])


def vocab_sizes(name: str) -> tuple[int, int, int]:
    """(all annotation train captions, fold-0 train only (the default), all train + test)."""
    recs = records(name)
    everything_train = [r for r in recs if r.split in ("train", "val")]
    train_all = len(build_vocabulary(everything_train, splits=("train", "val")))
    fold_train = len(build_vocabulary(recs, splits=("train",)))
    train_test = len(build_vocabulary(recs, splits=("train", "val", "test")))
    return train_all, fold_train, train_test


@pytest.mark.parametrize("name", list(REFERENCE_VOCAB))
def test_vocabulary_close_to_reference(name):
    _, _, train_test = vocab_sizes(name)
    ours = train_test - 1  # the reference has no <pad>
    assert abs(ours - REFERENCE_VOCAB[name]) <= 0.05 * REFERENCE_VOCAB[name]


def test_karpathy_real_sample():
    folder = DATASETS / "rsicd_real_sample"
    assert detect_format(folder) == ("karpathy", "dataset_rsicd.json")
    recs = read_karpathy(folder / "dataset_rsicd.json", folder / "images")
    assert len(recs) == 5 and all(len(r.captions) == 5 and check_record(r, 5) is None for r in recs)
    assert all(Path(r.path).is_file() and r.split == "train" for r in recs)
    # the same captions as the precomp release of RSICD
    precomp = {r.image_id: r.captions for r in records("rsicd")}
    assert all(precomp[r.image_id] == r.captions for r in recs)


def test_print_summary():
    """A small table for `pytest -s -m real_data`."""
    header = (
        f"\n{'dataset':<8}{'train':>14}{'val (fold 0)':>14}{'test':>14}{'scenes':>8}{'no scene':>10}"
        f"{'unusable':>10}{'vocab train':>13}{'fold-0 train':>14}{'train+test':>12}{'reference':>11}"
    )
    lines = [header, "-" * (len(header) - 1)]
    for name in EXPECTED:
        recs = records(name)
        cells = [f"{i:,}/{c:,}" for i, c in (counts(recs, (s,)) for s in ("train", "val", "test"))]
        scenes = len({r.scene for r in recs} - {None})
        lines.append(
            f"{name:<8}{cells[0]:>14}{cells[1]:>14}{cells[2]:>14}{scenes:>8}"
            f"{sum(r.scene is None for r in recs):>10,}{sum(check_record(r, 5) is not None for r in recs):>10}"
            + "".join(f"{v:>{w},}" for v, w in zip(vocab_sizes(name), (13, 14, 12), strict=True))
            + f"{REFERENCE_VOCAB.get(name, '-'):>11}"
        )
    lines.append("cells: images/captions; vocab sizes include <pad> and <unk> (the reference: <unk> only)")
    print("\n".join(lines))
