"""DOVE (TGRS 2024): region-oriented visual-semantic alignment with a pairwise (image-guided) score.

No code was released, so most of the structure is ours (see the spec, models.md "DOVE"):

Image: SWAN's multi-scale visual encoder (reused, without SFGS) gives the VMSF token grid
  (16x16 of D at 256 px) and its pooled vector V_d. RoI encoder: `roi_align` on the layer-3 map
  with a fixed multi-scale grid of boxes (1x1 + 2x2 + 3x3 = 14), then a linear map to D:
  regional features R [B, K, D].
  IFA: R queries a cross-attention over the VMSF tokens (residual, LayerNorm), mean over
  regions, visual head -> L2 norm = the image embedding v (independent of any caption).
Text: word embedding -> dropout -> BiGRU with the two directions kept apart (Hf, Hb) -> DTGA:
  g = sigmoid(W[A; B] + b), H = g*A + (1-g)*B with (A, B) = `dtga_inputs` of (Hf, Hb); one
  single-head self-attention with residual (LayerNorm); H are the word features, their mean over
  valid words the caption vector t_g.
IGA: the image's pooled regional vector (projected) is the query of a single-head attention
  pooling over the caption's words (keys projected, values the word features); text head ->
  L2 norm = the caption embedding *for that image*, c_ij. Score s_ij = v_i . c_ij: pairwise.
Loss: triplet(s) + lambda_g * triplet(global), global = cos(V_d, t_g), both sides independent.

Regions are always the grid (our choice). The spec allows detector boxes from the data, but no
reader produces them and SWAN's augmentation (a random rotation of up to 90 degrees, then a
random crop) would have to move every box with the image: a box path nothing feeds was removed
rather than kept untested. A detector's boxes would come back as a `table` column, moved by the
augmentation, tested end to end.

Scoring cost: the caption side of IGA (the keys and the text head's first Linear over each word)
does not depend on the image, so `encode_texts` computes it once per caption and `score` only
mixes it per pair: evaluation in image blocks never recomputes a caption's projections. The
price is memory: L x (D + H) floats per caption of the gallery (30 words at D 512, H 1024: 184 KB),
the word features themselves are not kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from rsray.data.augment import AugmentConfig
from rsray.losses import at_least_fp32, triplet_loss
from rsray.models.base import Batch, RetrievalModel, full_precision_scores, lengths_on_host
from rsray.models.encoders import BiGRU, WordEmbedding, length_mask, masked_mean
from rsray.models.registry import register_model
from rsray.models.swan import SwanVisualEncoder
from rsray.models.vsepp import check_common
from rsray.optim import OptimiserConfig

HEADS = ("linear", "mlp")
STREAMS = ("f", "b")


@dataclass
class DoveConfig(OptimiserConfig):
    """Every DOVE hyper-parameter. Paper numbers where it gives them (SWAN's training, 512-d);
    the rest is our choice, each a switch."""

    # files read only for the initial weights: a saved state replaces them (`build_for_loading`)
    initial_weights: ClassVar[tuple[str, ...]] = ("backbone_checkpoint", "glove_path")

    augment: AugmentConfig = field(default_factory=AugmentConfig)  # SWAN's pipeline
    embed_dim: int = 512
    backbone: str = "resnet50"  # a ResNet-style timm model (SWAN's encoder)
    backbone_checkpoint: str | None = None  # weights file or Hub name (rsray.weights); null = random init
    freeze_backbone: bool = True
    # A frozen backbone with no backbone_checkpoint stays random and never learns: refused unless this
    # says it is meant (timing runs, tests of the plumbing).
    allow_random_frozen_backbone: bool = False
    vmsf_hidden: int = 1024
    vmsf_dropout: float = 0.2
    # RoI encoder (ours)
    roi_grid: list[int] = field(default_factory=lambda: [1, 2, 3])  # an n x n grid of boxes per level
    roi_size: int = 2  # roi_align output (roi_size x roi_size), flattened, then linear to embed_dim
    # ROAM
    ifa_heads: int = 8  # our choice: IFA cross-attention heads (the spec fixes DTGA's at one, not IFA's)
    attn_dropout: float = 0.1  # attention weights in IFA and DTGA
    roam_heads: list[str] = field(default_factory=lambda: ["mlp", "mlp"])  # [visual, text], each linear | mlp
    head_hidden: int = 1024  # mlp heads: embed_dim -> head_hidden -> embed_dim
    head_dropout: float = 0.1
    iga_query: str = "regions"  # our choice: IGA's query is mean(R) (regions) or the IFA output (fused)
    # text
    word_dim: int = 300
    glove_path: str | None = None
    gru_hidden: int = 512  # must equal embed_dim
    word_dropout: float = 0.4
    dtga_inputs: list[str] = field(default_factory=lambda: ["f", "b"])  # ablations [f, f], [b, b]
    # scoring: at most this many (image, caption) pairs' head activations at once (bounds memory)
    score_chunk_pairs: int = 16384
    # loss and optimisation (SWAN's)
    lambda_g: float = 1.0  # weight of the global triplet term (paper sweeps 0.01..100)
    margin: float = 0.2
    max_violation: bool = True
    lr_decay: float = 0.7
    decay_every: int = 20

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        yield from check_common(self)
        if not self.roi_grid or any(n < 1 for n in self.roi_grid):
            yield "roi_grid", f"needs at least one positive grid size, got {self.roi_grid}"
        for name in ("roi_size", "vmsf_hidden", "head_hidden", "score_chunk_pairs"):
            if getattr(self, name) < 1:
                yield name, f"must be positive, got {getattr(self, name)}"
        if self.ifa_heads < 1 or self.embed_dim % self.ifa_heads:
            yield "ifa_heads", f"must divide embed_dim ({self.embed_dim}), got {self.ifa_heads}"
        if len(self.roam_heads) != 2 or any(h not in HEADS for h in self.roam_heads):
            yield "roam_heads", f"expected [visual, text], each linear or mlp, got {self.roam_heads}"
        if len(self.dtga_inputs) != 2 or any(s not in STREAMS for s in self.dtga_inputs):
            yield "dtga_inputs", f"expected two of f (forward) / b (backward), got {self.dtga_inputs}"
        if self.iga_query not in ("regions", "fused"):
            yield "iga_query", f"must be regions or fused, got {self.iga_query!r}"
        if self.lambda_g < 0:
            yield "lambda_g", f"must not be negative, got {self.lambda_g}"


class DoveImageFeatures(NamedTuple):
    embedding: torch.Tensor  # v [N, D], L2-normalised IFA output
    query: torch.Tensor  # IGA query [N, D] (projected pooled regional vector)


class DoveTextFeatures(NamedTuple):
    """What scoring needs of a caption, the image-independent part of IGA computed once (the word
    features themselves are not kept: `word_features` gives them)."""

    valid: torch.Tensor  # [M, L] bool, True at real words
    sentence: torch.Tensor  # t_g [M, D], L2-normalised mean of the word features
    keys: torch.Tensor  # IGA keys of the words [M, L, D] (image-independent, computed once)
    values: torch.Tensor  # the text head's first Linear on each word [M, L, H] (likewise)


# ----------------------------------------------------------------------------- parts


def grid_boxes(levels: Sequence[int]) -> torch.Tensor:
    """[sum n^2, 4] boxes (x1, y1, x2, y2) in image fractions: an n x n grid for each level, row-major."""
    boxes = []
    for n in levels:
        edges = torch.linspace(0, 1, n + 1)
        boxes += [[edges[c], edges[r], edges[c + 1], edges[r + 1]] for r in range(n) for c in range(n)]
    return torch.tensor(boxes, dtype=torch.float32)


class RoIEncoder(nn.Module):
    """Regional features [B, K, D]: roi_align of the grid boxes on a feature map, flattened, linear to D.

    Boxes are image fractions (x1, y1, x2, y2 in 0..1), scaled to the map's size and aligned
    (pixel centres at +0.5), so [0, 0, 1, 1] covers the whole map whatever its stride. The pooling
    runs in fp32 under any autocast; the projection autocasts as usual."""

    def __init__(self, in_channels: int, dim: int, levels: Sequence[int] = (1, 2, 3), output_size: int = 2):
        super().__init__()
        self.output_size = output_size
        self.register_buffer("grid", grid_boxes(levels), persistent=False)
        self.project = nn.Linear(in_channels * output_size**2, dim)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        b, _, h, w = feature_map.shape
        k, maps = self.grid.shape[0], at_least_fp32(feature_map)
        scale = torch.tensor([w, h, w, h], dtype=maps.dtype, device=maps.device)
        image_index = torch.arange(b, dtype=maps.dtype, device=maps.device).repeat_interleave(k)
        # [B*K, 5] rois (image index, x1, y1, x2, y2) in fp32 (or fp64), built here: given a list,
        # torchvision writes the image index in the boxes' dtype, and bf16 holds integers exactly only to 256.
        rois = torch.cat([image_index[:, None], (self.grid.to(maps.dtype) * scale).repeat(b, 1)], dim=1)
        with torch.autocast(maps.device.type, enabled=False):
            pooled = roi_align(maps, rois, self.output_size, spatial_scale=1.0, aligned=True)
        return self.project(pooled.flatten(1)).view(b, k, -1)


class IFA(nn.Module):
    """Intra-modal fusion: regions query the multi-scale tokens (cross-attention, residual, post-LN),
    then the mean over regions [B, D]."""

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, regions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attn(regions, tokens, tokens, need_weights=False)
        return self.norm(regions + attended).mean(dim=1)


class DTGA(nn.Module):
    """Dual-flow text gating: H = g*A + (1-g)*B, g = sigmoid(W[A; B] + b), (A, B) picked from the
    forward / backward GRU sequences by `inputs`; then one single-head self-attention layer with
    residual and LayerNorm (our choice of norm). Returns the word features (zero at padding)."""

    def __init__(self, dim: int, inputs: Sequence[str] = ("f", "b"), dropout: float = 0.1):
        super().__init__()
        self.inputs = tuple(inputs)
        self.gate = nn.Linear(2 * dim, dim)
        self.attn = nn.MultiheadAttention(dim, 1, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, forward: torch.Tensor, backward: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        streams = {"f": forward, "b": backward}
        a, b = streams[self.inputs[0]], streams[self.inputs[1]]
        g = torch.sigmoid(self.gate(torch.cat([a, b], dim=-1)))
        h = g * a + (1 - g) * b
        attended, _ = self.attn(h, h, h, key_padding_mask=~valid, need_weights=False)
        return self.norm(h + attended) * valid.unsqueeze(-1)


class Head(nn.Module):
    """A ROAM decoding head: `linear` (one Linear D -> D) or `mlp` (Linear -> ReLU -> dropout ->
    Linear). Kept as `first` (a Linear) and `rest` so the text side can apply `first` to each word
    before the attention pooling: a Linear commutes with a convex combination, so that is exact
    and costs L x hidden per pair instead of D x hidden."""

    def __init__(self, kind: str, dim: int, hidden: int, dropout: float):
        super().__init__()
        if kind == "linear":
            self.first, self.rest = nn.Linear(dim, dim), nn.Identity()
        elif kind == "mlp":
            self.first = nn.Linear(dim, hidden)
            self.rest = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        else:
            raise ValueError(f"head must be linear or mlp, got {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(self.first(x))


# ----------------------------------------------------------------------------- the model


@register_model("dove", DoveConfig)
class DOVE(RetrievalModel):
    """DOVE with SWAN's multi-scale encoder, an RoI encoder, DTGA text, ROAM (IFA + IGA) and the
    global constraint; the score is pairwise (the caption embedding depends on the image)."""

    two_tower = False

    def __init__(self, config: DoveConfig, vocab_size: int | None = None, vocab: Sequence[str] | None = None):
        super().__init__()
        if vocab_size is None:
            raise ValueError("DOVE needs vocab_size for its word embedding")
        self.config = config
        d = config.embed_dim
        self.visual = SwanVisualEncoder(
            config.backbone,
            config.backbone_checkpoint,
            config.freeze_backbone,
            d,
            vmsf_hidden=config.vmsf_hidden,
            vmsf_dropout=config.vmsf_dropout,
            fine_grained=False,
        )
        layer3_channels = self.visual.backbone.channels[2]
        self.roi = RoIEncoder(layer3_channels, d, config.roi_grid, config.roi_size)
        self.ifa = IFA(d, config.ifa_heads, config.attn_dropout)
        self.visual_head = Head(config.roam_heads[0], d, config.head_hidden, config.head_dropout)
        self.iga_query = nn.Linear(d, d)
        self.iga_key = nn.Linear(d, d)
        self.text_head = Head(config.roam_heads[1], d, config.head_hidden, config.head_dropout)
        self.embed = WordEmbedding(vocab_size, config.word_dim)
        if config.glove_path:
            self.embed.load_vectors(config.glove_path, vocab)
        self.word_dropout = nn.Dropout(config.word_dropout)
        self.gru = BiGRU(config.word_dim, config.gru_hidden, merge="separate")
        self.dtga = DTGA(d, config.dtga_inputs, config.attn_dropout)

    # --- encoders

    def image_parts(self, batch: Batch) -> tuple[DoveImageFeatures, torch.Tensor, torch.Tensor]:
        """(features for `score`, the L2-normalised pooled multi-scale vector V_d for the global
        loss, the regional features R)."""
        visual = self.visual(batch["images"])
        regions = self.roi(visual.maps[2])  # maps: stem, layer2, layer3, layer4
        fused = self.ifa(regions, visual.tokens)
        embedding = F.normalize(self.visual_head(fused), dim=-1)
        query = self.iga_query(regions.mean(dim=1) if self.config.iga_query == "regions" else fused)
        return DoveImageFeatures(embedding, query), F.normalize(visual.multi_scale, dim=-1), regions

    def encode_images(self, batch: Batch) -> DoveImageFeatures:
        return self.image_parts(batch)[0]

    def word_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(DTGA word features [M, L, D], zero at padding; valid [M, L])."""
        tokens, lengths = batch["tokens"], batch["lengths"]
        valid = length_mask(lengths.to(tokens.device), tokens.shape[1])
        forward, backward = self.gru(self.word_dropout(self.embed(tokens)), lengths_on_host(batch))
        return self.dtga(forward, backward, valid), valid

    def encode_texts(self, batch: Batch) -> DoveTextFeatures:
        words, valid = self.word_features(batch)
        sentence = F.normalize(masked_mean(words, valid), dim=-1)
        # the head's first Linear per word: exact, see Head
        return DoveTextFeatures(valid, sentence, self.iga_key(words), self.text_head.first(words))

    # --- pairwise score

    def score(self, image_features: DoveImageFeatures, text_features: DoveTextFeatures) -> torch.Tensor:
        """s[i, j] = v_i . L2norm(text_head(sum_l a_ijl w_jl)), a_ij = softmax over caption j's valid
        words of (query_i . key(w_jl)) / sqrt(D). The captions' keys and first-Linear values come
        with their features (`encode_texts`). Computed in chunks of at most `score_chunk_pairs`
        pairs, so only [chunk, hidden] activations exist at once, never [n_img, n_txt, D]."""
        embedding, query = image_features
        keys, values, valid = text_features.keys, text_features.values, text_features.valid
        n_img, n_txt = query.shape[0], keys.shape[0]
        padding = ~valid[None]
        scale = 1.0 / math.sqrt(query.shape[-1])
        pairs = self.config.score_chunk_pairs
        text_step = max(1, min(n_txt, pairs))
        image_step = max(1, pairs // max(text_step, 1))
        rows = []
        for i0 in range(0, n_img, image_step):
            q, v = query[i0 : i0 + image_step], embedding[i0 : i0 + image_step]
            cols = []
            for t0 in range(0, n_txt, text_step):
                t1 = t0 + text_step
                logits = torch.einsum("id,tld->itl", q, keys[t0:t1]) * scale
                attention = logits.masked_fill(padding[:, t0:t1], float("-inf")).softmax(dim=-1)
                pooled = torch.einsum("itl,tlh->ith", attention, values[t0:t1])
                caption = F.normalize(self.text_head.rest(pooled), dim=-1)  # [i, t, D]
                with torch.autocast(v.device.type, enabled=False):  # fp32, as full_precision_scores
                    cols.append(torch.einsum("id,itd->it", v.float(), caption.float()))
            rows.append(torch.cat(cols, dim=1))
        if not rows:
            return query.new_zeros((n_img, n_txt), dtype=torch.float32)
        return torch.cat(rows, dim=0)

    # --- training

    def batch_scores(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, B] pairwise scores, [B, B] global cosine scores) of a training batch: what the loss sees."""
        image, image_global, _ = self.image_parts(batch)
        text = self.encode_texts(batch)
        return self.score(image, text), full_precision_scores(image_global, text.sentence)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        final, global_ = self.batch_scores(batch)
        image_ids, margin, hardest = batch.get("image_ids"), self.config.margin, self.config.max_violation
        triplet = triplet_loss(final, image_ids, margin, hardest)
        global_triplet = triplet_loss(global_, image_ids, margin, hardest)
        return {"total": triplet + self.config.lambda_g * global_triplet, "triplet": triplet, "global": global_triplet}
