"""Which annotation format a dataset folder holds, for `rsray data inspect` and configs made from
a folder: Karpathy JSON, AMFMN caption files, PIR lists or one table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rsray.config import DataConfig
from rsray.data.formats import AnnotationError, read_json


def detect_format(folder: str | Path) -> tuple[str, str]:
    """Guess the format of a folder for `rsray data inspect`: (format, annotation file name).
    For pir the file is the train list; `detect_data_config` also finds the eval list."""
    fmt, annotations, _ = _detect(Path(folder))
    return fmt, annotations


def detect_data_config(folder: str | Path, **overrides: Any) -> DataConfig:
    """A DataConfig for a folder whose format is detected (root, format, annotation files)."""
    fmt, annotations, eval_annotations = _detect(Path(folder))
    fields = dict(root=str(folder), format=fmt, annotations=annotations, eval_annotations=eval_annotations)
    return DataConfig(**{**fields, **overrides})


def _detect(folder: Path) -> tuple[str, str, str]:
    if not folder.is_dir():
        raise AnnotationError(f"{folder}: no such folder")
    for path in sorted(folder.glob("dataset_*.json")):
        try:
            data = read_json(path)
        except AnnotationError:
            continue
        if isinstance(data, dict) and "images" in data:
            return "karpathy", path.name, ""
    if (folder / "train_caps.txt").is_file():
        return "precomp", "", ""
    train, evals = [], []
    for path in sorted(folder.glob("*.json")):
        try:
            data = read_json(path)
        except AnnotationError:
            continue
        if isinstance(data, list) and data and isinstance(data[0], dict) and "image" in data[0]:
            (evals if isinstance(data[0].get("caption"), list) else train).append(path.name)
    if len(train) == 1 and len(evals) <= 1:
        return "pir", train[0], (evals[0] if evals else "")
    if train:
        raise AnnotationError(
            f"{folder}: several PIR-style JSON lists ({', '.join(train + evals)}): name the files in the config"
        )
    tables = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".csv", ".parquet"))
    if len(tables) == 1:
        return "table", tables[0], ""
    if tables:
        raise AnnotationError(f"{folder}: several tables ({', '.join(tables)}): name one in the config")
    raise AnnotationError(
        f"{folder}: no annotations found (expected dataset_*.json, train_caps.txt, "
        "PIR JSON lists or one .csv/.parquet table)"
    )
