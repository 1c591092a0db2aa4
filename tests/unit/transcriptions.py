"""Attention blocks written out by hand, for the formula tests of DOVE's and PriorCLIP's blocks:
nn.MultiheadAttention as per-head softmax(Q K^T / sqrt(d)) V, LayerNorm as its formula, and the
post-LN block x = LN(x + MHA(q, x, x)); x = LN(x + FFN(x)) whose FFN is Linear -> [LayerNorm] ->
GELU (or ReLU) -> Linear. Not rsray's code: a second writing of the same formulas to compare against."""

from __future__ import annotations

import torch
from torch import nn


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / (var + norm.eps).sqrt() * norm.weight + norm.bias


def multihead_attention(
    attn: nn.MultiheadAttention, q: torch.Tensor, kv: torch.Tensor, key_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, Q, D]: per head softmax(Q K^T / sqrt(d_head)) V over the valid keys, heads concatenated,
    out-projected."""
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    heads, d = attn.num_heads, attn.embed_dim // attn.num_heads

    def split(x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, heads, L, d]
        return x.unflatten(-1, (heads, d)).transpose(1, 2)

    queries, keys, values = split(q @ wq.t() + bq), split(kv @ wk.t() + bk), split(kv @ wv.t() + bv)
    logits = queries @ keys.transpose(-1, -2) / d**0.5
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    mixed = (logits.softmax(dim=-1) @ values).transpose(1, 2).flatten(2)
    return mixed @ attn.out_proj.weight.t() + attn.out_proj.bias


def post_ln_block(
    block: nn.Module, x: torch.Tensor, queries: torch.Tensor | None = None, key_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """A SelfAttentionBlock (queries None) or CrossAttentionBlock (queries [B, Q, D]; Q = 1 adds
    the one query's output to every position) in eval mode, by hand."""
    attended = multihead_attention(block.attn, x if queries is None else queries, x, key_valid)
    h = layer_norm(x + attended, block.norm1)
    first, last = block.ffn[0], block.ffn[-1]
    inner = h @ first.weight.t() + first.bias
    if isinstance(block.ffn[1], nn.LayerNorm):  # PIR's release: Linear -> LayerNorm -> GELU -> Linear
        inner = layer_norm(inner, block.ffn[1])
    activation = nn.functional.relu if isinstance(block.ffn[-2], nn.ReLU) else nn.functional.gelu
    ffn = activation(inner) @ last.weight.t() + last.bias
    return layer_norm(h + ffn, block.norm2)
