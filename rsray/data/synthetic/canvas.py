"""The drawing surface of the sample's scenes (a mirrored, transposed unit frame that records every
group of objects it draws) and the objects scenes are made of."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

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
