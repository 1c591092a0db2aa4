"""Attention and sequence blocks shared by the models (SWAN's WSA, GSA and JRU among them).

Sequences are [B, L, D]. Masks follow one rule everywhere: `valid` [B, L] bool is True at real
tokens; attention takes `key_padding_mask`, True at padding (torch's convention).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def masked_batch_norm(bn: nn.BatchNorm1d, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """BatchNorm1d over the feature axis of x [B, L, D], with statistics from the valid tokens only.

    Padding is left at zero. Without a mask, or with fewer than two valid tokens (training
    BatchNorm needs two), every position is normalised, as the SWAN release does.
    """
    if valid is None or int(valid.sum()) < 2:
        b, length, d = x.shape
        return bn(x.reshape(b * length, d)).reshape(b, length, d)
    out = x.new_zeros(x.shape)
    out[valid] = bn(x[valid])
    return out


class MLP(nn.Module):
    """Linear -> ReLU -> dropout -> Linear."""

    def __init__(self, dim: int, hidden: int, out: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, out or dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def feed_forward(dim: int, ffn_dim: int, norm: bool = False, activation: str = "gelu") -> nn.Sequential:
    """Linear(D, F) -> GELU -> Linear(F, D); with `norm`, Linear -> LayerNorm(F) -> GELU -> Linear
    (PIR's release, `pae_ffn_norm`); `activation: relu` for SWAN's paper."""
    inner = [nn.LayerNorm(ffn_dim)] if norm else []
    return nn.Sequential(nn.Linear(dim, ffn_dim), *inner, ACTIVATIONS[activation](), nn.Linear(ffn_dim, dim))


class SelfAttentionBlock(nn.Module):
    """Post-LN transformer block: x = LN(x + drop(MHA(x))); x = LN(x + drop(FFN(x))), FFN with GELU
    (`feed_forward`; `ffn_norm` adds the LayerNorm inside it that PIR's release has).

    `dropout` applies to the attention weights and both residual branches.
    Parameters: MHA 4(D^2 + D), FFN 2 D F + F + D, two LayerNorms 4 D.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn_dim: int,
        dropout: float = 0.1,
        ffn_norm: bool = False,
        activation: str = "gelu",
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = feed_forward(dim, ffn_dim, ffn_norm, activation)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        attended, _ = self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)
        x = self.norm1(x + self.drop1(attended))
        return self.norm2(x + self.drop2(self.ffn(x)))


class WSA(nn.Module):
    """SWAN's weighted self-attention: a self-attention block, then a learnable token weighting.

    W is [T, D] (T tokens). SWAN forms W^T X ([D, D] per sample) and mean-pools it over its rows
    to one D vector. Row-mean of W^T X = (row-mean of W^T) X = sum_t mean_k(W[t, k]) X[t], so we
    compute that directly (no [B, D, D] tensor; `explicit=True` forms it, for the test).
    W starts N(0, 1), as in the release. The block's feed-forward uses ReLU in the paper, GELU in
    the release (`activation`).
    """

    def __init__(
        self, num_tokens: int, dim: int, heads: int, ffn_dim: int, dropout: float = 0.1, activation: str = "gelu"
    ):
        super().__init__()
        self.block = SelfAttentionBlock(dim, heads, ffn_dim, dropout, activation=activation)
        self.token_weight = nn.Parameter(torch.randn(num_tokens, dim))

    def forward(self, x: torch.Tensor, explicit: bool = False) -> torch.Tensor:
        x = self.block(x)
        if explicit:
            return (self.token_weight.t() @ x).mean(dim=1)
        return torch.einsum("t,btd->bd", self.token_weight.mean(dim=1), x)


class GatedSelfAttention(nn.Module):
    """Multi-head self-attention whose queries and keys are gated (SWAN's GSA attention).

    Per head (width d = D / heads): Q, K, V are linear maps of x; the fused gate value is
    G = (Q W_GQ + b) * (K W_GK + b) (elementwise, per token); the masks
    [M_Q, M_K] = sigmoid(G W_M + b) scale Q and K before softmax(Q K^T / sqrt(d)) V. The gate
    layers (d x d, d x d, d x 2d) are shared by the heads, and there is no output projection,
    as in the release. Padded keys are masked when `key_padding_mask` is given (the release
    attends to padding; our choice). The release floor-divides the scores by sqrt(d)
    (`floor_divide=True` reproduces it: the scores become integers, so the gate, query and key
    weights get exactly zero gradient); the paper divides, and so do we by default.
    """

    def __init__(self, dim: int, heads: int = 2, floor_divide: bool = False):
        super().__init__()
        self.floor_divide = floor_divide
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.gate_q = nn.Linear(self.head_dim, self.head_dim)
        self.gate_k = nn.Linear(self.head_dim, self.head_dim)
        self.gate = nn.Linear(self.head_dim, 2 * self.head_dim)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, length, d = x.shape

        def heads(t):  # [B, L, D] -> [B, h, L, d]
            return t.view(b, length, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        mask_q, mask_k = torch.sigmoid(self.gate(self.gate_q(q) * self.gate_k(k))).chunk(2, dim=-1)
        q, k = q * mask_q, k * mask_k
        scores = torch.div(
            q @ k.transpose(-2, -1), math.sqrt(self.head_dim), rounding_mode="floor" if self.floor_divide else None
        )
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        return out.transpose(1, 2).reshape(b, length, d)


class GSA(nn.Module):
    """SWAN's GSA block: x + dropout(BatchNorm1d(GatedSelfAttention(x))).

    With `valid` given, padded keys are masked and BatchNorm statistics come from valid tokens
    (our choice; `valid=None` reproduces the release, which does neither).
    """

    def __init__(self, dim: int, heads: int = 2, dropout: float = 0.2, floor_divide: bool = False):
        super().__init__()
        self.attn = GatedSelfAttention(dim, heads, floor_divide)
        self.norm = nn.BatchNorm1d(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        attended = self.attn(x, key_padding_mask=None if valid is None else ~valid)
        out = x + self.drop(masked_batch_norm(self.norm, attended, valid))
        return out if valid is None else out * valid.unsqueeze(-1)


class JRU(nn.Module):
    """SWAN's joint word representation: Conv1d k=s=2 and k=s=3 (D -> D, BatchNorm, ReLU) over
    the word sequence, the two outputs concatenated along the sequence: L//2 + L//3 positions.

    Returns (y, valid): a window is valid when it lies entirely inside the caption, so a caption
    of length n has n//2 + n//3 valid positions (all are valid without `lengths`). Sequences
    shorter than 3 are zero-padded first (our choice; the convolutions need that much input).
    With `masked_norm`, BatchNorm statistics come from the valid windows (our choice; the release
    uses every position).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(dim, dim, kernel_size=k, stride=k) for k in (2, 3)])
        self.norms = nn.ModuleList([nn.BatchNorm1d(dim) for _ in (2, 3)])

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None, masked_norm: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[1] < 3:
            x = nn.functional.pad(x, (0, 0, 0, 3 - x.shape[1]))
        outs, valids = [], []
        for k, conv, norm in zip((2, 3), self.convs, self.norms, strict=True):
            y = conv(x.transpose(1, 2)).transpose(1, 2)  # [B, L // k, D]
            if lengths is None:
                valid = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
            else:
                valid = torch.arange(y.shape[1], device=y.device)[None, :] < (lengths.to(y.device)[:, None] // k)
            outs.append(torch.relu(masked_batch_norm(norm, y, valid if masked_norm else None)))
            valids.append(valid)
        return torch.cat(outs, dim=1), torch.cat(valids, dim=1)
