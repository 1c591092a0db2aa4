"""The sample's scenes as a WebDataset corpus: tar shards of `{key}.jpg` + `{key}.txt` (five
captions, one per line) or `{key}.json` ({"captions": [...], "scene": ...}), for the corpus-scale
benchmark and tests. Deterministic: the same arguments give byte-identical tar files."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

from rsray.data.synthetic import sample_item


def sample_files(index: int, seed: int, image_size: int, captions_in: str = "txt") -> list[tuple[str, bytes]]:
    """The files of one sample, named by its key (`{index:08d}`), image first."""
    scene, image, texts = sample_item(index, seed, image_size)
    key = f"{index:08d}"
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG", quality=90)
    if captions_in == "txt":
        text = (f"{key}.txt", "\n".join(texts).encode())
    else:
        text = (f"{key}.json", json.dumps({"captions": list(texts), "scene": scene}).encode())
    return [(f"{key}.jpg", jpeg.getvalue()), text]


def tar_bytes(files: list[tuple[str, bytes]]) -> bytes:
    """A tar of `files` in the order given (a sample's files must be adjacent), with fixed times."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def corpus_shards(
    n_images: int, per_shard: int, image_size: int = 64, seed: int = 0, captions_in: str = "txt"
) -> Iterator[tuple[str, bytes]]:
    """(shard name, tar bytes) for each shard of the corpus: `corpus-000000.tar`, ..."""
    for shard, start in enumerate(range(0, n_images, per_shard)):
        files = [
            f
            for index in range(start, min(n_images, start + per_shard))
            for f in sample_files(index, seed, image_size, captions_in)
        ]
        yield f"corpus-{shard:06d}.tar", tar_bytes(files)


def write_corpus(
    out_dir: str | Path, n_images: int, per_shard: int, image_size: int = 64, seed: int = 0, captions_in: str = "txt"
) -> list[Path]:
    """Write the corpus's shards into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in corpus_shards(n_images, per_shard, image_size, seed, captions_in):
        (out_dir / name).write_bytes(data)
        paths.append(out_dir / name)
    return paths
