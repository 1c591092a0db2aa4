"""The per-worker training core in plain PyTorch: one epoch of training, and the metric that picks
a run's best checkpoint. Validation scores a split with `rsray.eval.split.evaluate`.

Ray Train runs these functions inside each worker; they also run as an ordinary process (tests,
GPU throughput measurements), so nothing here imports Ray.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from rsray.models.base import Batch, RetrievalModel, to_device


@dataclass
class EpochStats:
    losses: dict[str, float]  # mean of each loss term over the epoch
    pairs: int
    seconds: float
    data_seconds: float = 0.0  # of `seconds`, waiting for the next batch (read, decode, augment)

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / max(self.seconds, 1e-9)


def train_epoch(
    model: RetrievalModel,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device | str = "cpu",
    grad_clip: float | None = 2.0,
    amp_dtype: torch.dtype | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> EpochStats:
    """One pass over `batches`: loss, backward, clip, step, under autocast to `amp_dtype`
    (`rsray.train.precision`). With fp16 a `scaler` scales the loss, and the gradients are unscaled
    before clipping, so `grad_clip` bounds the true gradient norm; a step with inf/NaN gradients
    is skipped by the scaler. A `scheduler` given here is stepped after every optimizer step
    (per-batch schedules).
    The stats split the time into waiting for batches and the rest, to tell a data-bound epoch
    from a compute-bound one."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    device_type = torch.device(device).type
    sums: dict[str, torch.Tensor] = {}  # summed on the device: no GPU sync per step
    steps = pairs = 0
    data_seconds = 0.0
    started = time.perf_counter()
    batch_iterator = iter(batches)
    while True:
        waiting = time.perf_counter()
        batch = next(batch_iterator, None)
        data_seconds += time.perf_counter() - waiting
        if batch is None:
            break
        batch = to_device(batch, device)
        with torch.autocast(device_type=device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            losses["total"].backward()
        else:
            scaler.scale(losses["total"]).backward()
            scaler.unscale_(optimizer)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        after_optimizer_step(model)
        if scheduler is not None:
            scheduler.step()
        for name, value in losses.items():
            sums[name] = sums[name] + value.detach().float() if name in sums else value.detach().float()
        steps += 1
        pairs += int(batch["images"].shape[0])
    return EpochStats(
        {k: float(v) / max(steps, 1) for k, v in sums.items()}, pairs, time.perf_counter() - started, data_seconds
    )


def after_optimizer_step(model: torch.nn.Module) -> None:
    """Run the in-place updates a module asks for after each optimizer step (`after_optimizer_step`:
    open_clip's logit-scale clamp, `rsray.losses.LogitScale`)."""
    for module in model.modules():
        hook = getattr(module, "after_optimizer_step", None)
        if callable(hook) and module is not model:
            hook()


def selection_metric(model_cfg: Any) -> str:
    """The reported metric that picks a run's best checkpoint (higher is better): `val/mR`, unless
    the model's config declares another as `selection_metric` (the scene prior: accuracy)."""
    return "val/" + getattr(model_cfg, "selection_metric", "mR")
