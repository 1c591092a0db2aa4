"""BLIP's RandomAugment (PIR's release): the level -> argument formulas, what each op does to the
pixels, and the draw: N ops with replacement from 10, each applied with probability 0.5, a random
sign for the geometric ones, from torch's generator (so per-sample seeding fixes it)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from PIL import Image

from rsray.config import ConfigError, load_config
from rsray.data.augment import AugmentConfig, apply, train_transform
from rsray.data.blip_augment import OPS, SIGNED, BlipRandomAugment, apply_op, magnitude
from rsray.models import model_config


def test_level_seven_gives_the_releases_arguments():
    assert magnitude("Rotate", 7) == pytest.approx(21.0)  # degrees
    assert magnitude("ShearX", 7) == magnitude("ShearY", 7) == pytest.approx(0.21)
    assert magnitude("TranslateX", 7) == magnitude("TranslateY", 7) == pytest.approx(7.0)  # pixels
    assert magnitude("Brightness", 7) == magnitude("Sharpness", 7) == pytest.approx(1.36)  # only brighter
    assert magnitude("Equalize", 7) == 0.0
    assert len(OPS) == 10 and "Solarize" not in OPS and "Color" not in OPS  # PIR's list of 10


def constant(value: int, size: int = 16) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8))


def ramp(size: int = 16) -> Image.Image:
    x = np.tile(np.arange(size, dtype=np.uint8) * 10, (size, 1))
    return Image.fromarray(np.stack([x, x, x], axis=-1))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def test_each_op_does_what_its_formula_says():
    assert (pixels(apply_op(constant(100), "Brightness", 1.36)) == 136).all()
    assert (pixels(apply_op(constant(200), "Brightness", 1.36)) == 255).all()  # clipped
    # translate by +7 px: column x shows column x - 7, the uncovered columns grey 128
    moved = pixels(apply_op(ramp(), "TranslateX", 7.0))
    assert (moved[:, 7:] == pixels(ramp())[:, :-7]).all() and (moved[:, :7] == 128).all()
    assert (pixels(apply_op(ramp(), "TranslateY", -7.0))[9:] == 128).all()
    # shear about the top-left corner: row y moves by factor * (y + 0.5) px (torchvision puts pixel
    # centres at +0.5; the release's cv2 at +0, a difference of factor / 2 px), linear in between
    sheared = pixels(apply_op(ramp(), "ShearX", 0.5))
    for y in (0, 4, 8):
        shift = 0.5 * (y + 0.5)
        inside = np.arange(0, 15 - int(np.ceil(shift)))
        assert np.abs(sheared[y, inside, 0] - 10 * (inside + shift)).max() <= 1, y
    # rotation leaves grey corners on a white picture
    rotated = pixels(apply_op(constant(255), "Rotate", 21.0))
    assert (rotated[0, 0] == 128).all() and (rotated[8, 8] == 255).all()
    assert (pixels(apply_op(ramp(), "Identity", 0.0)) == pixels(ramp())).all()


def test_the_draw_applies_each_op_with_probability_half_and_random_signs():
    augment = BlipRandomAugment(num_ops=2, level=7)
    torch.manual_seed(0)
    draws = [augment.draw() for _ in range(4000)]
    applied = [op for ops in draws for op in ops]
    assert len(applied) / (2 * len(draws)) == pytest.approx(0.5, abs=0.02)
    counts = collections.Counter(name for name, _ in applied)
    assert set(counts) == set(OPS) and all(c / len(applied) == pytest.approx(0.1, abs=0.02) for c in counts.values())
    negative = [value < 0 for name, value in applied if name in SIGNED]
    assert sum(negative) / len(negative) == pytest.approx(0.5, abs=0.03)
    assert all(abs(v) == pytest.approx(21.0) for name, v in applied if name == "Rotate")
    # with replacement: the same op twice in one call happens
    assert any(len(ops) == 2 and ops[0][0] == ops[1][0] for ops in draws)


def test_the_pipeline_uses_it_and_seeds_it_per_sample():
    cfg = AugmentConfig(
        train_resize=32, crop=32, rotation=0.0, rand_augment=[2, 7], rand_augment_impl="blip", eval_resize=32
    )
    transform = train_transform(cfg)
    assert any(isinstance(step, BlipRandomAugment) for step in transform.transforms)
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    outs = [apply(transform, image, seed=s) for s in range(6)]
    assert torch.equal(outs[0], apply(transform, image, seed=0))
    assert any(not torch.equal(outs[0], other) for other in outs[1:])


def test_the_release_preset_selects_it_and_bad_values_are_refused():
    assert model_config(load_config("model/priorclip-release")).augment.rand_augment_impl == "blip"
    assert model_config(load_config("model/priorclip")).augment.rand_augment_impl == "torchvision"
    with pytest.raises(ConfigError, match=r"rand_augment: blip's magnitude is a level in \[0, 10\], got 15"):
        model_config(
            load_config(
                "model/priorclip-tiny", ["model.augment.rand_augment=[2, 15]", "model.augment.rand_augment_impl=blip"]
            )
        )
    with pytest.raises(ConfigError, match="rand_augment_impl: must be torchvision or blip"):
        model_config(load_config("model/priorclip-tiny", ["model.augment.rand_augment_impl=albef"]))
