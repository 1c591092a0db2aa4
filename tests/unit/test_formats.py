"""Readers on small files in the real layouts, scene rules, validation folds and error messages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rsray.config import DataConfig, ValidationConfig
from rsray.data.detect import detect_data_config, detect_format
from rsray.data.formats import (
    AnnotationError,
    Record,
    assign_scenes,
    assign_validation,
    check_record,
    read_karpathy,
    read_pir,
    read_precomp,
    read_records,
    read_table,
    scene_from_filename,
)

# image -> (split, captions); one image without a scene in its name, like RSICD's numbered files
DATA = {
    "airport_1.jpg": (
        "train",
        [
            "Many planes are parked near a terminal .",
            "an airport with two runways",
            "Several planes beside a building.",
            "A large airport.",
            "planes and runways .",
        ],
    ),
    "beach_2.jpg": (
        "train",
        [
            "Waves on a sandy beach .",
            "a beach next to blue sea",
            "yellow sand and sea .",
            "the beach is long.",
            "white waves reach the sand",
        ],
    ),
    "00001.jpg": (
        "train",
        [
            "a river crosses the town .",
            "houses along a river",
            "a bridge over a river .",
            "green trees near the river",
            "a river and some roads .",
        ],
    ),
    "forest_3.jpg": (
        "val",
        ["dense green forest .", "many trees .", "a dark green forest", "trees everywhere", "a forest ."],
    ),
    "beach_4.jpg": (
        "test",
        ["a beach with many people .", "sea and sand", "a curved beach .", "people on the beach", "the sea is blue ."],
    ),
    "airport_5.jpg": (
        "test",
        [
            "a small airport .",
            "one runway and a plane",
            "a plane on the apron .",
            "an airport in the desert",
            "runway with marks",
        ],
    ),
}


def expected(images_dir: Path, val_split: str = "val") -> list[Record]:
    out = []
    for name, (split, caps) in DATA.items():
        split = val_split if split == "val" else split
        out.append(Record(name, str(images_dir / name), split, None, tuple(c.strip() for c in caps)))
    return sorted(out, key=lambda r: r.image_id)


def by_id(records: list[Record]) -> list[Record]:
    return sorted(records, key=lambda r: r.image_id)


# ----------------------------------------------------------------------------- writers (real layouts)


def write_karpathy(folder: Path, data=DATA) -> Path:
    images = []
    for i, (name, (split, caps)) in enumerate(data.items()):
        sentences = [
            {"raw": c, "tokens": c.lower().rstrip(" .").split(), "imgid": i, "sentid": 5 * i + j}
            for j, c in enumerate(caps)
        ]
        images.append({"filename": name, "imgid": i, "split": split, "sentences": sentences})
    path = folder / "dataset_test.json"
    path.write_text(json.dumps({"images": images, "dataset": "test"}, indent=1))
    return path


def write_precomp(folder: Path, data=DATA, val_file: str = "val_caps_verify.txt") -> Path:
    """train: one name per image, 5 consecutive caption lines; test/val: one name per caption line."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = {s: [(n, caps) for n, (split, caps) in data.items() if split == s] for s in ("train", "val", "test")}
    (folder / "train_filename.txt").write_text("".join(f"{n}\n" for n, _ in rows["train"]))
    (folder / "train_caps.txt").write_text("".join(f"{c}\n" for _, caps in rows["train"] for c in caps))
    for split, caps_name in (("test", "test_caps.txt"), ("val", val_file)):
        names_name = caps_name.replace("caps", "filename")
        (folder / names_name).write_text("".join(f"{n}\n" for n, caps in rows[split] for _ in caps))
        (folder / caps_name).write_text("".join(f"{c}\n" for _, caps in rows[split] for c in caps))
    return folder


def write_pir(folder: Path, data=DATA) -> tuple[Path, Path]:
    """train: one entry per caption (val images go to train: PIR has no val list); eval: 5 per entry."""
    train, evaluation = [], []
    for i, (name, (split, caps)) in enumerate(data.items()):
        if split == "test":
            evaluation.append({"image": name, "caption": caps})
        else:
            train += [{"image": name, "caption": c, "image_id": i, "label": name.split("_")[0]} for c in caps]
    (folder / "rs_train.json").write_text(json.dumps(train))
    (folder / "rs_test.json").write_text(json.dumps(evaluation))
    return folder / "rs_train.json", folder / "rs_test.json"


def table_rows(data=DATA) -> list[dict]:
    return [{"image": n, "caption": c, "split": split} for n, (split, caps) in data.items() for c in caps]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------- readers agree


def test_karpathy(tmp_path):
    records = read_karpathy(write_karpathy(tmp_path), tmp_path / "images")
    assert by_id(records) == expected(tmp_path / "images")
    assert records[0].path == str(tmp_path / "images" / "airport_1.jpg")


def test_precomp_with_verify_file(tmp_path):
    records = read_precomp(write_precomp(tmp_path / "p"), tmp_path / "images")
    assert by_id(records) == expected(tmp_path / "images")


def test_precomp_with_val_files(tmp_path):
    records = read_precomp(write_precomp(tmp_path / "p", val_file="val_caps.txt"), tmp_path / "images")
    assert by_id(records) == expected(tmp_path / "images")


def test_pir(tmp_path):
    train, evaluation = write_pir(tmp_path)
    records = read_pir(train, evaluation, tmp_path / "images")
    assert by_id([Record(r.image_id, r.path, r.split, None, r.captions) for r in records]) == expected(
        tmp_path / "images", val_split="train"
    )
    scenes = {r.image_id: r.scene for r in records}
    assert scenes["airport_1.jpg"] == "airport" and scenes["beach_4.jpg"] is None  # eval lists carry no label


def test_csv_and_parquet_tables(tmp_path):
    rows = table_rows()
    csv_records = read_table(write_csv(tmp_path / "caps.csv", rows), tmp_path / "images")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "caps.parquet")
    parquet_records = read_table(tmp_path / "caps.parquet", tmp_path / "images")
    assert by_id(csv_records) == by_id(parquet_records) == expected(tmp_path / "images")


def test_table_scene_column_kept_by_column_rule(tmp_path):
    rows = [{**row, "scene": "coast" if "beach" in row["image"] else ""} for row in table_rows()]
    write_csv(tmp_path / "caps.csv", rows)
    cfg = DataConfig(
        format="table",
        root=str(tmp_path),
        annotations="caps.csv",
        scenes="column",
        validation=ValidationConfig(mode="fixed"),
    )
    scenes = {r.image_id: r.scene for r in read_records(cfg)}
    assert scenes["beach_2.jpg"] == "coast" and scenes["airport_1.jpg"] is None


def test_read_records_dispatch_all_formats_agree(tmp_path):
    for sub in ("k", "t"):
        (tmp_path / sub).mkdir()
    write_karpathy(tmp_path / "k")
    write_precomp(tmp_path / "p")
    write_csv(tmp_path / "t" / "caps.csv", table_rows())
    fixed = ValidationConfig(mode="fixed")
    configs = [
        DataConfig(format="karpathy", root=str(tmp_path / "k"), annotations="dataset_test.json"),
        DataConfig(format="precomp", root=str(tmp_path / "p")),
        DataConfig(format="table", root=str(tmp_path / "t"), annotations="caps.csv"),
    ]
    results = []
    for cfg in configs:
        cfg.images = str(tmp_path / "images")  # absolute: the same paths for every format
        for validation in (fixed, ValidationConfig(mode="folds", seed=3)):
            cfg.validation = validation
            results.append(by_id(read_records(cfg)))
    assert all(r == results[0] for r in results[0::2]) and all(r == results[1] for r in results[1::2])
    assert {r.image_id: r.scene for r in results[0]}["00001.jpg"] is None
    assert {r.image_id: r.scene for r in results[0]}["forest_3.jpg"] == "forest"


# ----------------------------------------------------------------------------- scenes


@pytest.mark.parametrize(
    "name, scene",
    [
        ("denseresidential_12.tif", "denseresidential"),
        ("00001.jpg", None),
        ("airport3.jpg", "airport"),
        ("storagetanks_4367.tif", "storagetanks"),
        ("sub/dir/beach_1.png", "beach"),
        ("1.tif", None),
    ],
)
def test_scene_from_filename(name, scene):
    assert scene_from_filename(name) == scene


def rec(name: str, split: str = "train", scene: str | None = None) -> Record:
    return Record(name, f"images/{name}", split, scene, ("a caption",) * 5)


def test_scene_rules():
    records = [rec("1.tif"), rec("2.tif"), rec("3.tif"), rec("6.tif"), rec("beach_1.tif", scene="coast")]
    names = ["agricultural", "airplane", "baseballdiamond"]
    ucm = DataConfig(scenes="index", scene_names=names, images_per_scene=2)
    assert [r.scene for r in assign_scenes(records, ucm)] == [
        "agricultural",
        "agricultural",
        "airplane",
        "baseballdiamond",
        None,
    ]
    assert [r.scene for r in assign_scenes(records, DataConfig(scenes="filename"))] == [None] * 4 + ["beach"]
    assert [r.scene for r in assign_scenes(records, DataConfig(scenes="column"))] == [None] * 4 + ["coast"]
    assert [r.scene for r in assign_scenes(records, DataConfig(scenes="none"))] == [None] * 5
    with pytest.raises(ValueError, match="7.tif"):
        assign_scenes([rec("7.tif")], ucm)  # beyond 3 scenes x 2 images: a config mistake, not a guess


# ----------------------------------------------------------------------------- validation


def split_records() -> list[Record]:
    train = [rec(f"scene_{i}.jpg") for i in range(45)] + [rec(f"scene_{i}.jpg", "val") for i in range(45, 50)]
    return train + [rec(f"test_{i}.jpg", "test") for i in range(10)]


def val_ids(records: list[Record]) -> set[str]:
    return {r.image_id for r in records if r.split == "val"}


def test_folds_partition_train_and_leave_test():
    records = split_records()
    folds = [val_ids(assign_validation(records, ValidationConfig(folds=5, fold=f, seed=0))) for f in range(5)]
    assert all(len(f) == 10 for f in folds)  # 80/20 of the 50 train+val images
    assert set().union(*folds) == {f"scene_{i}.jpg" for i in range(50)}
    assert sum(map(len, folds)) == 50  # disjoint
    out = assign_validation(records, ValidationConfig(folds=5, fold=2, seed=0))
    assert [r for r in out if r.split == "test"] == [r for r in records if r.split == "test"]
    assert [r.image_id for r in out] == [r.image_id for r in records]  # order kept


def test_folds_are_seeded_and_order_independent():
    records = split_records()
    first = val_ids(assign_validation(records, ValidationConfig(seed=0)))
    assert first == val_ids(assign_validation(records[::-1], ValidationConfig(seed=0)))
    assert first != val_ids(assign_validation(records, ValidationConfig(seed=1)))


def test_fixed_validation():
    records = split_records()
    assert assign_validation(records, ValidationConfig(mode="fixed")) == records
    no_val = [r for r in records if r.split != "val"]
    with pytest.raises(ValueError, match="fixed"):
        assign_validation(no_val, ValidationConfig(mode="fixed"))


# ----------------------------------------------------------------------------- bad input


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "dataset_bad.json"
    path.write_text('{"images": [\n  {"filename": "a.jpg",,}\n]}\n')
    with pytest.raises(AnnotationError, match=r"dataset_bad.json: line 2 column \d+: invalid JSON"):
        read_karpathy(path, tmp_path)


def test_deeply_nested_json_names_the_file(tmp_path):
    """A hostile annotation file nested 100,000 deep: one line naming it, not a RecursionError."""
    path = tmp_path / "dataset_deep.json"
    path.write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(AnnotationError, match=r"dataset_deep.json: JSON nested too deeply"):
        read_karpathy(path, tmp_path)


@pytest.mark.parametrize(
    "content, match",
    [
        ({"imgs": []}, 'an "images" list'),
        (
            {"images": [{"filename": "a.jpg", "split": "train", "sentences": []}, {"split": "train"}]},
            r'images\[1\]: missing "filename"',
        ),
        ({"images": [{"filename": "a.jpg", "split": "dev", "sentences": []}]}, r"images\[0\]: split must be"),
    ],
)
def test_karpathy_structure_errors(tmp_path, content, match):
    path = tmp_path / "dataset_x.json"
    path.write_text(json.dumps(content))
    with pytest.raises(AnnotationError, match=match):
        read_karpathy(path, tmp_path)


def test_missing_file_and_bad_counts(tmp_path):
    with pytest.raises(AnnotationError, match="nowhere.json: annotation file not found"):
        read_karpathy(tmp_path / "nowhere.json", tmp_path)
    folder = write_precomp(tmp_path / "p")
    lines = (folder / "train_caps.txt").read_text().splitlines()
    (folder / "train_caps.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(AnnotationError, match=r"train_caps.txt: 14 caption lines do not fit the 3 names"):
        read_precomp(folder, tmp_path)
    (folder / "train_caps.txt").unlink()
    with pytest.raises(AnnotationError, match="train_caps.txt: annotation file not found"):
        read_precomp(folder, tmp_path)


@pytest.mark.parametrize(
    "caption, reason",
    [
        ("\U0001f6f0\ufe0f \U0001f30a", "caption 2 has no words (only symbols or invisible characters)"),  # emoji
        ("\u200b\u200c\u2060", "caption 2 has no words (only symbols or invisible characters)"),  # zero-width
        (" .", "caption 2 has no words (only symbols or invisible characters)"),  # 3 such lines in RSICD train
        ("sea " * 600, "caption 2 has 2,400 characters, over prepare.max_caption_chars (2,000)"),
        ("a beach \U0001f30a", None),  # a word is enough
    ],
)
def test_captions_without_words_or_too_long_reject_their_record(caption, reason):
    record = Record("beach_2.jpg", "images/beach_2.jpg", "train", "beach", ("a beach", caption, "sand", "sea", "waves"))
    assert check_record(record, 5, max_caption_chars=2000) == reason


def test_bad_captions_survive_reading_and_are_flagged(tmp_path):
    data = dict(DATA)
    data["beach_4.jpg"] = ("test", DATA["beach_4.jpg"][1][:4])  # 4 caption lines for this name
    data["beach_2.jpg"] = ("train", ["a beach", "", "sand", "sea", "waves"])  # an empty line
    folder = write_precomp(tmp_path / "p", data)
    caps = folder / "train_caps.txt"
    caps.write_bytes(caps.read_bytes().replace(b"Several planes", b"Several \xff\xfe planes"))
    records = {r.image_id: r for r in read_precomp(folder, tmp_path)}
    assert check_record(records["beach_4.jpg"], 5) == "expected 5 captions, got 4"
    assert check_record(records["beach_2.jpg"], 5) == "caption 2 is empty"
    assert check_record(records["airport_1.jpg"], 5) == "caption 3 is not valid UTF-8"
    assert check_record(records["forest_3.jpg"], 5) is None
    assert sum(check_record(r, 5) is None for r in records.values()) == 3


def test_karpathy_keeps_any_caption_count(tmp_path):
    data = {"airport_1.jpg": ("train", ["a", "b", "c", "d"]), "beach_2.jpg": ("test", ["x"] * 7)}
    records = read_karpathy(write_karpathy(tmp_path, data), tmp_path)
    assert [len(r.captions) for r in records] == [4, 7]
    assert check_record(records[1], 5) == "expected 5 captions, got 7"


def test_stray_whitespace_is_stripped(tmp_path):
    data = {
        "a_1.jpg": ("train", ["  two planes  ", "a runway\t", "no final period", " .", "odd ~ chars"]),
        "a_2.jpg": ("test", ["x"] * 5),
    }
    folder = write_precomp(tmp_path / "p", data)
    (folder / "train_caps.txt").write_bytes((folder / "train_caps.txt").read_bytes().replace(b"\n", b"\r\n"))
    (record, _) = read_precomp(folder, tmp_path)
    assert record.captions == ("two planes", "a runway", "no final period", ".", "odd ~ chars")


# ----------------------------------------------------------------------------- detection


def test_detect_format(tmp_path):
    for sub in ("k", "p", "r", "t", "empty"):
        (tmp_path / sub).mkdir()
    write_karpathy(tmp_path / "k")
    write_precomp(tmp_path / "p")
    write_pir(tmp_path / "r")
    write_csv(tmp_path / "t" / "mine.csv", table_rows())
    assert detect_format(tmp_path / "k") == ("karpathy", "dataset_test.json")
    assert detect_format(tmp_path / "p") == ("precomp", "")
    assert detect_format(tmp_path / "r") == ("pir", "rs_train.json")
    assert detect_format(tmp_path / "t") == ("table", "mine.csv")
    assert detect_data_config(tmp_path / "r").eval_annotations == "rs_test.json"
    with pytest.raises(AnnotationError, match="no annotations found"):
        detect_format(tmp_path / "empty")
    with pytest.raises(AnnotationError, match="no such folder"):
        detect_format(tmp_path / "missing")


def test_bad_bytes_in_json_survive(tmp_path):
    path = write_karpathy(tmp_path, {"a_1.jpg": ("train", ["fine", "also fine", "BAD", "ok", "ok"])})
    path.write_bytes(path.read_bytes().replace(b'"raw": "BAD"', b'"raw": "b\xe9d"'))
    (record,) = read_karpathy(path, tmp_path)
    assert check_record(record, 5) == "caption 3 is not valid UTF-8"


def test_duplicate_names_are_refused(tmp_path):
    folder = write_precomp(tmp_path / "p")
    names = folder / "train_filename.txt"
    names.write_text(names.read_text().replace("00001.jpg", "airport_1.jpg"))
    with pytest.raises(AnnotationError, match=r"train_filename.txt: line 3: airport_1.jpg is listed twice"):
        read_precomp(folder, tmp_path)
    rows = table_rows() + [{"image": "airport_1.jpg", "caption": "x", "split": "test"}]
    with pytest.raises(AnnotationError, match=r"caps.csv: line 32: image airport_1.jpg is in split test"):
        read_table(write_csv(tmp_path / "caps.csv", rows), tmp_path)


@pytest.mark.parametrize(
    "name, problem",
    [
        ("../outside.png", "points outside the images folder"),
        ("x/../../outside.png", "points outside the images folder"),
        ("/etc/passwd", "points outside the images folder"),
        ("a\x00.png", "contains a NUL byte"),
        ("caf\udce9.png", "not valid UTF-8"),
        ("sub/./a.png", None),
    ],
)
def test_file_names_that_cannot_be_read_are_rejected_per_record(tmp_path, name, problem):
    path = write_karpathy(tmp_path, {name: ("train", ["one", "two", "three", "four", "five"])})
    (record,) = read_karpathy(path, tmp_path / "images")
    reason = check_record(record, 5)
    assert (reason is None) if problem is None else (problem in reason)


def test_one_image_file_is_one_image_whatever_its_spelling(tmp_path):
    five = ["one", "two", "three", "four", "five"]
    path = write_karpathy(tmp_path, {"a_1.jpg": ("train", five), "./x/../a_1.jpg": ("test", five)})
    with pytest.raises(AnnotationError, match=r"image a_1.jpg appears twice \(train and test\)"):
        read_karpathy(path, tmp_path)
    rows = [{"image": name, "caption": f"caption {i}", "split": "train"} for i, name in enumerate(["b.png", "./b.png"])]
    (record,) = read_table(write_csv(tmp_path / "caps.csv", rows), tmp_path / "images")
    assert record.image_id == "b.png" and record.captions == ("caption 0", "caption 1")
    assert record.path == str(tmp_path / "images" / "b.png")
