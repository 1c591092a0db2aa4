"""Image augmentation as a model's config declares it (SWAN: resize 278, rotate 0-90, crop 256).

Shards hold images already resized once by the prepare stage; what happens here runs per sample
at load time, on CPU workers, with torchvision transforms.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

MEANS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
         "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}


@dataclass
class AugmentConfig:
    """Per-sample image pipeline for training and for evaluation."""
    train_resize: int = 278  # shorter side before the random crop
    crop: int = 256  # training crop (square)
    rotation: float = 90.0  # random rotation in [0, rotation] degrees; 0 = off
    hflip: bool = False
    random_resized_crop: list[float] = field(default_factory=list)  # [min, max] scale: CLIP-style crop instead
    rand_augment: list[int] = field(default_factory=list)  # [num_ops, magnitude]; empty = off
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
