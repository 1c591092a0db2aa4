"""Scoring a test gallery in bounded memory: the full similarity matrix in blocks, or only top-k lists.

The protocol's matrix is N images x 5N captions. `score_matrix` builds it block by block, so a
pairwise model never sees more than `block` x `block` pairs at once. For galleries whose matrix
does not fit (100k x 500k is 200 GB in float32), `streaming_topk` keeps only each query's top k,
merging block after block, and `metrics_from_topk` turns those lists into R@K, mR and SR@K.

Features are what `encode_images` / `encode_texts` return: tensors indexed along dim 0 (or, for
pairwise models, tuples / dicts of such tensors). `model=None` means a plain dot product. Call
under `model.eval()`; scoring itself runs without autograd.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from rsray.eval.metrics import (
    DEFAULT_KS,
    Scenes,
    check_caption_image,
    check_ks,
    recall_at_k,
    scene_ids,
    scene_recall,
    stable_topk,
)

if TYPE_CHECKING:  # annotations only: evaluation does not need the model registry imported
    from rsray.models.base import RetrievalModel

Features = Any  # torch.Tensor, or a tuple / list / dict of tensors sharing dim 0


def num_rows(features: Features) -> int:
    if isinstance(features, torch.Tensor):
        return features.shape[0]
    if isinstance(features, Mapping):
        return num_rows(next(iter(features.values())))
    return num_rows(features[0])


def take_rows(features: Features, start: int, stop: int) -> Features:
    """Rows start:stop of every tensor in `features`."""
    if isinstance(features, torch.Tensor):
        return features[start:stop]
    if isinstance(features, Mapping):
        return {key: take_rows(value, start, stop) for key, value in features.items()}
    parts = [take_rows(value, start, stop) for value in features]
    return type(features)(*parts) if hasattr(features, "_fields") else type(features)(parts)  # NamedTuple or not


def concat_rows(parts: Sequence[Features]) -> Features:
    """Features of several batches as one, concatenated along dim 0 (what `encode_split` needs).

    Tensors whose later dims differ between batches are sequences padded to their batch's longest
    (a pairwise model's word features and their mask): they are zero-padded (False for masks) to
    the longest of all, which the model's own masks already ignore."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        shape = [max(sizes) for sizes in zip(*(p.shape[1:] for p in parts), strict=True)]
        padded = []
        for p in parts:
            pad = [a for dim in reversed(range(1, p.dim())) for a in (0, shape[dim - 1] - p.shape[dim])]
            padded.append(torch.nn.functional.pad(p, pad) if any(pad) else p)
        return torch.cat(padded)
    if isinstance(first, Mapping):
        return {key: concat_rows([p[key] for p in parts]) for key in first}
    columns = [concat_rows(list(column)) for column in zip(*parts, strict=True)]
    return type(first)(*columns) if hasattr(first, "_fields") else type(first)(columns)


def score_block(model: RetrievalModel | None, image_features: Features, text_features: Features) -> torch.Tensor:
    """[n_img, n_txt] scores of one block: a matrix product for two-tower models, `model.score` otherwise."""
    if model is None or model.two_tower:
        return image_features @ text_features.t()
    scores = model.score(image_features, text_features)
    expected = (num_rows(image_features), num_rows(text_features))
    if tuple(scores.shape) != expected:
        raise ValueError(
            f"{type(model).__name__}.score returned shape {tuple(scores.shape)} for a block "
            f"of {expected[0]} images x {expected[1]} captions"
        )
    return scores


@torch.no_grad()
def score_matrix(
    model: RetrievalModel | None, image_features: Features, text_features: Features, block: int = 1024
) -> torch.Tensor:
    """The full [n_img, n_txt] matrix. Two-tower: one matrix product per block of `block` images;
    pairwise: `model.score` on blocks of `block` images x `block` captions."""
    n_img, n_txt = num_rows(image_features), num_rows(text_features)
    text_block = n_txt if model is None or model.two_tower else block
    out = None
    for i0 in range(0, n_img, block):
        images = take_rows(image_features, i0, i0 + block)
        for t0 in range(0, n_txt, max(text_block, 1)):
            scores = score_block(model, images, take_rows(text_features, t0, t0 + text_block))
            if out is None:
                out = scores.new_empty((n_img, n_txt))
            out[i0 : i0 + scores.shape[0], t0 : t0 + scores.shape[1]] = scores
    return out if out is not None else torch.empty((n_img, n_txt))


def _merge(
    running: tuple[torch.Tensor, torch.Tensor] | None, values: torch.Tensor, idx: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of a running list and a new block's list. Every running index is below every new one
    and both lists are in result order, so ties among the concatenation's positions follow the
    indices: a stable top-k over positions breaks ties by lower index, as the full sort would."""
    if running is None:
        return values, idx
    values, idx = torch.cat([running[0], values], 1), torch.cat([running[1], idx], 1)
    values, pos = stable_topk(values, k)
    return values, idx.gather(1, pos)


@torch.no_grad()
def streaming_topk(
    model: RetrievalModel | None, image_features: Features, text_features: Features, k: int, block: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i2t_scores, i2t_idx, t2i_scores, t2i_idx): each image's top min(k, n_txt) captions and each
    caption's top min(k, n_img) images, in result order (descending score, ties by lower index),
    exactly as from the full matrix. Each block of `block` x `block` scores is computed once and
    feeds both directions; memory is one block plus (n_img + n_txt) x k running entries."""
    if k < 1 or block < 1:
        raise ValueError(f"k and block must be positive, got k={k}, block={block}")
    n_img, n_txt = num_rows(image_features), num_rows(text_features)
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"nothing to rank: {n_img} images x {n_txt} captions")
    i2t: list[tuple[torch.Tensor, torch.Tensor]] = []
    t2i: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * -(-n_txt // block)
    for i0 in range(0, n_img, block):
        images = take_rows(image_features, i0, i0 + block)
        row = None
        for b, t0 in enumerate(range(0, n_txt, block)):
            scores = score_block(model, images, take_rows(text_features, t0, t0 + block))
            if torch.isnan(scores).any():
                raise ValueError(f"NaN scores in the block of images {i0}.. x captions {t0}..")
            values, idx = stable_topk(scores, k)
            row = _merge(row, values, idx + t0, k)
            values, idx = stable_topk(scores.t(), k)
            t2i[b] = _merge(t2i[b], values, idx + i0, k)
        i2t.append(row)
    return (
        torch.cat([v for v, _ in i2t]),
        torch.cat([i for _, i in i2t]),
        torch.cat([v for v, _ in t2i]),
        torch.cat([i for _, i in t2i]),
    )


def _first_hit(hits: torch.Tensor) -> torch.Tensor:
    """Position of the first True in each row, or the row length when there is none (a miss)."""
    return (~hits).int().cumprod(1).sum(1)


def metrics_from_topk(
    i2t_idx: torch.Tensor,
    t2i_idx: torch.Tensor,
    caption_image: torch.Tensor,
    image_scenes: Scenes | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """R@K, mR and (given scenes) SR@K from `streaming_topk`'s index lists, equal to
    `retrieval_metrics` on the full matrix for the same keys. A query whose positive is not in
    its top k counts as a miss, so every K must be <= k. Median and mean rank are not returned:
    they need each miss's true rank, that is the full matrix."""
    n_img, n_txt = i2t_idx.shape[0], t2i_idx.shape[0]
    ci = check_caption_image(caption_image, n_img, n_txt, i2t_idx.device)
    ks = check_ks(ks)
    for name, idx, gallery in (("i2t", i2t_idx, n_txt), ("t2i", t2i_idx, n_img)):
        if idx.shape[1] < min(max(ks), gallery):
            raise ValueError(f"{name}: top-{idx.shape[1]} lists cannot give R@{max(ks)}: stream with k >= {max(ks)}")
    r_i2t = _first_hit(ci[i2t_idx] == torch.arange(n_img, device=ci.device)[:, None])
    r_t2i = _first_hit(t2i_idx == ci[:, None])
    out = recall_at_k(r_i2t, r_t2i, ks)
    if image_scenes is not None:
        out.update(scene_recall(i2t_idx, t2i_idx, ci, scene_ids(image_scenes, n_img, ci.device), ks))
    return out


# ----------------------------------------------------------------------------- re-scoring (ITM)


def index_rows(features: Features, index: torch.Tensor) -> Features:
    """Rows `index` (any order, repeats allowed) of every tensor in `features`."""
    if isinstance(features, torch.Tensor):
        return features[index.to(features.device)]
    if isinstance(features, Mapping):
        return {key: index_rows(value, index) for key, value in features.items()}
    parts = [index_rows(value, index) for value in features]
    return type(features)(*parts) if hasattr(features, "_fields") else type(features)(parts)


def topk_pairs(itc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i2t_idx, t2i_idx, keys): each image's top-k captions and each caption's top-k images by
    `itc`, and their union as sorted pair keys `row * n_txt + col` (each pair once)."""
    n_img, n_txt = itc.shape
    i2t_idx = stable_topk(itc, min(k, n_txt))[1]
    t2i_idx = stable_topk(itc.t(), min(k, n_img))[1]
    return i2t_idx, t2i_idx, pair_keys(i2t_idx, t2i_idx, n_img, n_txt)


def pair_keys(i2t_idx: torch.Tensor, t2i_idx: torch.Tensor, n_img: int, n_txt: int) -> torch.Tensor:
    """The union of both directions' top-k lists as sorted keys `row * n_txt + col`."""
    device = i2t_idx.device
    rows = torch.cat([torch.arange(n_img, device=device).repeat_interleave(i2t_idx.shape[1]), t2i_idx.flatten()])
    cols = torch.cat([i2t_idx.flatten(), torch.arange(n_txt, device=device).repeat_interleave(t2i_idx.shape[1])])
    return torch.unique(rows * n_txt + cols)


def scoring_order(keys: torch.Tensor, n_txt: int, text_features: Features) -> torch.Tensor:
    """The order pairs are scored in: shortest captions first when the text features carry a
    `mask`, so each batch's padding stays short; else as given."""
    mask = getattr(text_features, "mask", None)
    if not isinstance(mask, torch.Tensor):
        return torch.arange(len(keys), device=keys.device)
    return mask.sum(1).to(keys.device)[keys % n_txt].argsort(stable=True)


@torch.no_grad()
def rescore_topk(
    model: RetrievalModel,
    itc: torch.Tensor,
    image_features: Features,
    text_features: Features,
    k: int,
    pair_batch: int = 256,
    i2t_idx: torch.Tensor | None = None,
    t2i_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ALBEF/BLIP's second stage: each query's top k by the first-stage scores `itc` re-scored by
    `model.pair_scores` (e.g. ITM log-odds), both directions. Returns (S_i2t, S_t2i, pairs scored).

    One matrix cannot keep both directions' order outside the top k, so there are two: in S_i2t
    each image's top-k captions carry their re-scored value and every other entry keeps its ITC
    order below the lowest re-scored value; S_t2i is the same per caption (column). Rank image i's
    captions by row i of S_i2t and caption j's images by column j of S_t2i. The union of both
    directions' pairs is scored once each, in batches of `pair_batch`, shortest captions first when
    the text features carry a `mask` (so each batch's padding stays short). Lists from
    `streaming_topk` may be passed as `i2t_idx` / `t2i_idx` instead of being read off `itc`."""
    if k < 1 or pair_batch < 1:
        raise ValueError(f"k and pair_batch must be positive, got k={k}, pair_batch={pair_batch}")
    n_img, n_txt = itc.shape
    if i2t_idx is None:
        i2t_idx = stable_topk(itc, min(k, n_txt))[1]
    if t2i_idx is None:
        t2i_idx = stable_topk(itc.t(), min(k, n_img))[1]
    device = itc.device
    keys = pair_keys(i2t_idx, t2i_idx, n_img, n_txt)
    pair_rows, pair_cols = keys // n_txt, keys % n_txt
    order = scoring_order(keys, n_txt, text_features)
    values = torch.empty(len(keys), dtype=torch.float32, device=device)
    for start in range(0, len(keys), pair_batch):
        chosen = order[start : start + pair_batch]
        scores = model.pair_scores(
            index_rows(image_features, pair_rows[chosen]), index_rows(text_features, pair_cols[chosen])
        )
        values[chosen] = scores.float().to(device)
    below = values.min() - 1.0 - (itc.max() - itc.float())  # ITC order, under every re-scored value
    s_i2t, s_t2i = below.clone(), below

    def rescored(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return values[torch.searchsorted(keys, r * n_txt + c)]

    image_rows = torch.arange(n_img, device=device)[:, None].expand_as(i2t_idx)
    s_i2t[image_rows, i2t_idx] = rescored(image_rows, i2t_idx)
    caption_cols = torch.arange(n_txt, device=device)[:, None].expand_as(t2i_idx)
    s_t2i[t2i_idx, caption_cols] = rescored(t2i_idx, caption_cols)
    return s_i2t, s_t2i, len(keys)
