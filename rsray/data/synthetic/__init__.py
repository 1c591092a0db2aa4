"""Embedded sample dataset: procedurally drawn aerial-like scenes with fine-grained captions.

Why: a newcomer can run the whole pipeline with no download, and benchmarks get inputs of any
size. Everything is deterministic from a seed, and each image has its own random generator, so
images can be drawn in any order (or in parallel) and still come out byte-identical.

A scene is drawn in a unit "frame" (u to the right, v down) that is randomly mirrored and
transposed, so one layout gives eight orientations. Every group of drawn objects is recorded
as a `Thing` (kind, count, colour, region measured in the final image), and the five captions
are written from those records only: they describe what is really in the picture.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from rsray.data.synthetic.canvas import SECONDARY, Canvas, secondary
from rsray.data.synthetic.captions import captions
from rsray.data.synthetic.scenes import DRAWERS

SCENES: tuple[str, ...] = (
    "airport",
    "beach",
    "farmland",
    "forest",
    "harbor",
    "industrial",
    "parking",
    "residential",
    "river",
    "stadium",
)
ANNOTATION_FILE = "dataset_rsray_sample.json"
GENERATOR_NAME = "rsray.data.synthetic"
GENERATOR_VERSION = 1  # bump whenever drawing or captions change, so cached samples are redrawn
SPLIT_CYCLE = ("train",) * 8 + ("val", "test")  # 80/10/10
FORMATS = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg"}

# ----------------------------------------------------------------------------- dataset


def draw_scene(scene: str, rng: np.random.Generator, size: int) -> tuple[Image.Image, list[str]]:
    """Draw one image of `scene` and return it with its 5 captions."""
    if scene not in DRAWERS:
        raise ValueError(f"scene must be one of {', '.join(SCENES)}; got {scene!r}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels; got {size}")
    cv = Canvas(rng, size)
    free = DRAWERS[scene](cv)
    free = [free[k] for k in rng.permutation(len(free))]
    kinds = [k for k in SECONDARY if k not in {t.kind for t in cv.things}]
    for box in free[: cv.randint(0, len(free))]:
        secondary(cv, box, kinds.pop(cv.randint(0, len(kinds) - 1)))
    return cv.finish(), captions(scene, cv.things, cv.relations, rng)


def sample_item(index: int, seed: int, size: int) -> tuple[str, Image.Image, list[str]]:
    """Image `index` of a sample: its own generator, so it never depends on the others."""
    scene = SCENES[index % len(SCENES)]
    return (scene, *draw_scene(scene, np.random.default_rng([seed, index]), size))


def split_of(index: int) -> str:
    """80/10/10 within every class; the class offset spreads val/test over classes for tiny samples."""
    n = len(SCENES)
    return SPLIT_CYCLE[(index // n + index % n) % len(SPLIT_CYCLE)]


def tokens(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", caption.lower())


def _check(n_images: int, image_size: int, seed: int, image_format: str) -> tuple[int, int, int, str]:
    """Validated, normalised arguments of generate_sample (numpy integers become ints, "jpg" "jpeg")."""

    def integer(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not integer(n_images) or n_images < len(SCENES):
        raise ValueError(f"n_images must be an integer >= {len(SCENES)} (one per scene class); got {n_images!r}")
    if not integer(image_size) or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32; got {image_size!r}")
    if not integer(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    if str(image_format).lower() not in FORMATS:
        raise ValueError(f"image_format must be 'png' or 'jpeg'; got {image_format!r}")
    image_format = str(image_format).lower()
    return int(n_images), int(image_size), int(seed), "jpeg" if image_format == "jpg" else image_format


def _previous_sample(annotation: Path) -> dict:
    """The annotation an earlier run of this generator left in out_dir, or {}."""
    try:
        data = json.loads(annotation.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("generator", {}).get("name") == GENERATOR_NAME else {}


def generate_sample(
    out_dir,
    n_images: int = 1000,
    image_size: int = 128,
    seed: int = 0,
    progress: bool = True,
    image_format: str = "png",
) -> Path:
    """Write the sample; returns the annotation JSON path. Idempotent: if out_dir already holds a
    sample generated with the same parameters (stored under "generator"), return without rewriting."""
    n_images, image_size, seed, image_format = _check(n_images, image_size, seed, image_format)
    out_dir = Path(out_dir)
    annotation = out_dir / ANNOTATION_FILE
    generator = {
        "name": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "n_images": n_images,
        "image_size": image_size,
        "seed": seed,
        "image_format": image_format,
    }
    image_dir = out_dir / "images"
    previous = _previous_sample(annotation)
    if previous.get("generator") == generator and all(
        (image_dir / img["filename"]).is_file() for img in previous["images"]
    ):
        return annotation
    annotation.unlink(missing_ok=True)  # a run cut short must never look like the previous sample
    image_dir.mkdir(parents=True, exist_ok=True)
    images = []
    bar = progress and sys.stderr.isatty()  # a bar on a terminal; in a log file, the one line the command prints
    for index in tqdm(range(n_images), desc="drawing sample", unit="img", file=sys.stderr, disable=not bar):
        scene, image, texts = sample_item(index, seed, image_size)
        filename = f"{scene}_{index}{FORMATS[image_format]}"
        if image_format == "png":
            image.save(image_dir / filename, format="PNG", compress_level=1)  # 4x faster than 6, as small
        else:
            image.save(image_dir / filename, format="JPEG", quality=95)
        sentids = [5 * index + k for k in range(5)]
        images.append(
            {
                "filename": filename,
                "imgid": index,
                "split": split_of(index),
                "sentids": sentids,
                "sentences": [
                    {"raw": raw, "tokens": tokens(raw), "imgid": index, "sentid": sid}
                    for raw, sid in zip(texts, sentids, strict=True)
                ],
            }
        )
    stale = {img["filename"] for img in previous.get("images", [])} - {img["filename"] for img in images}
    for name in stale:  # only files an earlier sample listed: never touch anything else in out_dir
        (image_dir / Path(name).name).unlink(missing_ok=True)
    tmp = annotation.with_name(annotation.name + ".tmp")
    tmp.write_text(json.dumps({"dataset": "rsray_sample", "generator": generator, "images": images}))
    os.replace(tmp, annotation)  # the JSON appears last, so a half-written sample is never "complete"
    return annotation
