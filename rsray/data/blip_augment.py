"""BLIP's RandomAugment, the one PIR's release trains with (X-VLM's `re` transform; ALBEF and BLIP
use the same), built from torchvision's functional ops on PIL images.

It is not torchvision's RandAugment: 10 ops instead of 14, each of the N drawn ops (with
replacement) applied only with probability 0.5, at a fixed level of 10 (not 31 bins), and the
enhancements only brighten and sharpen (factor level/10 * 1.8 + 0.1: 1.36 at level 7). At level L:
rotate +-3L degrees, shear +-0.03L (a factor, about the top-left corner; torchvision puts pixel
centres at +0.5 where the release's cv2 puts them at 0, so row y moves by factor * (y + 0.5)
here against factor * y there: 0.1 px at level 7), translate +-L pixels
(absolute, as the release's translate_const 10 at 224 px), the uncovered area filled with grey
128. Order of draws as the release: the N ops first, then per op its coin and its sign.

Draws come from torch's global CPU generator, so `rsray.data.augment.apply` seeds it per sample
like every other transform. Rotation, shear and translation interpolate bilinearly (the release's
cv2.warpAffine default); autocontrast and equalize are PIL's (the release's cv2 versions say they
match PIL's output).
"""

from __future__ import annotations

import math

import torch

OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
MAX_LEVEL = 10
TRANSLATE_PIXELS = 10  # at MAX_LEVEL
FILL = [128, 128, 128]


def magnitude(name: str, level: float) -> float:
    """The op's argument at `level` (0..MAX_LEVEL), before its random sign; 0 for the ops without one."""
    fraction = level / MAX_LEVEL
    if name == "Rotate":
        return fraction * 30.0  # degrees
    if name in ("ShearX", "ShearY"):
        return fraction * 0.3  # shear factor
    if name in ("TranslateX", "TranslateY"):
        return fraction * TRANSLATE_PIXELS
    if name in ("Brightness", "Sharpness"):
        return fraction * 1.8 + 0.1  # enhancement factor (> 1 from level 5 on)
    return 0.0


def apply_op(image, name: str, value: float):
    """One op with its (signed) argument on a PIL image."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    bilinear = InterpolationMode.BILINEAR
    if name == "Identity":
        return image
    if name == "AutoContrast":
        return F.autocontrast(image)
    if name == "Equalize":
        return F.equalize(image)
    if name == "Brightness":
        return F.adjust_brightness(image, value)
    if name == "Sharpness":
        return F.adjust_sharpness(image, value)
    if name in ("ShearX", "ShearY"):
        degrees = math.degrees(math.atan(value))
        shear = [degrees, 0.0] if name == "ShearX" else [0.0, degrees]
        return F.affine(image, 0.0, [0, 0], 1.0, shear, interpolation=bilinear, fill=FILL, center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        shift = [int(value), 0] if name == "TranslateX" else [0, int(value)]
        return F.affine(image, 0.0, shift, 1.0, [0.0, 0.0], interpolation=bilinear, fill=FILL)
    if name == "Rotate":
        return F.rotate(image, value, interpolation=bilinear, fill=FILL)
    raise ValueError(f"unknown RandomAugment op {name!r}")


class BlipRandomAugment:
    """`num_ops` ops drawn with replacement from OPS, each applied with probability `prob` at `level`."""

    def __init__(self, num_ops: int = 2, level: int = 7, prob: float = 0.5):
        if not 0 <= level <= MAX_LEVEL:
            raise ValueError(f"BLIP RandomAugment level must be in [0, {MAX_LEVEL}], got {level}")
        self.num_ops, self.level, self.prob = num_ops, level, prob

    def draw(self) -> list[tuple[str, float]]:
        """The ops this call applies, with their signed arguments (skipped ops left out)."""
        chosen = [OPS[i] for i in torch.randint(len(OPS), (self.num_ops,)).tolist()]
        applied = []
        for name in chosen:
            if float(torch.rand(())) > self.prob:
                continue
            value = magnitude(name, self.level)
            if name in SIGNED and float(torch.rand(())) < 0.5:
                value = -value
            applied.append((name, value))
        return applied

    def __call__(self, image):
        for name, value in self.draw():
            image = apply_op(image, name, value)
        return image

    def __repr__(self) -> str:
        return f"BlipRandomAugment(num_ops={self.num_ops}, level={self.level}, prob={self.prob})"
