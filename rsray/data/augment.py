"""Image augmentation as a model's config declares it (SWAN: resize 278, rotate 0-90, crop 256).

Shards hold images already resized once by the prepare stage; what happens here runs per sample
at load time, on CPU workers, with torchvision transforms (v2).

Pipelines (both accept a PIL image or a uint8 tensor [3, H, W]; tensors are turned into PIL first,
which is faster for these operations and the only way bicubic works everywhere):

  train: Resize(train_resize, shorter side) -> RandomRotation([0, rotation]) if rotation > 0
         -> RandomCrop(crop) -> RandomHorizontalFlip if hflip -> RandAugment(num_ops, magnitude)
         if rand_augment -> float tensor in [0, 1] -> Normalize(MEANS[normalize]) (a plain torch.Tensor)
         `rand_augment_impl: blip` uses BLIP's RandomAugment (rsray.data.blip_augment: PIR's
         release) instead of torchvision's; its magnitude is a level of 10, not of 31 bins.
         With `random_resized_crop: [min, max]`, RandomResizedCrop(crop, scale=(min, max)) replaces
         Resize + RandomCrop (CLIP style); rotation, if any, still comes before it.
  eval:  Resize((eval_resize, eval_resize)) -> float tensor -> Normalize. No randomness.

`interpolation` applies to resizing, cropping and RandAugment. Rotation always interpolates
bilinearly (rotating with bicubic buys nothing visible); the corners it uncovers are black.

Randomness and determinism. torchvision's v2 transforms draw from torch's global CPU generator
and take no generator argument. rsray therefore seeds *per sample*: `apply(transform, image,
seed)` (and `seeded_rng`, for many samples in a row) sets the global CPU generator to `seed` for
the call and restores the previous state afterwards, so the caller's own random stream (dropout
on CPU, samplers) is untouched, and a sample's augmentation depends only on its seed: the same
for any number of DataLoader workers, any batching, with or without Ray. The loader draws these
seeds from a numpy Generator seeded by (seed, epoch) in the main process (see `rsray.data.loader`).
Only the CPU generator is touched (never CUDA's), so this is safe in a process that trains on a GPU.
Calling a transform directly (seed=None) just uses the global generator, as torchvision does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

MEANS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


@dataclass
class AugmentConfig:
    """Per-sample image pipeline for training and for evaluation."""

    train_resize: int = 278  # shorter side before the random crop
    crop: int = 256  # training crop (square)
    rotation: float = 90.0  # random rotation in [0, rotation] degrees; 0 = off
    hflip: bool = False
    random_resized_crop: list[float] = field(default_factory=list)  # [min, max] scale: CLIP-style crop instead
    rand_augment: list[int] = field(default_factory=list)  # [num_ops, magnitude]; empty = off
    rand_augment_impl: str = "torchvision"  # torchvision (RandAugment, 31 bins) | blip (PIR's, level of 10)
    eval_resize: int = 256  # evaluation: resize to this square, no crop
    normalize: str = "imagenet"  # imagenet | clip
    interpolation: str = "bilinear"  # bilinear | bicubic

    def check(self) -> Iterator[tuple[str, str]]:
        for name in ("train_resize", "crop", "eval_resize"):
            if getattr(self, name) < 8:
                yield name, f"must be at least 8, got {getattr(self, name)}"
        if self.crop > self.train_resize:
            yield "crop", f"must not exceed train_resize ({self.train_resize}), got {self.crop}"
        if self.normalize not in MEANS:
            yield "normalize", f"must be one of {', '.join(MEANS)}, got {self.normalize!r}"
        if self.interpolation not in ("bilinear", "bicubic"):
            yield "interpolation", f"must be bilinear or bicubic, got {self.interpolation!r}"
        if self.random_resized_crop and len(self.random_resized_crop) != 2:
            yield "random_resized_crop", "expected [min_scale, max_scale]"
        if self.rand_augment and len(self.rand_augment) != 2:
            yield "rand_augment", "expected [num_ops, magnitude]"
        if self.rand_augment_impl not in ("torchvision", "blip"):
            yield "rand_augment_impl", f"must be torchvision or blip, got {self.rand_augment_impl!r}"
        elif self.rand_augment_impl == "blip" and len(self.rand_augment) == 2 and not 0 <= self.rand_augment[1] <= 10:
            yield "rand_augment", f"blip's magnitude is a level in [0, 10], got {self.rand_augment[1]}"


Transform = Callable[[Any], Any]  # PIL image or uint8 tensor [3, H, W] -> float tensor [3, H, W]


def _mode(cfg: AugmentConfig):
    from torchvision.transforms.v2 import InterpolationMode

    return InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else InterpolationMode.BILINEAR


def _checked(cfg: AugmentConfig) -> None:
    problems = [f"augment.{key}: {why}" for key, why in cfg.check()]
    if problems:
        raise ValueError("; ".join(problems))


def _to_pil():
    from torchvision.transforms import v2

    return v2.ToPILImage()  # tensors -> PIL; a PIL image passes through unchanged


def _finish(cfg: AugmentConfig) -> list:
    import torch
    from torchvision.transforms import v2

    mean, std = MEANS[cfg.normalize]
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), v2.ToPureTensor()]


def train_transform(cfg: AugmentConfig) -> Transform:
    """The random training pipeline of `cfg` (see the module docstring for the order)."""
    from torchvision.transforms import v2

    _checked(cfg)
    mode = _mode(cfg)
    steps: list = [_to_pil()]
    if not cfg.random_resized_crop:
        steps.append(v2.Resize(cfg.train_resize, interpolation=mode, antialias=True))
    if cfg.rotation > 0:
        steps.append(v2.RandomRotation((0.0, float(cfg.rotation)), interpolation=v2.InterpolationMode.BILINEAR))
    if cfg.random_resized_crop:
        low, high = (float(x) for x in cfg.random_resized_crop)
        steps.append(v2.RandomResizedCrop(cfg.crop, scale=(low, high), interpolation=mode, antialias=True))
    else:
        steps.append(v2.RandomCrop(cfg.crop))
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if cfg.rand_augment:
        num_ops, magnitude = (int(x) for x in cfg.rand_augment)
        if cfg.rand_augment_impl == "blip":
            from rsray.data.blip_augment import BlipRandomAugment

            steps.append(BlipRandomAugment(num_ops, magnitude))
        else:
            steps.append(v2.RandAugment(num_ops=num_ops, magnitude=magnitude, interpolation=mode))
    return v2.Compose(steps + _finish(cfg))


def eval_transform(cfg: AugmentConfig) -> Transform:
    """The deterministic evaluation pipeline: resize to an eval_resize square, normalise."""
    from torchvision.transforms import v2

    _checked(cfg)
    size = (cfg.eval_resize, cfg.eval_resize)
    return v2.Compose([_to_pil(), v2.Resize(size, interpolation=_mode(cfg), antialias=True)] + _finish(cfg))


@contextlib.contextmanager
def seeded_rng():
    """Save torch's global CPU generator state on entry and restore it on exit.

    Inside, call `reseed(seed)` before each sample: its random draws then depend on `seed` only."""
    import torch

    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


def reseed(seed: int) -> None:
    """Set torch's global CPU generator (not CUDA's) to `seed`; use inside `seeded_rng()`."""
    import torch

    torch.default_generator.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)


def apply(transform: Transform, image, seed: int | None = None):
    """`transform(image)`, with its randomness fixed by `seed` when one is given (caller's RNG kept)."""
    if seed is None:
        return transform(image)
    with seeded_rng():
        reseed(seed)
        return transform(image)
