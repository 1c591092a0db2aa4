"""Gswin: timm's Swin Transformer with a global-window cross-attention in the blocks of chosen
stages (CMPAGL's image encoder, "local window self-attention and global-local window
cross-attention", Fig. 2a "GWG block").

The paper gives no more than that sentence; the construction here is ours (cmpagl.md §2):
- **Global window** (our choice): the stage's whole feature map average-pooled to `window` x
  `window` tokens (default: the stage's own window size), one global window per image.
- **Where** (our choice): in every block of `global_stages`, after the block's (shifted) window
  self-attention and before its MLP: `x = x + W-MSA(norm1(x)); x = x + GWA(x); x = x + MLP(norm2(x))`.
  The last stage is usually left out: at 224 px its single 7x7 window already sees the whole map.
- **GWA**: queries from LayerNorm(x) (every token), keys and values from LayerNorm(pooled map),
  the block's number of heads, no relative position bias, and an output projection that starts
  at zero, so a pretrained Swin computes exactly what it did until training moves it.

Built on timm's own blocks and weights: each chosen `SwinTransformerBlock` becomes a
`GswinBlock` in place (its class is swapped to this subclass and a `global_attn` module added; timm
has no hook for a custom block), so every pretrained key keeps its name and the only new keys
are `...global_attn.*`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from torch import nn

from rsray.weights import resolve


class GlobalWindowAttention(nn.Module):
    """Every token of a [B, H, W, C] map attends to the map average-pooled to `window` x `window`."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"global window attention: {dim} channels do not split into {heads} heads")
        self.heads, self.window = heads, window
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)  # the block starts as the pretrained Swin block
        nn.init.zeros_(self.proj.bias)

    def global_window(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] -> [B, window*window, C]: the map average-pooled to the global window."""
        pooled = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), self.window)
        return pooled.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        heads = self.heads
        q = self.q(self.norm_q(x).reshape(b, h * w, c))
        k, v = self.kv(self.norm_kv(self.global_window(x))).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class GswinBlock(SwinTransformerBlock):
    """A timm Swin block with the global-window branch between its window attention and its MLP."""

    global_attn: GlobalWindowAttention

    @classmethod
    def adopt(cls, block: SwinTransformerBlock, window: int | None = None) -> GswinBlock:
        """`block` itself, turned into a GswinBlock (same weights and buffers, same key names)."""
        if not isinstance(block, SwinTransformerBlock):
            raise TypeError(f"expected a timm SwinTransformerBlock, got {type(block).__name__}")
        window = window or block.window_size[0]
        block.__class__ = cls
        block.global_attn = GlobalWindowAttention(block.dim, block.attn.num_heads, window).to(
            device=block.norm1.weight.device, dtype=block.norm1.weight.dtype
        )
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x + self.drop_path1(self.global_attn(x))  # our choice: the block's stochastic depth, as its other branches
        x = x.reshape(b, -1, c)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(b, h, w, c)


class Gswin(nn.Module):
    """The image encoder: Swin with global windows in `global_stages`; `forward` returns the image
    tokens [B, 1 + H*W, C] after Swin's final norm: the mean token first, then every patch."""

    def __init__(
        self,
        name: str = "swin_tiny_patch4_window7_224",
        checkpoint: str | Path | None = None,
        global_stages: Sequence[int] = (0, 1, 2),
        global_window: int | None = None,
        **timm_kwargs,
    ):
        super().__init__()
        self.swin: SwinTransformer = timm.create_model(name, num_classes=0, **timm_kwargs)
        if not isinstance(self.swin, SwinTransformer):
            raise ValueError(f"Gswin needs a timm Swin Transformer, {name!r} is {type(self.swin).__name__}")
        if checkpoint is not None:
            load_swin_weights(self.swin, checkpoint)
        stages = len(self.swin.layers)
        for stage in global_stages:
            if not 0 <= stage < stages:
                raise ValueError(f"global stage {stage} does not exist: {name} has stages 0..{stages - 1}")
            for block in self.swin.layers[stage].blocks:
                GswinBlock.adopt(block, global_window)
        self.width = self.swin.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.swin.forward_features(images).flatten(1, 2)  # [B, H*W, C], normed
        return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)


def load_swin_weights(swin: nn.Module, path: str | Path) -> None:
    """The Swin's weights file (timm's state dict; a classifier head is ignored), local or a Hub
    name in the cache (`rsray.weights`); every weight the model has must be in it, checked by name
    and shape."""
    path = resolve(str(path), want_file=True).path
    state = timm.models.load_state_dict(str(path), weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = swin.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("relative_position_index")]
    if missing:
        raise ValueError(f"backbone checkpoint {path}: {len(missing)} Swin weights missing (first: {missing[0]})")
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise ValueError(
            f"backbone checkpoint {path}: {wrong[0]} is {tuple(state[wrong[0]].shape)}, the model's "
            f"{tuple(own[wrong[0]].shape)} (another Swin size or image size?)"
        )
    swin.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
