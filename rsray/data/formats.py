"""Annotation readers: every format a user may bring becomes the same list of `Record`s.

Readers only parse: they keep captions as given (stripped) and never drop one, so `check_record`
(and the prepare stage after it) can say exactly which image is unusable and why. Text is decoded
with `surrogateescape`, so a caption with bad bytes survives as a string and is flagged instead of
crashing the read. A structural problem raises `AnnotationError` naming the file and position.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from rsray import storage
from rsray.config import DataConfig, ValidationConfig
from rsray.data.text import words

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "test": "test"}


@dataclass(frozen=True)
class Record:
    """One image and its captions, whatever format they came from."""

    image_id: str  # the image file name; unique within a dataset
    path: str  # images folder joined with the file name
    split: str  # "train" | "val" | "test"
    scene: str | None  # scene label, or None when unknown (never guessed)
    captions: tuple[str, ...]  # as given, stripped of surrounding whitespace


class AnnotationError(ValueError):
    """Malformed annotation file: one line naming the file and the position (line/column or record index)."""


# ----------------------------------------------------------------------------- entry point


# prepare.s3_endpoint while read_records runs (else AWS_ENDPOINT_URL_S3): annotation files on S3 use it
_S3_ENDPOINT: ContextVar[str | None] = ContextVar("annotations_s3_endpoint", default=None)


def read_records(cfg: DataConfig, s3_endpoint: str | None = None) -> list[Record]:
    """Read the dataset `cfg` describes, then apply its scene rule and its validation split.
    `data.root` (and `data.images`) may be a local folder or an s3:// prefix."""
    root = cfg.root
    images = _under(root, cfg.images)
    token = _S3_ENDPOINT.set(s3_endpoint)
    try:
        records = _read_format(cfg, root, images)
    finally:
        _S3_ENDPOINT.reset(token)
    return assign_validation(assign_scenes(records, cfg), cfg.validation)


def _read_format(cfg: DataConfig, root: str, images: str) -> list[Record]:
    if cfg.format == "karpathy":
        return read_karpathy(_under(root, cfg.annotations), images)
    if cfg.format == "precomp":
        return read_precomp(root, images, captions_per_image=cfg.captions_per_image)
    if cfg.format == "pir":
        eval_json = _under(root, cfg.eval_annotations) if cfg.eval_annotations else None
        return read_pir(_under(root, cfg.annotations), eval_json, images)
    if cfg.format == "table":
        return read_table(_under(root, cfg.annotations), images)
    if cfg.format == "webdataset":
        raise ValueError(
            "a webdataset corpus is read by rsray prepare's Ray Data tasks, not into a list of records; "
            "inspect its prepared output instead"
        )
    raise ValueError(f"unknown data format {cfg.format!r}")


# ----------------------------------------------------------------------------- readers


def read_karpathy(json_path: str | Path, images_dir: str | Path) -> list[Record]:
    """Karpathy JSON: {"images": [{"filename", "split", "sentences": [{"raw", "tokens"}]}]}."""
    data = read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationError(f'{json_path}: expected an object with an "images" list')
    records = []
    for i, entry in enumerate(data["images"]):
        where = f"{json_path}: images[{i}]"
        if not isinstance(entry, dict):
            raise AnnotationError(f"{where}: expected an object, got {type(entry).__name__}")
        name = image_name(_field(entry, "filename", where))
        split = _split(entry.get("split"), where)
        sentences = entry.get("sentences", [])
        if not isinstance(sentences, list):
            raise AnnotationError(f'{where}: "sentences" must be a list')
        captions = tuple(_sentence_text(s, f"{where}.sentences[{j}]") for j, s in enumerate(sentences))
        records.append(Record(name, _join(images_dir, name), split, None, captions))
    _check_unique(records, json_path)
    return records


def read_precomp(root: str | Path, images_dir: str | Path, captions_per_image: int = 5) -> list[Record]:
    """AMFMN-style text files: {train,test}_caps.txt + _filename.txt, optional val_* or val_*_verify.

    Two layouts are told apart by the line counts: one name per image with `captions_per_image`
    consecutive caption lines each (train), or one name per caption line (test, val).
    """
    records = _read_caption_pair(
        _join(root, "train_caps.txt"), _join(root, "train_filename.txt"), "train", images_dir, captions_per_image
    )
    records += _read_caption_pair(
        _join(root, "test_caps.txt"), _join(root, "test_filename.txt"), "test", images_dir, captions_per_image
    )
    for caps, names in (("val_caps.txt", "val_filename.txt"), ("val_caps_verify.txt", "val_filename_verify.txt")):
        if _exists(_join(root, caps)) or _exists(_join(root, names)):
            records += _read_caption_pair(_join(root, caps), _join(root, names), "val", images_dir, captions_per_image)
            break
    _check_unique(records, root)
    return records


def read_pir(train_json: str | Path, eval_json: str | Path | None, images_dir: str | Path) -> list[Record]:
    """PIR-style lists: train [{image, caption, image_id, label}] one caption per entry; eval
    [{image, caption: [...]}] -> test. `label` becomes the scene (kept by the "column" rule)."""
    groups: dict[str, tuple[str, str | None, list[str]]] = {}
    sources = [(train_json, "train")] + ([(eval_json, "test")] if eval_json else [])
    for path, split in sources:
        data = read_json(path)
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: expected a list of entries, got {type(data).__name__}")
        for i, entry in enumerate(data):
            where = f"{path}: entry {i}"
            if not isinstance(entry, dict):
                raise AnnotationError(f"{where}: expected an object, got {type(entry).__name__}")
            name = image_name(_field(entry, "image", where))
            caption = entry.get("caption")
            if isinstance(caption, str):
                captions = [caption]
            elif isinstance(caption, list) and all(isinstance(c, str) for c in caption):
                captions = caption
            else:
                raise AnnotationError(f'{where}: "caption" must be a string or a list of strings')
            label = entry.get("label")
            scene = None if label is None or str(label).strip() == "" else str(label).strip()
            _group(groups, name, split, scene, captions, where)
    return [
        Record(name, _join(images_dir, name), split, scene, tuple(c.strip() for c in caps))
        for name, (split, scene, caps) in groups.items()
    ]


def read_table(path: str | Path, images_dir: str | Path) -> list[Record]:
    """A CSV or Parquet table, one row per caption: image, caption, split, optional scene."""
    if not _exists(path):
        raise AnnotationError(f"{path}: annotation file not found")
    if str(path).lower().endswith(".parquet"):
        rows, header = _parquet_rows(path)
    else:
        rows, header = _csv_rows(path)
    missing = [c for c in ("image", "caption", "split") if c not in header]
    if missing:
        raise AnnotationError(f"{path}: missing column(s) {', '.join(missing)} (have: {', '.join(header)})")
    groups: dict[str, tuple[str, str | None, list[str]]] = {}
    for where, row in rows:
        where = f"{path}: {where}"
        name = row["image"]
        if not isinstance(name, str) or not name.strip():
            raise AnnotationError(f"{where}: empty image name")
        caption = row["caption"]
        caption = "" if caption is None else str(caption)
        scene = row.get("scene")
        scene = None if scene is None or str(scene).strip() == "" else str(scene).strip()
        _group(groups, image_name(name.strip()), _split(row["split"], where), scene, [caption], where)
    return [
        Record(name, _join(images_dir, name), split, scene, tuple(c.strip() for c in caps))
        for name, (split, scene, caps) in groups.items()
    ]


# ----------------------------------------------------------------------------- scenes

_SCENE_PREFIX = re.compile(r"^([^_\d]+)")


def scene_from_filename(name: str) -> str | None:
    """The file-name stem up to the first "_" or digit run: "airport_12.jpg" -> "airport";
    a name that starts with a digit ("00001.jpg") has no scene."""
    stem = Path(name).name.rsplit(".", 1)[0]
    match = _SCENE_PREFIX.match(stem)
    scene = match.group(1).strip(" -.") if match else ""
    return scene or None


def assign_scenes(records: Sequence[Record], cfg: DataConfig) -> list[Record]:
    """Apply the scene rule: filename | index (UCM-style numbering) | column (keep) | none."""
    if cfg.scenes == "column":
        return list(records)
    if cfg.scenes == "none":
        return [replace(r, scene=None) for r in records]
    if cfg.scenes == "filename":
        return [replace(r, scene=scene_from_filename(r.image_id)) for r in records]
    if cfg.scenes == "index":
        return [replace(r, scene=_scene_from_index(r.image_id, cfg.scene_names, cfg.images_per_scene)) for r in records]
    raise ValueError(f"unknown scene rule {cfg.scenes!r}")


def _scene_from_index(name: str, scene_names: Sequence[str], per_scene: int) -> str | None:
    """Numbered files, `per_scene` consecutive ones per class, 1-based: "101.tif" -> class 1."""
    stem = Path(name).name.split(".", 1)[0]
    if not stem.isdigit():
        return None
    number = int(stem)
    index = (number - 1) // per_scene
    if number < 1 or index >= len(scene_names):
        raise ValueError(
            f"{name}: image number {number} is outside {len(scene_names)} scenes x "
            f"{per_scene} images (check data.scene_names and data.images_per_scene)"
        )
    return scene_names[index]


# ----------------------------------------------------------------------------- validation split


def assign_validation(records: Sequence[Record], cfg: ValidationConfig) -> list[Record]:
    """Fixed: keep the annotations' val split. Folds: val images go back to train, then fold
    `cfg.fold` of `cfg.folds` (a seeded shuffle of train image ids) becomes val. Test is untouched."""
    if cfg.mode == "fixed":
        if not any(r.split == "val" for r in records):
            raise ValueError(
                "validation.mode 'fixed' needs a val split in the annotations and there is "
                "none (use validation.mode=folds)"
            )
        return list(records)
    if cfg.mode != "folds":
        raise ValueError(f"unknown validation mode {cfg.mode!r}")
    val_ids = set(
        fold_image_ids([r.image_id for r in records if r.split in ("train", "val")], cfg.folds, cfg.seed)[cfg.fold]
    )
    out = []
    for r in records:
        if r.split in ("train", "val"):
            r = replace(r, split="val" if r.image_id in val_ids else "train")
        out.append(r)
    return out


def fold_image_ids(image_ids: Iterable[str], folds: int, seed: int) -> list[list[str]]:
    """Partition image ids into `folds` near-equal folds: sort, shuffle with `seed`, cut in order.
    Sorting first makes the folds independent of the order a reader returned the images in."""
    ids = sorted(set(image_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    return [[ids[i] for i in chunk] for chunk in np.array_split(order, folds)]


# ----------------------------------------------------------------------------- checks


def image_name(name: str) -> str:
    """An annotation's file name in one spelling (`./a.jpg`, `x/../a.jpg` and `a.jpg` are one image,
    so they are one record); names that leave the images folder stay as they are, for `path_problem`."""
    return posixpath.normpath(name) if name else name


def path_problem(name: str) -> str | None:
    """Why an annotation's file name cannot be read (None if it can): a NUL byte, bytes that are not
    UTF-8, or a path leaving the images folder (absolute, or `../`). Per record, never fatal."""
    if "\x00" in name:
        return "file name contains a NUL byte"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8"
    if posixpath.isabs(name) or name == ".." or name.startswith("../"):
        return f"file name {name!r} points outside the images folder"
    return None


def check_record(record: Record, captions_per_image: int, max_caption_chars: int | None = None) -> str | None:
    """Why a record is unusable (its file name, or its captions: wrong count, empty, without a
    word (only symbols or invisible characters), longer than `max_caption_chars`
    (`prepare.max_caption_chars`), not UTF-8), or None if usable."""
    problem = path_problem(record.image_id)
    if problem is not None:
        return problem
    if len(record.captions) != captions_per_image:
        return f"expected {captions_per_image} captions, got {len(record.captions)}"
    for i, caption in enumerate(record.captions, start=1):
        if not caption.strip():
            return f"caption {i} is empty"
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError:
            return f"caption {i} is not valid UTF-8"
        if max_caption_chars is not None and len(caption) > max_caption_chars:
            limit = f"prepare.max_caption_chars ({max_caption_chars:,})"
            return f"caption {i} has {len(caption):,} characters, over {limit}"
        if not words(caption):
            return f"caption {i} has no words (only symbols or invisible characters)"
    return None


# ----------------------------------------------------------------------------- helpers


def _read_bytes(path: str | Path) -> bytes:
    if storage.is_s3(str(path)):
        return storage.read_bytes(storage.resolve(path, _S3_ENDPOINT.get()))
    return Path(path).read_bytes()


def _exists(path: str | Path) -> bool:
    """Whether an annotation file is there (a local file, or an object on S3)."""
    if storage.is_s3(str(path)):
        loc = storage.resolve(path, _S3_ENDPOINT.get())
        return loc.fs.get_file_info(loc.path).type == pafs.FileType.File
    return Path(path).is_file()


def _under(root: str | Path, name: str) -> str:
    """`name` inside the dataset folder, unless it is absolute or an s3:// URI of its own."""
    return name if storage.is_s3(name) or Path(name).is_absolute() else _join(root, name)


def _read_text(path: str | Path) -> str:
    """Whole file as str; bad bytes survive as surrogates (flagged later by check_record)."""
    try:
        return _read_bytes(path).decode("utf-8-sig", errors="surrogateescape")
    except FileNotFoundError:
        raise AnnotationError(f"{path}: annotation file not found") from None
    except IsADirectoryError:
        raise AnnotationError(f"{path}: expected an annotation file, found a folder") from None


def read_json(path: str | Path) -> Any:
    """An annotation file's JSON; AnnotationError names the file and the position."""
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}") from None
    except RecursionError:  # Python's parser recurses once per nesting level: no annotation file nests this deep
        raise AnnotationError(f"{path}: JSON nested too deeply to be an annotation file") from None


def _read_lines(path: str | Path) -> list[str]:
    """Lines split on "\\n" only (captions may hold odd characters that str.splitlines splits on)."""
    lines = _read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    return [line.rstrip("\r") for line in lines]


def _read_caption_pair(
    caps_path: str, names_path: str, split: str, images_dir: str | Path, per_image: int
) -> list[Record]:
    caps = _read_lines(caps_path)
    names = [image_name(n.strip()) for n in _read_lines(names_path)]
    while names and not names[-1]:
        names.pop()  # blank lines at the end of a names file
    for i, name in enumerate(names, start=1):
        if not name:
            raise AnnotationError(f"{names_path}: line {i}: empty file name")
    if len(caps) > len(names) * per_image and not any(c.strip() for c in caps[len(names) * per_image :]):
        caps = caps[: len(names) * per_image]  # blank lines at the end of a per-image caps file
    if len(caps) == len(names) * per_image:  # one name per image
        first_line: dict[str, int] = {}
        for line, name in enumerate(names, start=1):
            if name in first_line:
                raise AnnotationError(
                    f"{names_path}: line {line}: {name} is listed twice (first on line {first_line[name]})"
                )
            first_line[name] = line
        groups = {n: caps[i * per_image : (i + 1) * per_image] for i, n in enumerate(names)}
    elif len(caps) == len(names):  # one name per caption line
        groups = {}
        for name, caption in zip(names, caps, strict=True):
            groups.setdefault(name, []).append(caption)
    else:
        names_file = posixpath.basename(str(names_path))
        raise AnnotationError(
            f"{caps_path}: {len(caps)} caption lines do not fit the {len(names)} names in {names_file} "
            f"(expected {len(names) * per_image}: {per_image} per image, or {len(names)}: one name per line)"
        )
    return [Record(n, _join(images_dir, n), split, None, tuple(c.strip() for c in cs)) for n, cs in groups.items()]


def _csv_rows(path: str | Path) -> tuple[list[tuple[str, dict]], list[str]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    try:
        rows = [(f"line {reader.line_num}", row) for row in reader]
    except csv.Error as exc:
        raise AnnotationError(f"{path}: line {reader.line_num}: invalid CSV: {exc}") from None
    return rows, header


def _parquet_rows(path: str | Path) -> tuple[list[tuple[str, dict]], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(_read_bytes(path)))
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise AnnotationError(f"{path}: cannot read Parquet: {exc}") from None
    return [(f"row {i}", row) for i, row in enumerate(table.to_pylist())], table.column_names


def _group(groups: dict, name: str, split: str, scene: str | None, captions: list[str], where: str) -> None:
    """Collect one image's captions from several rows; an image must keep one split."""
    if name not in groups:
        groups[name] = (split, scene, list(captions))
        return
    known_split, known_scene, caps = groups[name]
    if known_split != split:
        raise AnnotationError(f"{where}: image {name} is in split {split} here but {known_split} before")
    caps.extend(captions)
    if known_scene is None and scene is not None:
        groups[name] = (known_split, scene, caps)


def _field(entry: dict, key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise AnnotationError(f'{where}: missing "{key}"')
    return value.strip()


def _split(value: Any, where: str) -> str:
    split = _SPLIT_ALIASES.get(str(value).strip().lower()) if value is not None else None
    if split is None:
        raise AnnotationError(f"{where}: split must be train, val, test or restval, got {value!r}")
    return split


def _sentence_text(sentence: Any, where: str) -> str:
    """A Karpathy sentence's text: "raw", else its tokens joined."""
    if isinstance(sentence, str):
        return sentence.strip()
    if isinstance(sentence, dict):
        if isinstance(sentence.get("raw"), str):
            return sentence["raw"].strip()
        if isinstance(sentence.get("tokens"), list):
            return " ".join(map(str, sentence["tokens"])).strip()
    raise AnnotationError(f'{where}: a sentence needs "raw" text or "tokens"')


def _join(folder: str | Path, name: str) -> str:
    """A file in a folder: a local path, or a key under an s3:// prefix."""
    if storage.is_s3(str(folder)):
        return f"{str(folder).rstrip('/')}/{name}"
    return str(Path(folder) / name)


def _check_unique(records: Sequence[Record], source: str | Path) -> None:
    seen: dict[str, str] = {}
    for r in records:
        if r.image_id in seen:
            raise AnnotationError(f"{source}: image {r.image_id} appears twice ({seen[r.image_id]} and {r.split})")
        seen[r.image_id] = r.split
