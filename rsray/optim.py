"""The optimiser and learning-rate schedule a model's config declares, and building them.

Every model config extends `OptimiserConfig` (or `WarmupAdamWConfig`), so the same keys mean the
same thing in every model section (`model.lr`, `model.weight_decay`, `model.schedule`, ...) and
are checked in one place. A model config changes a default by declaring the field again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

SCHEDULES = ("step", "linear_warmup", "cosine_warmup")


@dataclass
class OptimiserConfig:
    """Adam with a step decay, as VSE++, SWAN and DOVE train: lr x `lr_decay` every `decay_every`
    epochs. Model configs call `yield from super().check()` in their own `check`."""

    optimizer: str = "adam"  # adam | adamw
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # step (per epoch) | linear_warmup | cosine_warmup (per optimizer step: a linear rise from 0,
    # then a linear (transformers' linear schedule) or cosine (open_clip's) decay to 0)
    schedule: str = "step"
    warmup: float = 0.0  # *_warmup: the fraction of all optimizer steps spent warming up ...
    warmup_steps: int = 0  # ... or, when positive, this many steps (open_clip's --warmup)
    lr_decay: float = 1.0  # step: multiply lr by this ...
    decay_every: int = 1  # ... every this many epochs
    # step: the lr of 0-based epoch e is lr * lr_decay ** ((e + decay_epoch_offset) // decay_every).
    # 0 = the papers' "every 20 epochs" (changes at 20, 40, ...); 1 = the SWAN release, which decays
    # before epochs where e % 20 == 19 (changes at 19, 39, ...).
    decay_epoch_offset: int = 0
    # Which parameters AdamW's weight decay skips: open_clip = every parameter with fewer than 2
    # dimensions or named as a bias, norm or logit scale (biases, LayerNorm/BatchNorm weights,
    # temperatures) | pir = names containing bias, LayerNorm or norm only (PIR's release: its
    # temperatures and the PAE feed-forward LayerNorm are decayed) | none = decay them all, as a
    # bare AdamW(model.parameters()) does. Adam's (L2) decay always applies to all, as the
    # VSE++/SWAN/DOVE releases have it.
    decay_exempt: str = "open_clip"

    def check(self) -> Iterator[tuple[str, str]]:
        if self.optimizer not in ("adam", "adamw"):
            yield "optimizer", f"must be adam or adamw, got {self.optimizer!r}"
        if self.lr <= 0:
            yield "lr", f"must be positive, got {self.lr}"
        if self.weight_decay < 0:
            yield "weight_decay", f"must not be negative, got {self.weight_decay}"
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            yield "betas", f"expected [beta1, beta2] in [0, 1), got {self.betas}"
        if self.schedule not in SCHEDULES:
            yield "schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
        if self.warmup_steps < 0:
            yield "warmup_steps", f"must not be negative, got {self.warmup_steps}"
        if self.warmup_steps and self.schedule == "step":
            yield "warmup_steps", "applies to linear_warmup and cosine_warmup, not to schedule step"
        if not 0.0 <= self.warmup < 1.0:
            yield "warmup", f"must be a fraction in [0, 1), got {self.warmup}"
        if not 0.0 < self.lr_decay <= 1.0:
            yield "lr_decay", f"must be in (0, 1], got {self.lr_decay}"
        if self.decay_every < 1:
            yield "decay_every", f"must be at least 1, got {self.decay_every}"
        if self.decay_exempt not in ("open_clip", "pir", "none"):
            yield "decay_exempt", f"must be open_clip, pir or none, got {self.decay_exempt!r}"
        if not 0 <= self.decay_epoch_offset < self.decay_every:
            yield "decay_epoch_offset", f"must be in [0, decay_every={self.decay_every}), got {self.decay_epoch_offset}"


@dataclass
class WarmupAdamWConfig(OptimiserConfig):
    """AdamW with a linear warm-up over the first 10% of the optimizer steps, then a linear decay
    to 0 (transformers' linear schedule), as PriorCLIP trains; the CLIP fine-tune uses it too."""

    optimizer: str = "adamw"
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    schedule: str = "linear_warmup"
    warmup: float = 0.1


def make_optimizer(
    model: nn.Module, model_cfg: OptimiserConfig, total_steps: int | None = None
) -> tuple[torch.optim.Optimizer, Any]:
    """The config's optimizer over the model's trainable parameters, and its learning-rate schedule.

    `step` returns a StepLR (or the release-phase LambdaLR) the caller steps once per epoch;
    `linear_warmup` and `cosine_warmup` need the run's `total_steps` and are stepped after every
    optimizer step (see `steps_per_batch`)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[model_cfg.optimizer]
    if model_cfg.optimizer == "adamw" and model_cfg.decay_exempt != "none":
        exempt = {name for name, p in named if exempt_from_decay(name, p, model_cfg.decay_exempt)}
        groups = [
            {"params": [p for name, p in named if name not in exempt]},
            {"params": [p for name, p in named if name in exempt], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": [p for _, p in named]}]
    optimizer = optimizer_cls(
        [g for g in groups if g["params"]],
        lr=model_cfg.lr,
        betas=tuple(model_cfg.betas),
        weight_decay=model_cfg.weight_decay,
    )
    if steps_per_batch(model_cfg):
        from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

        if not total_steps or total_steps < 1:
            raise ValueError(f"schedule {model_cfg.schedule} needs the run's total number of optimizer steps")
        warmup_steps = model_cfg.warmup_steps or round(model_cfg.warmup * total_steps)
        cosine = model_cfg.schedule == "cosine_warmup"
        make = get_cosine_schedule_with_warmup if cosine else get_linear_schedule_with_warmup
        return optimizer, make(optimizer, warmup_steps, total_steps)
    if model_cfg.decay_epoch_offset:
        every, offset, gamma = model_cfg.decay_every, model_cfg.decay_epoch_offset, model_cfg.lr_decay
        return optimizer, torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: gamma ** ((epoch + offset) // every)
        )
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=model_cfg.decay_every, gamma=model_cfg.lr_decay)
    return optimizer, schedule


def exempt_from_decay(name: str, param: torch.Tensor, rule: str = "open_clip") -> bool:
    """open_clip's rule: no weight decay for 0-d and 1-d parameters (biases, norm weights, logit
    scales) or names that say they are one (`bn`, `ln`, `bias`, `logit_scale`; and `norm`).
    PIR's: names containing `bias`, `LayerNorm` or `norm` (case as written), whatever their shape."""
    if rule == "pir":
        return any(part in name for part in ("bias", "LayerNorm", "norm"))
    return param.ndim < 2 or any(part in name for part in ("bn", "ln", "bias", "logit_scale", "norm"))


def steps_per_batch(model_cfg: OptimiserConfig) -> bool:
    """True when the schedule advances every optimizer step (the *_warmup ones), False when the
    caller steps it once per epoch (step)."""
    return model_cfg.schedule in ("linear_warmup", "cosine_warmup")
