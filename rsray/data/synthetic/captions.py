"""Five captions per image, written only from the `Thing`s the canvas recorded."""

from __future__ import annotations

from collections import Counter

import numpy as np

from rsray.data.synthetic.canvas import NUMBERS, Thing

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
