"""PriorCLIP's progressive attention encoders (PAE): the cross-attention block they are built from,
the belief that keeps the tokens an instruction points at, and the spatial (image side) and
temporal (text side) encoders that apply them round after round. Shared by the closed-domain
(`priorclip`) and open-domain (`priorclip_open`) models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rsray.models.blocks import SelfAttentionBlock, feed_forward


class CrossAttentionBlock(nn.Module):
    """Post-LN cross-attention block: x = LN(x + drop(MHA(queries, x, x))); x = LN(x + drop(FFN(x))).

    The attended tokens `x` are the keys, values and residual stream; `queries` [B, Q, D] has Q =
    x's length or 1 (one query for every position: its output is added to each token). One query
    gives the release's numbers (it expands the query to every position) only without dropout: in
    training, with dropout, the query is expanded here too, so that each position draws its own
    attention and output dropout as in the release; in eval one query is computed, not N copies."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float = 0.2, ffn_norm: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = feed_forward(dim, ffn_dim, ffn_norm)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, queries: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if queries.shape[1] == 1 and self.training and (self.attn.dropout > 0 or self.drop1.p > 0):
            queries = queries.expand(-1, x.shape[1], -1)  # per-position dropout masks, as the release's copies
        attended, _ = self.attn(queries, x, x, key_padding_mask=key_padding_mask, need_weights=False)
        x = self.norm1(x + self.drop1(attended))
        return self.norm2(x + self.drop2(self.ffn(x)))


def belief_tokens(
    tokens: torch.Tensor, instruction: torch.Tensor, mode: str = "soft", filter_size: int = 40
) -> torch.Tensor:
    """Spatial-PAE's rank-and-filter. belief = softmax over tokens of token . instruction.

    hard (PIR): the `filter_size` tokens of highest belief, most believed first.
    soft (PriorCLIP): every token in place, scaled by belief + 1/sqrt(rank), rank being its
    1-based position in the belief order (ties by position).
    token_norm (PIR-CLIP's release at 20bbe30, open domain): every token in place, scaled by its
    belief, then each channel L2-normalised across the tokens (F.normalize's default dim=1 on
    [B, N, C]); that commit computes a 1/sqrt(index) weight but never applies it, and doubles
    x * belief, which the normalisation cancels.
    token_norm_index (PIR-CLIP's release at 9554baf, its HEAD): normalise(x * belief + x * w) as
    above, w[k] = 1 / sqrt(1 + the token index of the k-th most believed token). The weight is
    indexed by rank but holds a token index, so it is neither a rank weight nor its token's own;
    reproduced as written."""
    belief = torch.softmax(torch.einsum("bnd,bd->bn", tokens, instruction), dim=1)
    if mode == "token_norm":
        return F.normalize(tokens * belief.unsqueeze(-1), dim=1)
    order = torch.sort(belief, dim=1, descending=True, stable=True).indices
    if mode == "token_norm_index":
        index_weights = (order + 1).to(tokens.dtype).rsqrt()
        return F.normalize(tokens * belief.unsqueeze(-1) + tokens * index_weights.unsqueeze(-1), dim=1)
    if mode == "hard":
        if filter_size > tokens.shape[1]:
            raise ValueError(f"model.filter_size: {filter_size} exceeds the image's {tokens.shape[1]} tokens")
        keep = order[:, :filter_size]
        return tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[2]))
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(1, order.shape[1] + 1, device=order.device).expand_as(order))
    return tokens * (belief + ranks.to(tokens.dtype).rsqrt()).unsqueeze(-1)


def attention_rounds(
    rounds: int, dim: int, heads: int, ffn_dim: int, dropout: float, ffn_norm: bool
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The self-attention and cross-attention blocks of a PAE's rounds, one of each per round."""
    self_attn = [SelfAttentionBlock(dim, heads, ffn_dim, dropout, ffn_norm) for _ in range(rounds)]
    cross_attn = [CrossAttentionBlock(dim, heads, ffn_dim, dropout, ffn_norm) for _ in range(rounds)]
    return nn.ModuleList(self_attn), nn.ModuleList(cross_attn)


class SpatialPAE(nn.Module):
    """Vision instruction representation: belief filtering, then `rounds` of self-attention and
    instruction-queried cross-attention. Returns token 0 before the rounds + head(token 0 after).

    The cross-attention query is the instruction mapped per round; it is the same for every
    position (the release expands it to the token count), so in eval one query is computed and its
    output added to every token: the same numbers, without the copies. In training with dropout it
    is expanded as in the release (`CrossAttentionBlock`), so every position draws its own masks."""

    def __init__(
        self,
        dim: int,
        rounds: int = 2,
        heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.2,
        belief: str = "soft",
        filter_size: int = 40,
        ffn_norm: bool = False,
    ):
        super().__init__()
        self.belief, self.filter_size = belief, filter_size
        self.self_attn, self.cross_attn = attention_rounds(rounds, dim, heads, ffn_dim, dropout, ffn_norm)
        self.instruction_maps = nn.ModuleList([nn.Linear(dim, dim) for _ in range(rounds)])
        self.head = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        x = belief_tokens(tokens, instruction, self.belief, self.filter_size)
        for self_attn, cross_attn, instruction_map in zip(
            self.self_attn, self.cross_attn, self.instruction_maps, strict=True
        ):
            x = cross_attn(self_attn(x), instruction_map(instruction).unsqueeze(1))
        return tokens[:, 0] + self.head(x[:, 0])


class TemporalPAE(nn.Module):
    """Language cycle attention: `rounds` of self-attention, then cross-attention whose queries are
    a per-round linear map of the previous round's tokens, keys and values the attended tokens;
    padded keys are masked everywhere. Returns CLS + head(CLS after the rounds)."""

    def __init__(
        self,
        dim: int,
        rounds: int = 3,
        heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.2,
        ffn_norm: bool = False,
    ):
        super().__init__()
        self.self_attn, self.cross_attn = attention_rounds(rounds, dim, heads, ffn_dim, dropout, ffn_norm)
        self.token_maps = nn.ModuleList([nn.Linear(dim, dim) for _ in range(rounds)])
        self.head = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        padding = ~valid
        x = tokens
        for self_attn, cross_attn, token_map in zip(self.self_attn, self.cross_attn, self.token_maps, strict=True):
            x = cross_attn(self_attn(x, key_padding_mask=padding), token_map(x), key_padding_mask=padding)
        return tokens[:, 0] + self.head(x[:, 0])
