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
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

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

Box = tuple[float, float, float, float]  # u0, v0, u1, v1 in the frame
RGB = tuple[int, int, int]

PALETTE: dict[str, RGB] = {
    "white": (236, 236, 230),
    "grey": (150, 150, 148),
    "dark grey": (78, 78, 82),
    "black": (35, 35, 40),
    "red": (196, 52, 46),
    "orange": (228, 128, 40),
    "yellow": (228, 204, 64),
    "green": (72, 148, 62),
    "light green": (142, 188, 92),
    "dark green": (34, 84, 40),
    "blue": (48, 88, 186),
    "light blue": (122, 190, 226),
    "turquoise": (56, 164, 176),
    "brown": (134, 96, 56),
}
SHADOW: RGB = (48, 52, 46)
CAR_COLOURS = ("white", "black", "red", "blue", "grey", "yellow")
NUMBERS = ("no", "one", "two", "three", "four", "five", "six")


@dataclass
class Thing:
    """One group of drawn objects: the only source of truth for the captions."""

    kind: str
    count: int  # 0 = mass noun ("blue water"); above six reads "many"
    colour: str | None
    region: str  # "left", "top right", "center", "horizontal", "crossing", "everywhere"
    main: bool = False  # a defining object of the scene class


class Canvas:
    """PIL drawing in a randomly mirrored/transposed unit frame that remembers what it drew."""

    def __init__(self, rng: np.random.Generator, size: int):
        self.rng, self.size = rng, size
        # Pixel noise has its own stream, so the layout (and captions) do not depend on `size`.
        self.noise = np.random.default_rng(rng.integers(2**63))
        self.flip_u, self.flip_v, self.transpose = (bool(b) for b in rng.random(3) < 0.5)
        self.image = Image.new("RGB", (size, size))
        self.pen = ImageDraw.Draw(self.image)
        self.things: list[Thing] = []
        self.relations: list[tuple[int, str, int]] = []

    # -- randomness
    def uniform(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def randint(self, low: int, high: int) -> int:
        """Inclusive on both ends, like a die."""
        return int(self.rng.integers(low, high + 1))

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def colour(self, name_or_rgb: str | RGB, jitter: int = 12) -> RGB:
        """A named colour with a little per-object variation (no two roofs are identical)."""
        base = PALETTE[name_or_rgb] if isinstance(name_or_rgb, str) else name_or_rgb
        return tuple(
            min(255, max(0, c + int(d))) for c, d in zip(base, self.rng.integers(-jitter, jitter + 1, 3), strict=True)
        )

    # -- drawing in frame coordinates
    def xy(self, u: float, v: float) -> tuple[float, float]:
        if self.flip_u:
            u = 1.0 - u
        if self.flip_v:
            v = 1.0 - v
        if self.transpose:
            u, v = v, u
        return u * self.size, v * self.size

    def ground(self, rgb: RGB, rough: float = 14.0) -> None:
        """Fill with a colour modulated by smooth noise: fields, water and asphalt are never flat."""
        k = self.size // 8 + 2
        low = self.noise.normal(0.0, rough, (k, k)).astype(np.float32)
        blobs = np.asarray(Image.fromarray(low).resize((self.size, self.size), Image.Resampling.BILINEAR))
        pixels = np.clip(np.asarray(rgb, np.float32) + blobs[..., None], 0, 255).astype(np.uint8)
        self.image = Image.fromarray(pixels)
        self.pen = ImageDraw.Draw(self.image)

    def rect(self, u0: float, v0: float, u1: float, v1: float, fill: RGB) -> None:
        (x0, y0), (x1, y1) = self.xy(u0, v0), self.xy(u1, v1)
        self.pen.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=fill)

    def ellipse(
        self, u: float, v: float, ru: float, rv: float, fill: RGB | None, outline: RGB | None = None, width: float = 0.0
    ) -> None:
        x, y = self.xy(u, v)
        rx, ry = (rv, ru) if self.transpose else (ru, rv)
        rx, ry = rx * self.size, ry * self.size
        self.pen.ellipse(
            (x - rx, y - ry, x + rx, y + ry), fill=fill, outline=outline, width=max(1, round(width * self.size))
        )

    def polygon(self, points: list[tuple[float, float]], fill: RGB) -> None:
        self.pen.polygon([self.xy(u, v) for u, v in points], fill=fill)

    def line(self, points: list[tuple[float, float]], fill: RGB, width: float) -> None:
        self.pen.line([self.xy(u, v) for u, v in points], fill=fill, width=max(1, round(width * self.size)))

    # -- recording
    def add(
        self, kind: str, count: int, colour: str | None, centres=None, span: str | None = None, main: bool = False
    ) -> int:
        """Record a drawn group; its region is measured in the final (mirrored) image."""
        if span in ("horizontal", "vertical") and self.transpose:
            span = "vertical" if span == "horizontal" else "horizontal"
        self.things.append(Thing(kind, count, colour, span or self.region(centres), main))
        return len(self.things) - 1

    def relate(self, subject: int, relation: str, obj: int) -> None:
        self.relations.append((subject, relation, obj))

    def region(self, centres: list[tuple[float, float]]) -> str:
        points = np.array([self.xy(u, v) for u, v in centres]) / self.size
        if len(points) > 2 and np.all(points.max(0) - points.min(0) > 0.5):
            return "everywhere"
        x, y = points.mean(0) - 0.5
        horizontal = "left" if x < -0.15 else "right" if x > 0.15 else ""
        vertical = "top" if y < -0.15 else "bottom" if y > 0.15 else ""
        return f"{vertical} {horizontal}".strip() or "center"

    def finish(self) -> Image.Image:
        """Add sensor-like grain so no region is perfectly flat."""
        grain = self.noise.integers(-6, 7, (self.size, self.size, 1), dtype=np.int16)
        return Image.fromarray(np.clip(np.asarray(self.image, np.int16) + grain, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- objects


def shade(rgb: RGB, factor: float) -> RGB:
    return tuple(min(255, int(c * factor)) for c in rgb)


def grid(cv: Canvas, box: Box, n: int, jitter: float = 0.2):
    """n jittered cell centres filling `box`, and the cell size, so objects never pile up."""
    u0, v0, u1, v1 = box
    cols = min(n, max(1, round(math.sqrt(n * (u1 - u0) / max(v1 - v0, 1e-3)))))
    rows = math.ceil(n / cols)
    cw, ch = (u1 - u0) / cols, (v1 - v0) / rows
    cells = np.sort(cv.rng.permutation(rows * cols)[:n])
    shift = cv.rng.uniform(-jitter, jitter, (n, 2))
    centres = [
        (u0 + (c % cols + 0.5 + du) * cw, v0 + (c // cols + 0.5 + dv) * ch)
        for c, (du, dv) in zip(cells, shift, strict=True)
    ]
    return centres, (cw, ch)


def building(cv: Canvas, u: float, v: float, hu: float, hv: float, roof: RGB) -> None:
    """A block with a cast shadow and a roof ridge: reads as a building from above."""
    cv.rect(u - hu + 0.012, v - hv + 0.012, u + hu + 0.012, v + hv + 0.012, SHADOW)
    cv.rect(u - hu, v - hv, u + hu, v + hv, roof)
    cv.rect(u - hu, v - 0.004, u + hu, v + 0.004, shade(roof, 0.8))


def tank(cv: Canvas, u: float, v: float, r: float, colour: RGB) -> None:
    cv.ellipse(u + 0.4 * r, v + 0.4 * r, r, r, SHADOW)
    cv.ellipse(u, v, r, r, colour)
    cv.ellipse(u, v, 0.6 * r, 0.6 * r, shade(colour, 0.86))


def tree(cv: Canvas, u: float, v: float, r: float, colour: RGB) -> None:
    cv.ellipse(u + 0.3 * r, v + 0.3 * r, r, r, shade(colour, 0.45))
    cv.ellipse(u, v, r, r, colour)
    cv.ellipse(u - 0.3 * r, v - 0.3 * r, 0.4 * r, 0.4 * r, shade(colour, 1.18))


def plane(cv: Canvas, u: float, v: float, length: float, colour: RGB) -> None:
    """Fuselage, wings and tail: the cross shape planes have in satellite images."""
    cv.rect(u - 0.08 * length, v - 0.5 * length, u + 0.08 * length, v + 0.5 * length, colour)
    cv.rect(u - 0.5 * length, v - 0.12 * length, u + 0.5 * length, v + 0.06 * length, colour)
    cv.rect(u - 0.2 * length, v + 0.34 * length, u + 0.2 * length, v + 0.44 * length, colour)


def vehicle(cv: Canvas, u: float, v: float, hu: float, hv: float, colour: RGB) -> None:
    """A car seen from above: a body with a darker windscreen."""
    cv.rect(u - hu, v - hv, u + hu, v + hv, colour)
    cv.rect(u - hu, v - 0.45 * hv, u + hu, v - 0.1 * hv, shade(colour, 0.6))


def boat(cv: Canvas, u: float, v: float, hu: float, hv: float, colour: RGB) -> None:
    """A hull with a pointed bow and a pale cabin."""
    cv.polygon(
        [(u - hu, v + hv), (u - hu, v - 0.3 * hv), (u, v - hv), (u + hu, v - 0.3 * hv), (u + hu, v + hv)], colour
    )
    cv.rect(u - 0.6 * hu, v, u + 0.6 * hu, v + 0.6 * hv, shade(colour, 1.25))


SECONDARY = ("storage tank", "parking lot", "tree", "pond", "building")


def secondary(cv: Canvas, box: Box, kind: str) -> None:
    """Objects any scene may hold, so a caption must say more than the class name."""
    u0, v0, u1, v1 = box
    mid = ((u0 + u1) / 2, (v0 + v1) / 2)
    if kind == "pond":
        colour = cv.pick(("blue", "turquoise"))
        cv.ellipse(*mid, 0.42 * (u1 - u0), 0.42 * (v1 - v0), cv.colour(colour))
        cv.add("pond", 1, colour, [mid])
    elif kind == "parking lot":
        cv.rect(u0, v0, u1, v1, cv.colour("dark grey"))
        centres, (cw, ch) = grid(cv, box, cv.randint(3, 8), jitter=0.0)
        for u, v in centres:
            vehicle(cv, u, v, 0.22 * cw, 0.35 * ch, cv.colour(cv.pick(CAR_COLOURS)))
        cv.add("parking lot", 1, None, [mid])
    else:
        low, high, colours = {
            "storage tank": (2, 5, ("white", "grey")),
            "tree": (3, 8, ("green", "dark green")),
            "building": (1, 3, ("white", "grey", "red", "blue")),
        }[kind]
        n, colour = cv.randint(low, high), cv.pick(colours)
        centres, (cw, ch) = grid(cv, box, n)
        for u, v in centres:
            if kind == "storage tank":
                tank(cv, u, v, 0.36 * min(cw, ch), cv.colour(colour))
            elif kind == "tree":
                tree(cv, u, v, 0.4 * min(cw, ch), cv.colour(colour))
            else:
                building(cv, u, v, 0.38 * cw, 0.32 * ch, cv.colour(colour))
        cv.add(kind, n, colour, centres)


# ----------------------------------------------------------------------------- scenes
# Each draws its layout, records its Things and returns free boxes for secondary objects.


def airport(cv: Canvas) -> list[Box]:
    cv.ground((150, 160, 110))
    n_runways = cv.pick((1, 1, 2))
    for k in range(n_runways):
        v = 0.62 + 0.2 * k
        cv.rect(0.02, v - 0.05, 0.98, v + 0.05, cv.colour("grey"))
        for u in np.arange(0.06, 0.94, 0.09):
            cv.rect(u, v - 0.005, u + 0.045, v + 0.005, cv.colour("white"))
    runway = cv.add("runway", n_runways, "grey", span="horizontal", main=True)
    u0 = cv.uniform(0.04, 0.28)
    cv.rect(u0 - 0.02, 0.21, u0 + 0.38, 0.52, cv.colour((178, 178, 172)))  # apron
    cv.rect(u0 + 0.12, 0.5, u0 + 0.16, 0.6, cv.colour("grey"))  # taxiway
    colour, width = cv.pick(("white", "grey")), cv.uniform(0.2, 0.34)
    building(cv, u0 + width / 2, 0.12, width / 2, 0.06, cv.colour(colour))
    terminal = cv.add("terminal building", 1, colour, [(u0 + width / 2, 0.12)])
    n, colour = cv.randint(1, 6), cv.pick(("white", "red", "blue", "yellow"))
    centres, (cw, ch) = grid(cv, (u0, 0.23, u0 + 0.36, 0.5), n, jitter=0.1)
    for u, v in centres:
        plane(cv, u, v, min(0.9 * cw, 0.9 * ch, 0.13), cv.colour(colour))
    planes = cv.add("plane", n, colour, centres, main=True)
    cv.relate(planes, "parked near", terminal)
    cv.relate(planes, "beside", runway)
    return [(0.7, 0.04, 0.97, 0.44)]


def beach(cv: Canvas) -> list[Box]:
    sand = cv.pick(("yellow", "white"))
    cv.ground({"yellow": (222, 200, 150), "white": (234, 228, 210)}[sand], rough=10)
    shore, amp, phase = cv.uniform(0.5, 0.64), cv.uniform(0.01, 0.05), cv.uniform(0, 6.3)
    edge = [(u, shore + amp * math.sin(5 * u + phase)) for u in np.linspace(0, 1, 21)]
    water = cv.pick(("blue", "turquoise"))
    cv.polygon(edge + [(1, 1), (0, 1)], cv.colour(water))
    cv.line(edge, cv.colour("white"), 0.012)
    sea = cv.add("sea", 1, water, [(0.5, 0.85)], main=True)
    cv.add("sand", 0, sand, [(0.5, 0.15)])
    left = cv.pick((True, False))
    box = (0.05, shore - 0.3, 0.48, shore - 0.08) if left else (0.52, shore - 0.3, 0.95, shore - 0.08)
    n, colour = cv.randint(1, 6), cv.pick(("red", "blue", "yellow", "orange", "green"))
    centres, (cw, ch) = grid(cv, box, n)
    for u, v in centres:
        r = min(0.35 * min(cw, ch), 0.045)
        cv.ellipse(u + 0.3 * r, v + 0.3 * r, r, r, SHADOW)
        cv.ellipse(u, v, r, r, cv.colour(colour))
        cv.ellipse(u, v, 0.2 * r, 0.2 * r, cv.colour("white"))
    umbrellas = cv.add("umbrella", n, colour, centres, main=True)
    cv.relate(umbrellas, "near", sea)
    if (n_boats := cv.randint(0, 3)) > 0:
        colour = cv.pick(("white", "red", "yellow"))
        centres, _ = grid(cv, (0.1, shore + 0.12, 0.9, 0.94), n_boats)
        for u, v in centres:
            boat(cv, u, v, 0.018, 0.045, cv.colour(colour))
        cv.relate(cv.add("boat", n_boats, colour, centres), "floating on", sea)
    return [(0.52, 0.04, 0.95, shore - 0.34) if left else (0.05, 0.04, 0.48, shore - 0.34)]


def farmland(cv: Canvas) -> list[Box]:
    cv.ground((168, 142, 102), rough=8)  # dirt tracks between the fields
    cols, rows = cv.randint(2, 4), cv.randint(2, 3)
    us = np.cumsum([0, *cv.rng.uniform(0.6, 1.4, cols)])
    vs = np.cumsum([0, *cv.rng.uniform(0.6, 1.4, rows)])
    us, vs = us / us[-1], vs / vs[-1]
    free = cv.randint(0, rows * cols - 1) if cv.rng.random() < 0.6 else -1
    fields: dict[str, list[tuple[float, float]]] = {}
    boxes = []
    for k in range(rows * cols):
        box = (us[k % cols] + 0.012, vs[k // cols] + 0.012, us[k % cols + 1] - 0.012, vs[k // cols + 1] - 0.012)
        if k == free:
            boxes.append(box)
            continue
        name = cv.pick(("green", "light green", "brown", "yellow"))
        rgb = cv.colour(name)
        cv.rect(*box, rgb)
        if cv.rng.random() < 0.7:  # crop rows
            for t in np.arange(box[1] + 0.015, box[3], 0.03):
                cv.line([(box[0], t), (box[2], t)], shade(rgb, 0.85), 0.006)
        fields.setdefault(name, []).append(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
    for name, centres in fields.items():
        cv.add("field", len(centres), name, centres, main=True)
    return boxes


def forest(cv: Canvas) -> list[Box]:
    cv.ground((30, 62, 32), rough=10)
    tone, autumn = cv.pick(("dark green", "green")), cv.pick((None, None, "yellow", "orange"))
    clearing = cv.pick(
        (
            (0.06, 0.06, 0.44, 0.44),
            (0.56, 0.06, 0.94, 0.44),
            (0.06, 0.56, 0.44, 0.94),
            (0.56, 0.56, 0.94, 0.94),
            (0.3, 0.3, 0.7, 0.7),
        )
    )
    mid = ((clearing[0] + clearing[2]) / 2, (clearing[1] + clearing[3]) / 2)
    ground = cv.pick(("light green", "brown"))
    cv.ellipse(*mid, 0.25, 0.25, cv.colour(ground))
    step = cv.uniform(0.07, 0.1)
    axis = np.arange(step / 2, 1, step)
    points = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
    points += cv.rng.uniform(-0.3 * step, 0.3 * step, points.shape)
    radii = cv.rng.uniform(0.5, 0.7, len(points)) * step
    is_autumn = cv.rng.random(len(points)) < (0.2 if autumn else 0.0)
    groups: dict[str, list] = {tone: []}
    for (u, v), r, a in zip(points, radii, is_autumn, strict=True):
        if math.hypot(u - mid[0], v - mid[1]) > 0.22:  # keep the clearing clear
            tree(cv, u, v, r, cv.colour(autumn if a else tone, jitter=18))
            groups.setdefault(autumn if a else tone, []).append((u, v))
    trees = cv.add("tree", len(groups[tone]), tone, groups[tone], main=True)
    if autumn in groups:
        cv.add("tree", len(groups[autumn]), autumn, groups[autumn], main=True)
    cv.relate(cv.add("clearing", 1, ground, [mid], main=True), "surrounded by", trees)
    return [(mid[0] - 0.12, mid[1] - 0.12, mid[0] + 0.12, mid[1] + 0.12)]


def harbor(cv: Canvas) -> list[Box]:
    water = cv.pick(("blue", "turquoise"))
    cv.ground(shade(PALETTE[water], 0.8), rough=8)
    land = cv.uniform(0.2, 0.3)
    cv.rect(0, 0, 1, land, cv.colour((164, 160, 150)))
    cv.rect(0, land - 0.015, 1, land, cv.colour("dark grey"))
    cv.add("water", 0, water, [(0.5, 0.85)], main=True)
    n, colour = cv.randint(1, 4), cv.pick(("grey", "white", "brown"))
    us = (np.arange(n) + 0.5) / n * 0.9 + 0.05 + cv.rng.uniform(-0.03, 0.03, n)
    end = cv.uniform(0.6, 0.75)
    for u in us:
        cv.rect(u - 0.022, land, u + 0.022, end, cv.colour(colour))
    piers = cv.add("pier", n, colour, [(u, (land + end) / 2) for u in us], main=True)
    slots = [
        (u + side * 0.052, v)
        for u in us
        for side in (-1, 1)  # berths on both sides of each pier
        for v in np.arange(land + 0.07, end - 0.03, 0.1)
    ]
    n_boats, colour = min(len(slots), cv.randint(1, 6)), cv.pick(("white", "red", "yellow", "orange"))
    centres = [slots[i] for i in sorted(cv.rng.permutation(len(slots))[:n_boats])]
    for u, v in centres:
        boat(cv, u, v, 0.02, 0.045, cv.colour(colour))
    cv.relate(cv.add("boat", n_boats, colour, centres, main=True), "moored along", piers)
    if cv.rng.random() < 0.4:
        colour, u = cv.pick(("red", "grey", "white")), cv.uniform(0.25, 0.75)
        cv.rect(u - 0.16, 0.85, u + 0.16, 0.91, cv.colour(colour))
        cv.rect(u + 0.08, 0.855, u + 0.14, 0.905, cv.colour("white"))
        cv.add("cargo ship", 1, colour, [(u, 0.88)])
    return [cv.pick(((0.04, 0.03, 0.46, land - 0.04), (0.54, 0.03, 0.96, land - 0.04)))]


def industrial(cv: Canvas) -> list[Box]:
    cv.ground((172, 170, 160), rough=10)
    road_v = cv.uniform(0.45, 0.58)
    cv.rect(0, road_v - 0.04, 1, road_v + 0.04, cv.colour("dark grey"))
    road = cv.add("road", 1, "dark grey", span="horizontal")
    n, roof = cv.randint(2, 4), cv.pick(("white", "grey", "blue"))
    centres, (cw, ch) = grid(cv, (0.04, 0.04, 0.96, road_v - 0.07), n, jitter=0.05)
    for u, v in centres:
        building(cv, u, v, cv.uniform(0.3, 0.42) * cw, cv.uniform(0.25, 0.4) * ch, cv.colour(roof))
    cv.relate(cv.add("building", n, roof, centres, main=True), "along", road)
    boxes = [(0.04, road_v + 0.07, 0.48, 0.96), (0.52, road_v + 0.07, 0.96, 0.96)]
    tank_box = boxes.pop(cv.randint(0, 1))
    n, colour = cv.randint(2, 6), cv.pick(("white", "grey"))
    centres, (cw, ch) = grid(cv, tank_box, n, jitter=0.05)
    for u, v in centres:
        tank(cv, u, v, 0.36 * min(cw, ch), cv.colour(colour))
    cv.relate(cv.add("storage tank", n, colour, centres, main=True), "next to", road)
    return boxes


def parking(cv: Canvas) -> list[Box]:
    cv.ground(cv.pick(((120, 150, 90), (165, 165, 158))), rough=10)
    right = cv.pick((0.95, 0.7))
    cv.rect(0.05, 0.05, right, 0.95, cv.colour((74, 74, 80)))
    lot = cv.add("parking lot", 1, None, [((0.05 + right) / 2, 0.5)])
    rows, fill = cv.randint(2, 4), cv.uniform(0.35, 1.0)
    colour = cv.pick(CAR_COLOURS) if cv.rng.random() < 0.35 else "colorful"
    row_h = 0.9 / rows
    cars, row_centres = [], []
    for r in range(rows):
        v = 0.05 + (r + 0.5) * row_h
        row_centres.append(((0.05 + right) / 2, v))
        for u in np.arange(0.1, right - 0.03, 0.07):
            cv.line([(u - 0.035, v - 0.06), (u - 0.035, v + 0.06)], PALETTE["white"], 0.005)
            if cv.rng.random() < fill:
                vehicle(cv, u, v, 0.02, 0.045, cv.colour(cv.pick(CAR_COLOURS) if colour == "colorful" else colour))
                cars.append((u, v))
    cv.add("row of parked cars", rows, None, row_centres, main=True)
    cv.relate(cv.add("car", len(cars), colour, cars, main=True), "parked in", lot)
    return [(0.76, 0.08, 0.96, 0.92)] if right < 0.9 else []


def residential(cv: Canvas) -> list[Box]:
    cv.ground((125, 160, 95), rough=12)
    rv, ru, cross = cv.uniform(0.4, 0.6), cv.uniform(0.35, 0.65), cv.rng.random() < 0.5
    cv.rect(0, rv - 0.035, 1, rv + 0.035, cv.colour("grey"))
    if cross:
        cv.rect(ru - 0.035, 0, ru + 0.035, 1, cv.colour("grey"))
    else:
        ru = 0.5
    roads = cv.add("road", 1 + cross, "grey", span="crossing" if cross else "horizontal", main=True)
    blocks = [
        (0.03, 0.03, ru - 0.07, rv - 0.07),
        (ru + 0.07, 0.03, 0.97, rv - 0.07),
        (0.03, rv + 0.07, ru - 0.07, 0.97),
        (ru + 0.07, rv + 0.07, 0.97, 0.97),
    ]
    free = [blocks.pop(cv.randint(0, 3))] if cv.rng.random() < 0.5 else []
    roofs = list(
        dict.fromkeys(
            cv.pick(("red", "brown", "grey", "blue", "orange"))  # one or two roof colours
            for _ in range(cv.randint(1, 2))
        )
    )
    houses: dict[str, list] = {roof: [] for roof in roofs}
    pools = []
    for block in blocks:
        centres, (cw, ch) = grid(cv, block, cv.randint(1, 4), jitter=0.1)
        for u, v in centres:
            roof = cv.pick(roofs)
            hu, hv = min(0.3 * cw, 0.06), min(0.3 * ch, 0.05)
            building(cv, u, v, hu, hv, cv.colour(roof))
            houses[roof].append((u, v))
            if cv.rng.random() < 0.2:
                cv.rect(u + hu + 0.02, v - 0.02, u + hu + 0.05, v + 0.02, cv.colour("light blue"))
                pools.append((u + hu + 0.035, v))
    for roof in roofs:
        if houses[roof]:
            cv.relate(cv.add("house", len(houses[roof]), roof, houses[roof], main=True), "along", roads)
    if pools:
        cv.add("swimming pool", len(pools), None, pools)
    return free


def river(cv: Canvas) -> list[Box]:
    cv.ground(cv.pick(((110, 150, 80), (150, 160, 100), (95, 130, 70))), rough=14)
    c, amp, phase = cv.uniform(0.42, 0.58), cv.uniform(0.02, 0.08), cv.uniform(0, 6.3)
    width, freq = cv.uniform(0.09, 0.15), cv.uniform(3.0, 8.0)
    mid = lambda u: c + amp * math.sin(freq * u + phase)  # noqa: E731
    us = np.linspace(-0.02, 1.02, 27)
    colour = cv.pick(("blue", "green", "brown"))
    rgb = {"blue": (52, 92, 150), "green": (58, 104, 84), "brown": (124, 104, 70)}[colour]
    cv.polygon([(u, mid(u) - width / 2) for u in us] + [(u, mid(u) + width / 2) for u in us[::-1]], cv.colour(rgb))
    the_river = cv.add("river", 1, colour, span="horizontal", main=True)
    top, bottom = c - amp - width / 2 - 0.05, c + amp + width / 2 + 0.05
    n, colour = cv.randint(0, 2), cv.pick(("grey", "red", "white"))
    bridge_us = sorted(cv.rng.permutation([0.25, 0.5, 0.75])[:n])
    for u in bridge_us:
        cv.rect(u - 0.015, mid(u) - width / 2 - 0.12, u + 0.015, mid(u) + width / 2 + 0.12, cv.colour("dark grey"))
        cv.rect(u - 0.025, mid(u) - width / 2 - 0.04, u + 0.025, mid(u) + width / 2 + 0.04, cv.colour(colour))
    if n:
        cv.relate(cv.add("bridge", n, colour, [(u, mid(u)) for u in bridge_us], main=True), "crossing", the_river)
    boxes = [(0.05, 0.03, 0.45, top), (0.55, bottom, 0.95, 0.97)]
    if not n or cv.rng.random() < 0.5:  # trees along one bank
        bank = boxes.pop(cv.randint(0, 1))
        side = -1 if bank[1] < c else 1
        centres = [
            (u, mid(u) + side * (width / 2 + 0.035))
            for u in np.arange(0.05, 0.97, 0.075)
            if all(abs(u - b) > 0.05 for b in bridge_us)
        ]
        for u, v in centres:
            tree(cv, u, v, 0.028, cv.colour("dark green", jitter=18))
        cv.relate(cv.add("tree", len(centres), "dark green", centres), "along", the_river)
    return boxes


def stadium(cv: Canvas) -> list[Box]:
    cv.ground(cv.pick(((165, 165, 158), (120, 150, 90))), rough=10)
    cu, scale = cv.pick((0.34, 0.5, 0.66)), cv.uniform(0.85, 1.0)
    ru, rv = (0.27 if cu != 0.5 else 0.32) * scale, 0.24 * scale
    stand = cv.rng.random() < 0.6
    if stand:
        cv.ellipse(cu, 0.5, ru + 0.06, rv + 0.06, cv.colour("grey"))
    colour = cv.pick(("red", "blue", "orange"))
    cv.ellipse(cu, 0.5, ru, rv, cv.colour(colour))
    cv.ellipse(cu, 0.5, ru - 0.012, rv - 0.012, None, outline=PALETTE["white"], width=0.004)
    cv.ellipse(cu, 0.5, ru - 0.045, rv - 0.045, cv.colour("green"))
    cv.line([(cu, 0.5 - rv + 0.06), (cu, 0.5 + rv - 0.06)], PALETTE["white"], 0.006)
    cv.ellipse(cu, 0.5, 0.04, 0.04, None, outline=PALETTE["white"], width=0.005)
    track = cv.add("running track", 1, colour, [(cu, 0.5)], main=True)
    cv.relate(track, "around", cv.add("football field", 1, "green", [(cu, 0.5)], main=True))
    if stand:
        cv.relate(cv.add("grandstand", 1, "grey", [(cu, 0.5)]), "surrounding", track)
    if cu < 0.5:
        return [(0.74, 0.1, 0.97, 0.9)]
    return [(0.03, 0.1, 0.26, 0.9)] if cu > 0.5 else [(0.15, 0.02, 0.85, 0.18), (0.15, 0.82, 0.85, 0.98)]


DRAWERS = {
    "airport": airport,
    "beach": beach,
    "farmland": farmland,
    "forest": forest,
    "harbor": harbor,
    "industrial": industrial,
    "parking": parking,
    "residential": residential,
    "river": river,
    "stadium": stadium,
}


# ----------------------------------------------------------------------------- captions

SCENE_NOUNS = {
    "airport": ("an airport", "an airfield"),
    "beach": ("a beach", "a seaside beach"),
    "farmland": ("farmland", "an agricultural area"),
    "forest": ("a forest", "a woodland"),
    "harbor": ("a harbor", "a port"),
    "industrial": ("an industrial area", "a factory area"),
    "parking": ("a parking lot", "a car park"),
    "residential": ("a residential area", "a neighborhood"),
    "river": ("a riverside area", "a river valley"),
    "stadium": ("a stadium", "a sports stadium"),
}
WHERE = {
    "horizontal": "running from left to right",
    "vertical": "running from top to bottom",
    "crossing": "crossing each other",
    "everywhere": "across the image",
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}


def plural(kind: str) -> str:
    if " of " in kind:
        head, tail = kind.split(" of ", 1)
        return f"{plural(head)} of {tail}"
    return kind + ("es" if kind.endswith(("s", "sh", "ch", "x")) else "s")


def noun_phrase(t: Thing, definite: bool = False) -> str:
    """ "three red planes", "a white terminal building", "blue water", "the two grey piers"."""
    noun = " ".join(w for w in (t.colour, t.kind if t.count <= 1 else plural(t.kind)) if w)
    if definite:
        det = "the" if t.count <= 1 or t.count >= len(NUMBERS) else f"the {NUMBERS[t.count]}"
    elif t.count == 0:
        det = ""
    elif t.count == 1:
        det = "an" if noun[0] in "aeiou" else "a"
    else:
        det = NUMBERS[t.count] if t.count < len(NUMBERS) else "many"
    return f"{det} {noun}".strip()


def where(t: Thing) -> str:
    return WHERE.get(t.region, f"in the {t.region} corner")


def be(t: Thing) -> str:
    return "are" if t.count > 1 else "is"


def captions(
    scene: str, things: list[Thing], relations: list[tuple[int, str, int]], rng: np.random.Generator
) -> list[str]:
    """Five different captions: an overview, then four that prefer unused templates and subjects."""

    def name() -> str:
        return SCENE_NOUNS[scene][int(rng.integers(len(SCENE_NOUNS[scene])))]

    main = [t for t in things if t.main] or things
    a, *rest = [main[k] for k in rng.permutation(len(main))]
    phrases = [noun_phrase(t) for t in main]
    listing = " and ".join([", ".join(phrases[:-1]), phrases[-1]] if len(phrases) > 1 else phrases)
    if not rest:
        overview = f"{name()} with {noun_phrase(a)}"
    elif rng.random() < 0.5:
        overview = f"{name()} with {noun_phrase(a)} and {noun_phrase(rest[0])}"
    else:
        overview = f"{noun_phrase(a)} and {noun_phrase(rest[0])} in {name()}"
    pool: list[tuple[str, int, str]] = [  # (template, subject thing or -1, text)
        ("aerial", -1, f"an aerial view of {name()} with {listing}"),
        ("satellite", -1, f"a satellite image of {name()} showing {listing}"),
        ("remote", -1, f"a remote sensing image of {name()} that contains {listing}"),
    ]
    for i, t in enumerate(things):
        pool += [
            ("there", i, f"there {be(t)} {noun_phrase(t)} {where(t)}"),
            ("with", i, f"{name()} with {noun_phrase(t)} {where(t)}"),
        ]
        if t.region not in ("horizontal", "vertical", "crossing", "everywhere"):
            pool += [
                ("seen", i, f"{noun_phrase(t)} can be seen {where(t)}"),
                ("located", i, f"in this image of {name()}, {noun_phrase(t)} {be(t)} {where(t)}"),
            ]
        for j in range(i + 1, len(things)):
            other = things[j]
            pool.append(("pair", i, f"{noun_phrase(t)} {where(t)} and {noun_phrase(other)} {where(other)}"))
    for s, relation, o in relations:
        subject, obj = things[s], noun_phrase(things[o], definite=True)
        pool += [
            ("relation", s, f"{noun_phrase(subject)} {relation} {obj}"),
            ("relation where", s, f"{name()} where {noun_phrase(subject)} {be(subject)} {relation} {obj}"),
        ]

    def sentence(text: str) -> str:
        return " ".join(text.split()) + "."

    chosen, uses = [sentence(overview)], Counter()
    pool = [pool[k] for k in rng.permutation(len(pool))]  # shuffled, so min() breaks ties at random
    while len(chosen) < 5:
        template, subject, text = min(
            (c for c in pool if sentence(c[2]) not in chosen), key=lambda c: (uses[c[0]], uses[c[1]])
        )
        uses.update([template, subject])
        chosen.append(sentence(text))
    return chosen


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
    for index in tqdm(range(n_images), desc="drawing sample", unit="img", file=sys.stderr, disable=not progress):
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
