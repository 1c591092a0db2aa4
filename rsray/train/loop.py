"""The per-worker training core in plain PyTorch: optimizer, one epoch, evaluation.

Ray Train runs these functions inside each worker; they also run as an ordinary process (tests,
GPU throughput measurements), so nothing here imports Ray.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from rsray.data.loader import caption_image_index, eval_captions, eval_images, image_scenes
from rsray.eval.metrics import retrieval_metrics
from rsray.eval.rerank import SMRConfig, smr_rerank
from rsray.eval.scoring import concat_rows, score_matrix
from rsray.models.base import Batch, RetrievalModel


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


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
) -> EpochStats:
    """One pass over `batches`: loss, backward, clip, step. `amp_dtype=torch.bfloat16` on GPU.
    A `scheduler` given here is stepped after every optimizer step (per-batch schedules).
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
        losses["total"].backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        for name, value in losses.items():
            sums[name] = sums[name] + value.detach().float() if name in sums else value.detach().float()
        steps += 1
        pairs += int(batch["images"].shape[0])
    return EpochStats(
        {k: float(v) / max(steps, 1) for k, v in sums.items()}, pairs, time.perf_counter() - started, data_seconds
    )


@torch.no_grad()
def encode_split(
    model: RetrievalModel,
    table: pa.Table,
    augment: Any,
    device: torch.device | str = "cpu",
    image_batch: int = 64,
    caption_batch: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image (table order) and every caption (image 0's captions first, ...)."""
    model.eval()
    images = [model.encode_images(to_device(b, device)) for b in eval_images(table, augment, image_batch)]
    texts = [model.encode_texts(to_device(b, device)) for b in eval_captions(table, caption_batch)]
    return concat_rows(images), concat_rows(texts)  # tensors, or a pairwise model's feature tuples


@dataclass
class SplitScores:
    """A split's whole similarity matrix and what the protocol needs to read it."""

    scores: torch.Tensor  # [n_images, n_captions]
    caption_image: torch.Tensor  # caption j -> its image row
    scenes: list[str | None] | None  # one per image; None when the split has no scenes at all
    image_features: Any = None  # what the model encoded (embeddings for two-tower models)
    text_features: Any = None


@torch.no_grad()
def score_split(
    model: RetrievalModel, table: pa.Table, augment: Any, device: torch.device | str = "cpu", image_batch: int = 64
) -> SplitScores:
    """Encode every image and caption of a split and score them all (blocked, bounded memory)."""
    image_features, text_features = encode_split(model, table, augment, device, image_batch=image_batch)
    scores = score_matrix(model, image_features, text_features).float()
    scenes = image_scenes(table)
    return SplitScores(
        scores,
        caption_image_index(table).to(scores.device),
        scenes if any(s is not None for s in scenes) else None,
        image_features,
        text_features,
    )


@torch.no_grad()
def evaluate(
    model: RetrievalModel,
    table: pa.Table,
    augment: Any,
    device: torch.device | str = "cpu",
    smr: SMRConfig | None = None,
    image_batch: int = 64,
) -> dict[str, float]:
    """The protocol's numbers on one split's whole gallery (scene recall where scenes exist);
    with `smr`, the same again after SMR re-ranking under `smr_` names. A model that defines
    `validation_metrics(split, table) -> {name: value}` adds its own numbers, computed from the
    features already encoded here (the scene prior adds its classification accuracy)."""
    split = score_split(model, table, augment, device, image_batch)
    metrics = retrieval_metrics(split.scores, split.caption_image, split.scenes)
    own_metrics = getattr(model, "validation_metrics", None)
    if own_metrics is not None:
        metrics.update(own_metrics(split, table))
    if smr is not None:
        reranked = smr_rerank(split.scores, k=smr.k, w=smr.w, beta=smr.beta)
        metrics.update(
            {f"smr_{k}": v for k, v in retrieval_metrics(reranked, split.caption_image, split.scenes).items()}
        )
    return metrics


def selection_metric(model_cfg: Any) -> str:
    """The reported metric that picks a run's best checkpoint (higher is better): `val/mR`, unless
    the model's config declares another as `selection_metric` (the scene prior: accuracy)."""
    return "val/" + getattr(model_cfg, "selection_metric", "mR")
