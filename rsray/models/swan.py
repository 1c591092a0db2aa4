"""SWAN (Pan et al., ICMR 2023): scene-aware aggregation network, from the paper and the authors' release.

Image (SwanVisualEncoder, reusable: DOVE takes its VMSF tokens and pooled vector):
  frozen ResNet-50 -> stem after max-pool -> SFGS -> V_s (fine-grained, WSA-pooled)
                   -> layer2/3/4          -> VMSF -> V_d (multi-scale) and a grid of tokens
  concat(V_s, V_d) -> Linear 2D->D -> ReLU -> Linear D->D -> L2 norm.
Text: word embedding -> dropout -> BiGRU (directions averaged) -> TCGE (GSA | JRU, MLP + residual)
  -> pool (mean, the paper; last valid token, the release) -> L2 norm.
Score: cosine. Loss: bidirectional hinge triplet (hardest negative, the paper; sum, the release).

Where the release differs from the paper or from our defaults, a switch reproduces it; together they
are `conf/model/swan-release.yaml` (facts and where they were read: docs/release-facts.md):
  text_pool last | max_violation false | mask_padding false (GSA attends to padding, BatchNorm over
  it) | gsa_floor_divide true (a bug: zero gradient to the gate, query and key weights) |
  triplet_negatives off_diagonal (same-image captions count as negatives) | frozen_bn train |
  word_init normal | decay_epoch_offset 1 (lr decays at epochs 19, 39) | train.grad_clip 0 (never
  clips) | wsa_activation gelu (the paper's WSA feed-forward is ReLU) | data.stopwords unk (stop
  words stay in captions as <unk>) | train.num_workers 1 (its README trains on one GPU; with more,
  train.sync_batchnorm is its --distributed). Not reproduced: its rotation's nearest-neighbour
  interpolation (rsray's is bilinear) and its GloVe lookup fallback for missing words (stripping
  `-`, `.`, `'`; the part before `/`). docs/fidelity.md has the table.

Spatial sizes scale with the input: at 256 px the stem map is 64x64, layer2/3/4 are 32/16/8. SFGS
pools each branch to `grid` x `grid` (16 in the paper); VMSF brings layer2 and layer4 to
layer3's size (x0.5 and x2 at 256 px, nearest), which is 16x16 at 256 px and 4x4 at 64 px.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rsray.data.augment import AugmentConfig
from rsray.losses import triplet_loss
from rsray.models.base import Batch, RetrievalModel, lengths_on_host
from rsray.models.blocks import GSA, JRU, MLP, WSA
from rsray.models.encoders import BiGRU, TimmBackbone, WordEmbedding, last_valid, length_mask, masked_mean
from rsray.models.registry import register_model
from rsray.models.vsepp import check_common
from rsray.optim import OptimiserConfig


@dataclass
class SwanConfig(OptimiserConfig):
    """Every SWAN hyper-parameter; defaults are the paper's (Adam, lr 2e-4 x0.7 every 20 epochs),
    except `wsa_activation`: gelu, what configs written before the switch trained with (swan.yaml
    sets the paper's relu)."""

    # files read only for the initial weights: a saved state replaces them (`build_for_loading`)
    initial_weights: ClassVar[tuple[str, ...]] = ("backbone_checkpoint", "glove_path")

    augment: AugmentConfig = field(default_factory=AugmentConfig)  # resize 278, rotate 0-90, crop 256; eval 256
    embed_dim: int = 512
    backbone: str = "resnet50"  # a ResNet-style timm model (SFGS needs the stem max-pool)
    backbone_checkpoint: str | None = None  # authors: AID-fine-tuned ResNet-50; null = random init
    freeze_backbone: bool = True
    # A frozen backbone with no backbone_checkpoint stays random and never learns: refused unless this
    # says it is meant (timing runs, tests of the plumbing).
    allow_random_frozen_backbone: bool = False
    # SFGS
    grid: int = 16  # each SFGS branch is pooled to grid x grid: tokens of length grid^2
    sfgs_reduce: int = 32  # stem channels after the 1x1 conv
    sfgs_branches: list[int] = field(default_factory=lambda: [32, 32, 64])  # channels = number of tokens
    sfgs_kernels: list[int] = field(default_factory=lambda: [1, 3, 5])  # kernel = stride of each branch
    sfgs_dropout: float = 0.1  # after the token projection grid^2 -> embed_dim
    wsa_heads: int = 8
    wsa_ffn: int = 1024
    wsa_dropout: float = 0.1  # attention weights and residual branches
    wsa_activation: str = "gelu"  # WSA feed-forward: relu (paper) | gelu (release; configs from before the switch)
    # VMSF
    vmsf_hidden: int = 1024  # MLP embed_dim -> vmsf_hidden -> embed_dim
    vmsf_dropout: float = 0.2
    # text
    word_dim: int = 300
    glove_path: str | None = None  # GloVe 840B in the paper; null = random word vectors
    gru_hidden: int = 512  # must equal embed_dim
    word_dropout: float = 0.4
    gsa_heads: int = 2
    gsa_dropout: float = 0.2
    tcge_hidden: int = 1024  # TCGE MLP embed_dim -> tcge_hidden -> embed_dim
    tcge_dropout: float = 0.1  # inside that MLP (the release's value)
    text_pool: str = "mean"  # mean (paper) | last valid token (release)
    mask_padding: bool = True  # our choice: GSA ignores padded keys, BatchNorms use valid tokens only
    gsa_floor_divide: bool = False  # paper: scores / sqrt(d); the release floor-divides (a bug: true)
    word_init: str = "uniform"  # our choice U(-0.1, 0.1) (VSE++'s) | normal: N(0, 1), the release's
    # the frozen ResNet's BatchNorm: eval = running statistics (our choice; the paper is silent) |
    # train = batch statistics, running ones updated (the release only turns off requires_grad)
    frozen_bn: str = "eval"
    # loss and optimisation
    margin: float = 0.2
    max_violation: bool = True  # hardest negative (paper); false = sum over negatives (release)
    # which pairs of a batch are negatives: other_images (our choice: another caption of the same
    # image never is) | off_diagonal (the release masks only the matched pair)
    triplet_negatives: str = "other_images"
    lr_decay: float = 0.7
    decay_every: int = 20

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        yield from check_common(self)
        if self.text_pool not in ("mean", "last"):
            yield "text_pool", f"must be mean or last, got {self.text_pool!r}"
        if self.word_init not in ("uniform", "normal"):
            yield "word_init", f"must be uniform or normal, got {self.word_init!r}"
        if self.wsa_activation not in ("relu", "gelu"):
            yield "wsa_activation", f"must be relu or gelu, got {self.wsa_activation!r}"
        if self.frozen_bn not in ("eval", "train"):
            yield "frozen_bn", f"must be eval or train, got {self.frozen_bn!r}"
        if self.triplet_negatives not in ("other_images", "off_diagonal"):
            yield "triplet_negatives", f"must be other_images or off_diagonal, got {self.triplet_negatives!r}"
        for name in ("grid", "sfgs_reduce", "wsa_ffn", "vmsf_hidden", "tcge_hidden"):
            if getattr(self, name) < 1:
                yield name, f"must be positive, got {getattr(self, name)}"
        if len(self.sfgs_branches) != len(self.sfgs_kernels) or not self.sfgs_branches:
            yield "sfgs_branches", f"needs one channel count per kernel in sfgs_kernels ({self.sfgs_kernels})"
        if any(v < 1 for v in self.sfgs_branches + self.sfgs_kernels):
            yield "sfgs_branches", "channels and kernels must be positive"
        for name in ("wsa_heads", "gsa_heads"):
            heads = getattr(self, name)
            if heads < 1 or self.embed_dim % heads:
                yield name, f"must divide embed_dim ({self.embed_dim}), got {heads}"


# ----------------------------------------------------------------------------- image side


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, bias: bool = False) -> nn.Sequential:
    """Conv2d with kernel = stride, BatchNorm, ReLU (the release's convs before a BatchNorm have no bias)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=kernel, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SFGS(nn.Module):
    """Scene fine-grained sensing: the shallow (stem) map -> channel tokens -> WSA -> V_s [B, D].

    1x1 conv+BN+ReLU to `reduce` channels; parallel conv+BN+ReLU branches (kernel = stride =
    `kernels`, `branches` channels), each adaptive-average-pooled to grid x grid; every channel
    is a token, its grid^2 values its features (128 tokens of 256 in the paper);
    Linear grid^2 -> D + ReLU + dropout, then WSA.
    """

    def __init__(
        self,
        in_channels: int = 64,
        dim: int = 512,
        grid: int = 16,
        reduce: int = 32,
        branches: Sequence[int] = (32, 32, 64),
        kernels: Sequence[int] = (1, 3, 5),
        heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        activation: str = "gelu",
    ):
        super().__init__()
        self.reduce = conv_bn_relu(in_channels, reduce)
        self.branches = nn.ModuleList(
            [
                nn.Sequential(conv_bn_relu(reduce, c, k), nn.AdaptiveAvgPool2d(grid))
                for c, k in zip(branches, kernels, strict=True)
            ]
        )
        self.project = nn.Sequential(nn.Linear(grid * grid, dim), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.wsa = WSA(sum(branches), dim, heads, ffn_dim, attn_dropout, activation)

    def forward(self, stem: torch.Tensor) -> torch.Tensor:
        x = self.reduce(stem)
        tokens = torch.cat([branch(x).flatten(2) for branch in self.branches], dim=1)  # [B, T, grid^2]
        return self.wsa(self.project(tokens))


class VMSF(nn.Module):
    """Vision multi-scale fusion of layer2/3/4 -> (tokens [B, h*w, D], V_d [B, D]).

    1x1 convs (with bias) to D, D, 2D channels; layer2 and layer4 resized to layer3's size
    (nearest: x0.5 and x2 for a ResNet); concat (4D) -> 1x1 conv D + BN + ReLU: the fused map,
    whose h*w positions are the tokens; spatial mean -> MLP D -> hidden -> D (dropout) = V_d.
    Resizing to layer3's size rather than by fixed factors is our choice: identical at 256 px,
    and it keeps the three maps aligned at any input size (4x4 at 64 px).
    """

    def __init__(
        self, in_channels: Sequence[int] = (512, 1024, 2048), dim: int = 512, hidden: int = 1024, dropout: float = 0.2
    ):
        super().__init__()
        c2, c3, c4 = in_channels
        self.lateral = nn.ModuleList([nn.Conv2d(c2, dim, 1), nn.Conv2d(c3, dim, 1), nn.Conv2d(c4, 2 * dim, 1)])
        self.fuse = conv_bn_relu(4 * dim, dim)
        self.mlp = MLP(dim, hidden, dim, dropout)

    def forward(self, layer2: torch.Tensor, layer3: torch.Tensor, layer4: torch.Tensor):
        size = layer3.shape[-2:]
        maps = [
            F.interpolate(conv(x), size=size, mode="nearest") if x.shape[-2:] != size else conv(x)
            for conv, x in zip(self.lateral, (layer2, layer3, layer4), strict=True)
        ]
        fused = self.fuse(torch.cat(maps, dim=1))  # [B, D, h, w]
        return fused.flatten(2).transpose(1, 2), self.mlp(fused.mean(dim=(2, 3)))


class SwanVisual(NamedTuple):
    fine: torch.Tensor | None  # V_s [B, D] from SFGS (None when built without it)
    multi_scale: torch.Tensor  # V_d [B, D] from VMSF
    tokens: torch.Tensor  # VMSF's fused map as tokens [B, h*w, D] (16x16 at 256 px)
    maps: list[torch.Tensor]  # backbone maps: stem after max-pool, layer2, layer3, layer4


class SwanVisualEncoder(nn.Module):
    """SWAN's image side before aggregation: backbone, SFGS (optional) and VMSF.

    `fine_grained=False` leaves SFGS out (a model that uses only the multi-scale path then has
    no unused parameters). `from_config` reads any config with SwanConfig's field names.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        checkpoint: str | None = None,
        freeze: bool = True,
        dim: int = 512,
        grid: int = 16,
        sfgs_reduce: int = 32,
        sfgs_branches: Sequence[int] = (32, 32, 64),
        sfgs_kernels: Sequence[int] = (1, 3, 5),
        sfgs_dropout: float = 0.1,
        wsa_heads: int = 8,
        wsa_ffn: int = 1024,
        wsa_dropout: float = 0.1,
        vmsf_hidden: int = 1024,
        vmsf_dropout: float = 0.2,
        fine_grained: bool = True,
        frozen_bn: str = "eval",
        wsa_activation: str = "gelu",
    ):
        super().__init__()
        self.backbone = TimmBackbone(
            backbone,
            out_indices=(0, 2, 3, 4),
            freeze=freeze,
            checkpoint=checkpoint,
            pool_stem=True,
            frozen_bn=frozen_bn,
        )
        stem, c2, c3, c4 = self.backbone.channels
        self.sfgs = (
            SFGS(
                stem,
                dim,
                grid,
                sfgs_reduce,
                sfgs_branches,
                sfgs_kernels,
                wsa_heads,
                wsa_ffn,
                sfgs_dropout,
                wsa_dropout,
                wsa_activation,
            )
            if fine_grained
            else None
        )
        self.vmsf = VMSF((c2, c3, c4), dim, vmsf_hidden, vmsf_dropout)

    @classmethod
    def from_config(cls, cfg, fine_grained: bool = True) -> SwanVisualEncoder:
        return cls(
            cfg.backbone,
            cfg.backbone_checkpoint,
            cfg.freeze_backbone,
            cfg.embed_dim,
            cfg.grid,
            cfg.sfgs_reduce,
            cfg.sfgs_branches,
            cfg.sfgs_kernels,
            cfg.sfgs_dropout,
            cfg.wsa_heads,
            cfg.wsa_ffn,
            cfg.wsa_dropout,
            cfg.vmsf_hidden,
            cfg.vmsf_dropout,
            fine_grained,
            getattr(cfg, "frozen_bn", "eval"),
            getattr(cfg, "wsa_activation", "gelu"),
        )

    def forward(self, images: torch.Tensor) -> SwanVisual:
        maps = self.backbone(images)
        tokens, multi_scale = self.vmsf(*maps[1:])
        fine = self.sfgs(maps[0]) if self.sfgs is not None else None
        return SwanVisual(fine, multi_scale, tokens, maps)


# ----------------------------------------------------------------------------- text side


class TCGE(nn.Module):
    """Text coarse-grained enhancement over the BiGRU sequence h [B, L, D] -> [B, D].

    GSA(h) (L tokens) and JRU(h) (L//2 + L//3 tokens) concatenated along the sequence;
    x + MLP(x) (D -> hidden -> D); pooled by `pool`: "mean" over valid positions (our reading of
    the paper's average: GSA tokens within the caption and JRU windows inside it) or "last", the
    GSA output at the caption's last word (the release).
    """

    def __init__(
        self,
        dim: int = 512,
        heads: int = 2,
        gsa_dropout: float = 0.2,
        hidden: int = 1024,
        dropout: float = 0.1,
        pool: str = "mean",
        mask_padding: bool = True,
        floor_divide: bool = False,
    ):
        super().__init__()
        self.pool, self.mask_padding = pool, mask_padding
        self.gsa = GSA(dim, heads, gsa_dropout, floor_divide)
        self.jru = JRU(dim)
        self.mlp = MLP(dim, hidden, dim, dropout)

    def forward(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        valid = length_mask(lengths.to(h.device), h.shape[1])
        gsa = self.gsa(h, valid if self.mask_padding else None)
        jru, jru_valid = self.jru(h, lengths, masked_norm=self.mask_padding)
        x = torch.cat([gsa, jru], dim=1)
        x = x + self.mlp(x)
        if self.pool == "last":
            return last_valid(x, lengths)  # positions < L are GSA's
        return masked_mean(x, torch.cat([valid, jru_valid], dim=1))


@register_model("swan", SwanConfig)
class SWAN(RetrievalModel):
    """SWAN as the paper describes it, with the release's choices as switches (text_pool, max_violation)."""

    two_tower = True

    def __init__(self, config: SwanConfig, vocab_size: int | None = None, vocab: Sequence[str] | None = None):
        super().__init__()
        if vocab_size is None:
            raise ValueError("SWAN needs vocab_size for its word embedding")
        self.config = config
        d = config.embed_dim
        self.visual = SwanVisualEncoder.from_config(config)
        self.aggregate = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(inplace=True), nn.Linear(d, d))
        self.embed = WordEmbedding(vocab_size, config.word_dim, config.word_init)
        if config.glove_path:
            self.embed.load_vectors(config.glove_path, vocab)
        self.word_dropout = nn.Dropout(config.word_dropout)
        self.gru = BiGRU(config.word_dim, config.gru_hidden, merge="mean")
        self.tcge = TCGE(
            d,
            config.gsa_heads,
            config.gsa_dropout,
            config.tcge_hidden,
            config.tcge_dropout,
            config.text_pool,
            config.mask_padding,
            config.gsa_floor_divide,
        )

    def encode_images(self, batch: Batch) -> torch.Tensor:
        visual = self.visual(batch["images"])
        return F.normalize(self.aggregate(torch.cat([visual.fine, visual.multi_scale], dim=1)), dim=-1)

    def encode_texts(self, batch: Batch) -> torch.Tensor:
        tokens, lengths = batch["tokens"], batch["lengths"]
        h = self.gru(self.word_dropout(self.embed(tokens)), lengths_on_host(batch))
        return F.normalize(self.tcge(h, lengths), dim=-1)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        scores = self.score(self.encode_images(batch), self.encode_texts(batch))
        image_ids = batch.get("image_ids") if self.config.triplet_negatives == "other_images" else None
        triplet = triplet_loss(scores, image_ids, self.config.margin, self.config.max_violation)
        return {"total": triplet, "triplet": triplet}
