"""WebDataset shards (`data.format: webdataset`): the format large image-text corpora ship in.

A shard is a tar file of samples; the files of one sample share a key (`0001.jpg`, `0001.txt`,
`0001.json`). Here a sample becomes a candidate row of the prepare stage, inside a Ray Data task
that reads the tar (`ray.data.read_webdataset`, local or on S3): its image is validated and
resized as every format's is, its captions come from the `.txt` (one per line) or else from the
`.json` (a list of captions, or the field `data.caption_field` holding one or a list), its scene
from the `.json` field `data.scene_field` under the "column" rule. Nothing is dropped: a sample
without an image or captions, or with captions or an image the other readers would refuse, is a
row with the same reason they would give, keyed by its sample key.

The validation fold of a sample is drawn from a hash of its key and `validation.seed`
(`fold_of`): the same corpus gives the same split on any machine and in any reading order, with
no list of all keys (the other formats sort every image id first, which a corpus this size makes
the driver's whole memory). A corpus has no test split of its own.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from rsray import storage
from rsray.config import DataConfig, ValidationConfig
from rsray.data.formats import Record, assign_scenes, check_record
from rsray.data.images import ImageRejected, process_image

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "tif", "tiff", "webp")  # the first one a sample has is its image
CAPTIONS = "captions"  # rejected_at: the captions (or a missing file) were refused; the image was never read
IMAGE = "image"  # rejected_at: the image was refused

CANDIDATE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # the sample key
        pa.field("split", pa.string(), nullable=False),
        pa.field("scene", pa.string()),
        pa.field("source_path", pa.string(), nullable=False),  # <shard URI>#<key>
        pa.field("shard", pa.string(), nullable=False),  # the shard's URI: the first one keeps a duplicated key
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # resized and re-encoded; empty when rejected
        pa.field("reason", pa.string()),  # why the sample is refused; null when it is usable
        pa.field("rejected_at", pa.string()),  # CAPTIONS | IMAGE | null
    ]
)


def shard_files(cfg: DataConfig, endpoint: str | None) -> tuple[storage.Location, list[pafs.FileInfo]]:
    """The tar shards under `data.root` that `data.shards` names, from one listing (their sizes and
    modification times make the input fingerprint: no request per file)."""
    root = storage.resolve(cfg.root, endpoint)
    base = root.path.rstrip("/")
    infos = root.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    pattern = cfg.shards.replace("**/", "*")  # fnmatch's * crosses folders already
    files = [i for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path[len(base) + 1 :], pattern)]
    return root, sorted(files, key=lambda i: i.path)


def listing_lines(root: storage.Location, infos: list[pafs.FileInfo]) -> list[str]:
    """One line per shard for the fingerprint: its path under root, size and modification time."""
    base = root.path.rstrip("/")
    return [f"{i.path[len(base) + 1 :]}:{i.size}:{i.mtime_ns}" for i in infos]


def fold_of(image_id: str, folds: int, seed: int) -> int:
    """The validation fold of one key: a hash of the seed and the key, the same everywhere."""
    digest = hashlib.blake2b(f"{seed}\0{image_id}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % folds


def split_of(image_id: str, validation: ValidationConfig) -> str:
    return "val" if fold_of(image_id, validation.folds, validation.seed) == validation.fold else "train"


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")  # bad bytes survive, so check_record can name them


def captions_and_scene(sample: dict[str, Any], cfg: DataConfig) -> tuple[tuple[str, ...], str | None, str | None]:
    """(captions, scene from the .json, reason the sample's text is unusable or None)."""
    meta: Any = None
    if sample.get("json") is not None:
        try:
            meta = json.loads(_text(sample["json"]))
        except ValueError as exc:
            return (), None, f"{sample['__key__']}.json is not valid JSON: {exc}"
    scene = meta.get(cfg.scene_field) if isinstance(meta, dict) and cfg.scene_field else None
    scene = str(scene) if scene is not None else None
    if sample.get("txt") is not None:
        return tuple(line.strip() for line in _text(sample["txt"]).strip().splitlines()), scene, None
    if meta is None:
        return (), scene, "no captions: the sample has no .txt or .json file"
    found = meta.get(cfg.caption_field) if isinstance(meta, dict) else meta
    if isinstance(found, str):
        found = [found]
    if not isinstance(found, list) or not all(isinstance(c, str) for c in found):
        where = f'field "{cfg.caption_field}"' if isinstance(meta, dict) else "list"
        return (), scene, f"{sample['__key__']}.json: its {where} is not a caption or a list of captions"
    return tuple(c.strip() for c in found), scene, None


class CandidateRows:
    """One batch of samples (as `read_webdataset` gives them, undecoded) in, candidate rows out."""

    def __init__(
        self, data: dict, root: str, size: int, encoding: str, quality: int, max_pixels: int, max_caption_chars: int
    ):
        self.cfg = DataConfig(**{**data, "validation": ValidationConfig(**data["validation"])})
        self.root = root.rstrip("/") + "/"  # shards are named relative to it: the same local or on S3
        self.size, self.encoding, self.quality, self.max_pixels = size, encoding, quality, max_pixels
        self.max_caption_chars = max_caption_chars

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.row(_present_files(sample)) for sample in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA)

    def row(self, sample: dict[str, Any]) -> dict[str, Any]:
        key, shard = str(sample["__key__"]), str(sample["__url__"]).removeprefix(self.root)
        captions, scene, reason = captions_and_scene(sample, self.cfg)
        record = Record(key, f"{shard}#{key}", split_of(key, self.cfg.validation), scene, captions)
        record = assign_scenes([record], self.cfg)[0]
        image_suffix = next((s for s in IMAGE_SUFFIXES if sample.get(s) is not None), None)
        if reason is None and image_suffix is None:
            reason = f"no image: the sample has none of {', '.join('.' + s for s in IMAGE_SUFFIXES)}"
        if reason is None:
            reason = check_record(record, self.cfg.captions_per_image, self.max_caption_chars)
        image, rejected_at = b"", CAPTIONS if reason is not None else None
        if reason is None:
            try:
                image = process_image(sample[image_suffix], self.size, self.encoding, self.quality, self.max_pixels)
            except ImageRejected as exc:
                reason, rejected_at = str(exc), IMAGE
        return {
            "image_id": record.image_id,
            "split": record.split,
            "scene": record.scene,
            "source_path": record.path,
            "shard": shard,
            "captions": list(record.captions),
            "image": image,
            "reason": reason,
            "rejected_at": rejected_at,
        }


def _present_files(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample's own files: a block of samples has a column per suffix seen in any of them, and
    a sample without that file holds a null there (NaN, when the block went through pandas)."""
    return {k: v for k, v in sample.items() if k.startswith("__") or isinstance(v, bytes | str)}


def candidate_settings(cfg: Any, root: storage.Location) -> dict[str, Any]:
    """What CandidateRows needs, as plain values a Ray task receives."""
    prep = cfg.prepare
    return dict(
        data=asdict(cfg.data),
        root=root.path,
        size=prep.image_size,
        encoding=prep.image_encoding,
        quality=prep.jpeg_quality,
        max_pixels=prep.max_image_pixels,
        max_caption_chars=prep.max_caption_chars,
    )
