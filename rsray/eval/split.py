"""Scoring a whole split: encode every image and caption, score all pairs (blocked, bounded
memory), and read the protocol's numbers off the matrix. Validation during training, `rsray
evaluate`, sweeps and figures all score a split this way, so a checkpoint re-scored later gives the
numbers reported for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from rsray.data.loader import caption_image_index, eval_captions, eval_images, image_scenes
from rsray.eval.metrics import retrieval_metrics
from rsray.eval.rerank import SMRConfig, smr_rerank
from rsray.eval.scoring import concat_rows, score_matrix
from rsray.models.base import RetrievalModel, to_device


@torch.no_grad()
def encode_split(
    model: RetrievalModel,
    table: pa.Table,
    augment: Any,
    device: torch.device | str = "cpu",
    image_batch: int = 64,
    caption_batch: int = 256,
    sharded: bool = False,
) -> tuple[Any, Any]:
    """Features of every image (table order) and every caption (image 0's captions first, ...).

    `sharded` (inside a torch.distributed group, every rank calling with the same table): rank 0's
    buffers are broadcast first, each rank encodes its contiguous share of the images and their
    captions, and every rank gets the whole split's features in table order (all_gather_object:
    tensors or a pairwise model's tuples), so validation keeps every worker busy instead of one."""
    model.eval()
    world, rank = _group()
    if sharded and world > 1:
        # rank 0's buffers on every rank (BatchNorm's running statistics: DDP re-sends them at each
        # forward, so after the last step each rank holds its own batch's update), so every share
        # is encoded by the model rank 0 scores and checkpoints
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
        bounds = [len(table) * r // world for r in range(world + 1)]
        share = table.slice(bounds[rank], bounds[rank + 1] - bounds[rank])
        mine = encode_split(model, share, augment, device, image_batch, caption_batch) if len(share) else None
        shares: list[Any] = [None] * world
        torch.distributed.all_gather_object(shares, _moved(mine, "cpu"))
        shares = [share for share in shares if share is not None]  # a split smaller than the group
        return tuple(concat_rows([_moved(share[i], device) for share in shares]) for i in (0, 1))
    images = [model.encode_images(to_device(b, device)) for b in eval_images(table, augment, image_batch)]
    texts = [model.encode_texts(to_device(b, device)) for b in eval_captions(table, caption_batch)]
    return concat_rows(images), concat_rows(texts)  # tensors, or a pairwise model's feature tuples


def _group() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _moved(features: Any, device: torch.device | str) -> Any:
    """Features on `device`: a tensor, or tuples (named ones too) and dicts of them."""
    if torch.is_tensor(features):
        return features.to(device)
    if isinstance(features, dict):
        return {key: _moved(value, device) for key, value in features.items()}
    if isinstance(features, tuple):
        moved = [_moved(value, device) for value in features]
        return type(features)(*moved) if hasattr(features, "_fields") else tuple(moved)
    return features


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
    model: RetrievalModel,
    table: pa.Table,
    augment: Any,
    device: torch.device | str = "cpu",
    image_batch: int = 64,
    sharded: bool = False,
) -> SplitScores | None:
    """Encode every image and caption of a split and score them all (blocked, bounded memory).
    `sharded`: every rank encodes its share (`encode_split`), rank 0 scores; None on the others."""
    image_features, text_features = encode_split(model, table, augment, device, image_batch, sharded=sharded)
    if sharded and _group()[1] != 0:
        return None
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
    sharded: bool = False,
) -> dict[str, float] | None:
    """The protocol's numbers on one split's whole gallery (scene recall where scenes exist);
    with `smr`, the same again after SMR re-ranking under `smr_` names. A model that defines
    `validation_metrics(split, table) -> {name: value}` adds its own numbers, computed from the
    features already encoded here (the scene prior adds its classification accuracy); one that
    defines `validation_rescore()` gets its second stage's numbers too (`rescore_metrics`).
    `sharded` (every rank of a torch.distributed group calls it): the ranks share the encoding,
    rank 0 scores and returns the numbers, the others None (`score_split`)."""
    split = score_split(model, table, augment, device, image_batch, sharded=sharded)
    if split is None:
        return None
    metrics = retrieval_metrics(split.scores, split.caption_image, split.scenes)
    own_metrics = getattr(model, "validation_metrics", None)
    if own_metrics is not None:
        metrics.update(own_metrics(split, table))
    metrics.update(rescore_metrics(model, split))
    if smr is not None:
        reranked = smr_rerank(split.scores, k=smr.k, w=smr.w, beta=smr.beta)
        metrics.update(
            {f"smr_{k}": v for k, v in retrieval_metrics(reranked, split.caption_image, split.scenes).items()}
        )
    return metrics


def rescore_metrics(model: RetrievalModel, split: SplitScores) -> dict[str, float]:
    """The second stage's numbers on `split` as `itm_*` (and `itm_seconds`) when the model asks for
    them in validation (`validation_rescore() -> (k, pairs per forward)`, CMPAGL's ITM); else none."""
    asks = getattr(model, "validation_rescore", None)
    settings = asks() if asks is not None else None
    if settings is None:
        return {}
    from rsray.eval.stages import rescore_stage

    stage = rescore_stage(model, split, *settings)
    return {**{f"itm_{k}": v for k, v in stage["metrics"].items()}, "itm_seconds": stage["seconds"]}
