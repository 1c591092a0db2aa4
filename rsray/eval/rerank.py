"""SMR (similarity matrix reweighting, after CMPAGL): a post-processing switch for any model.

A pair that both sides rank highly is a safer match than one only one side likes, so each pair
near the top of either list is boosted by how high it sits in *both* lists. The formula, as the
protocol fixes it ([formula ours]), with ranks 0-based in the shared result order (descending
score, ties by index):

    r_f[i, j] = position of caption j in image i's list   (row i of S)
    r_b[i, j] = position of image i in caption j's list   (column j of S)
    W[i, j]   = 1 + w * exp(-beta * (r_f[i, j] + r_b[i, j]) / 2)   if r_f[i, j] < K or r_b[i, j] < K
              = 1                                                   otherwise
    S_opt     = (S - min(S) + 1e-6) * W

The shift makes every score positive so that a weight above 1 always raises a score. Ranks are
exact (one stable sort per direction), so SMR works on the full matrix and needs O(N x M) memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

SHIFT_EPS = 1e-6  # the smallest shifted score: strictly positive


@dataclass
class SMRConfig:
    """SMR's three knobs, protocol defaults; `check` reports problems as rsray.config sections do."""

    k: int = 30  # pairs within the top K of either list are re-weighted
    w: float = 1.0  # boost of a pair ranked first in both lists (w = 0: SMR changes nothing)
    beta: float = 0.1  # how fast the boost decays with the mean rank

    def check(self) -> Iterator[tuple[str, str]]:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            yield "k", f"must be a positive integer, got {self.k!r}"
        if not (math.isfinite(self.w) and self.w >= 0):
            yield "w", f"must be a finite number >= 0, got {self.w!r}"
        if not (math.isfinite(self.beta) and self.beta >= 0):
            yield "beta", f"must be a finite number >= 0, got {self.beta!r}"

    def apply(self, S: torch.Tensor) -> torch.Tensor:
        return smr_rerank(S, self.k, self.w, self.beta)


def stable_ranks(S: torch.Tensor, dim: int) -> torch.Tensor:
    """Int32 tensor like S: each entry's 0-based position in its row's (dim=1) or column's (dim=0)
    result order, descending score with ties by index: the inverse permutation of a stable argsort."""
    order = S.argsort(dim=dim, descending=True, stable=True)
    positions = torch.arange(S.shape[dim], dtype=torch.int32, device=S.device)
    positions = positions.view(-1, 1) if dim == 0 else positions.view(1, -1)
    return torch.empty(S.shape, dtype=torch.int32, device=S.device).scatter_(dim, order, positions.expand_as(order))


def smr_rerank_pair(
    S_i2t: torch.Tensor, S_t2i: torch.Tensor, k: int = 30, w: float = 1.0, beta: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """SMR after a stage that orders each direction on its own matrix (`rescore_topk`): r_f from
    the rows of S_i2t, r_b from the columns of S_t2i, one weight W from both, applied to each
    matrix shifted positive. With S_t2i = S_i2t it is `smr_rerank` twice."""
    problems = [f"smr.{key}: {problem}" for key, problem in SMRConfig(k, w, beta).check()]
    if problems:
        raise ValueError("; ".join(problems))
    if S_i2t.shape != S_t2i.shape or S_i2t.dim() != 2 or S_i2t.numel() == 0:
        raise ValueError(
            f"expected two non-empty [images, captions] matrices, got {tuple(S_i2t.shape)} and {tuple(S_t2i.shape)}"
        )
    S_i2t, S_t2i = S_i2t.float(), S_t2i.float()
    if not (torch.isfinite(S_i2t).all() and torch.isfinite(S_t2i).all()):
        raise ValueError("SMR needs finite scores: a matrix holds NaN or infinity")
    r_f, r_b = stable_ranks(S_i2t, dim=1), stable_ranks(S_t2i, dim=0)
    outside = (r_f >= k) & (r_b >= k)
    weight = (r_f + r_b).to(S_i2t.dtype).mul_(-beta / 2).exp_().mul_(w).add_(1).masked_fill_(outside, 1)
    return (S_i2t - S_i2t.min() + SHIFT_EPS) * weight, (S_t2i - S_t2i.min() + SHIFT_EPS) * weight


def smr_rerank(S: torch.Tensor, k: int = 30, w: float = 1.0, beta: float = 0.1) -> torch.Tensor:
    """S_opt for an [n_img, n_txt] similarity matrix S (formula in the module docstring); same
    shape and device, scores shifted to be positive, to be evaluated like any other matrix."""
    problems = [f"smr.{key}: {problem}" for key, problem in SMRConfig(k, w, beta).check()]
    if problems:
        raise ValueError("; ".join(problems))
    if S.dim() != 2 or S.numel() == 0:
        raise ValueError(f"expected a non-empty 2-D [images, captions] score matrix, got shape {tuple(S.shape)}")
    if not S.is_floating_point():
        S = S.float()
    if not torch.isfinite(S).all():
        raise ValueError("SMR needs finite scores: the matrix holds NaN or infinity")
    r_f, r_b = stable_ranks(S, dim=1), stable_ranks(S, dim=0)
    outside = (r_f >= k) & (r_b >= k)
    weight = r_f.add_(r_b).to(S.dtype)  # in place where possible: SMR holds a few N x M tensors
    del r_b
    weight.mul_(-beta / 2).exp_().mul_(w).add_(1).masked_fill_(outside, 1)
    return (S - S.min() + SHIFT_EPS).mul_(weight)
