"""Image pipelines: shapes, normalisation, randomness that varies by seed and only by seed."""

import numpy as np
import pytest
import torch
from PIL import Image

from rsray.data.augment import MEANS, AugmentConfig, apply, eval_transform, train_transform

SWAN_SMALL = AugmentConfig(train_resize=36, crop=32, rotation=90.0, eval_resize=32)
PRIORCLIP_SMALL = AugmentConfig(
    train_resize=32,
    crop=28,
    rotation=0.0,
    hflip=True,
    random_resized_crop=[0.5, 1.0],
    rand_augment=[2, 7],
    eval_resize=28,
    normalize="clip",
    interpolation="bicubic",
)


def pattern(size=40, width=None) -> Image.Image:
    """A picture with structure in every direction, so crops, flips and rotations all show."""
    width = width or size
    y, x = np.mgrid[0:size, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // size, (x * y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.mark.parametrize("cfg", [SWAN_SMALL, PRIORCLIP_SMALL], ids=["swan", "priorclip"])
def test_train_output_shape_and_dtype_from_pil_and_uint8_tensor(cfg):
    transform = train_transform(cfg)
    tensor_input = torch.from_numpy(np.array(pattern())).permute(2, 0, 1).contiguous()
    for image in (pattern(), tensor_input):
        out = apply(transform, image, seed=3)
        assert out.shape == (3, cfg.crop, cfg.crop) and out.dtype == torch.float32
        assert type(out) is torch.Tensor and out.isfinite().all()  # plain tensor, not a tv_tensor
    # the same seed gives the same result whichever form the picture came in
    assert torch.allclose(apply(transform, pattern(), 5), apply(transform, tensor_input, 5))


@pytest.mark.parametrize("norm", sorted(MEANS))
def test_eval_normalises_with_the_configured_mean_and_std(norm):
    colour = (200, 100, 50)
    out = eval_transform(AugmentConfig(eval_resize=16, normalize=norm))(Image.new("RGB", (40, 40), colour))
    mean, std = MEANS[norm]
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, mean, std, strict=True)]
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    assert torch.allclose(out.std(dim=(1, 2)), torch.zeros(3), atol=1e-5)


def test_eval_is_deterministic_and_square():
    transform = eval_transform(SWAN_SMALL)
    a, b = transform(pattern(40, 60)), transform(pattern(40, 60))
    assert a.shape == (3, 32, 32) and torch.equal(a, b)


def test_rotation_and_crop_vary_by_seed_and_only_by_seed():
    rotate_only = train_transform(AugmentConfig(train_resize=32, crop=32, rotation=90.0))
    crop_only = train_transform(AugmentConfig(train_resize=40, crop=24, rotation=0.0))
    for transform in (rotate_only, crop_only):
        outs = [apply(transform, pattern(), seed) for seed in range(6)]
        assert len({o.sum().item() for o in outs}) > 3  # different seeds: different pictures
        assert torch.equal(apply(transform, pattern(), 4), outs[4])  # same seed: same picture


def test_seeding_leaves_the_callers_random_stream_alone():
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    apply(train_transform(SWAN_SMALL), pattern(), seed=123)
    assert torch.equal(torch.rand(4), expected)


def test_unseeded_calls_use_the_global_generator():
    transform = train_transform(SWAN_SMALL)
    torch.manual_seed(0)
    first = [transform(pattern()) for _ in range(2)]
    torch.manual_seed(0)
    again = [transform(pattern()) for _ in range(2)]
    assert not torch.equal(first[0], first[1]) and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_bad_config_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="augment.crop"):
        train_transform(AugmentConfig(train_resize=32, crop=64))
    with pytest.raises(ValueError, match="augment.normalize"):
        eval_transform(AugmentConfig(normalize="nope"))
