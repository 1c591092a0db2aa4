"""One drawer per scene class: lays out its objects on a `Canvas` and returns free boxes for extras."""

from __future__ import annotations

import math

import numpy as np

from rsray.data.synthetic.canvas import (
    CAR_COLOURS,
    PALETTE,
    SHADOW,
    Box,
    Canvas,
    boat,
    building,
    grid,
    plane,
    shade,
    tank,
    tree,
    vehicle,
)

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
