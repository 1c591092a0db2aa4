"""VSE++ (Faghri et al., BMVC 2018): the baseline, and the smallest full model.

Image: timm backbone -> global average pool -> linear -> L2 norm.
Text: word embedding -> BiGRU (directions averaged) -> mean over valid tokens -> L2 norm.
Score: cosine. Loss: bidirectional hinge triplet, hardest negative or sum over negatives.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import timm
import torch
import torch.nn.functional as F
from torch import nn

from rsray.data.augment import AugmentConfig
from rsray.losses import triplet_loss
from rsray.models.base import Batch, RetrievalModel, lengths_on_host
from rsray.models.encoders import BiGRU, TimmBackbone, WordEmbedding, length_mask, masked_mean
from rsray.models.registry import register_model
from rsray.optim import OptimiserConfig


@dataclass
class VseppConfig(OptimiserConfig):
    """Every VSE++ hyper-parameter (the optimiser's: `rsray.optim.OptimiserConfig`, Adam + step decay).

    Our choices (the spec names only "a timm backbone"): ResNet-50, fine-tuned; SWAN's image
    pipeline (278 -> rotate -> crop 256) so the two compare like with like; mean over valid
    tokens (as the spec says; the VSE++ paper takes the last GRU state).
    """

    # files read only for the initial weights: a saved state replaces them (`build_for_loading`)
    initial_weights: ClassVar[tuple[str, ...]] = ("backbone_checkpoint", "glove_path")

    augment: AugmentConfig = field(default_factory=AugmentConfig)  # SWAN's pipeline, to compare like with like
    embed_dim: int = 512
    backbone: str = "resnet50"  # any timm model name
    backbone_checkpoint: str | None = None  # weights file or Hub name (rsray.weights); null = random init
    freeze_backbone: bool = False  # VSE++'s best results fine-tune the CNN
    # A frozen backbone with no backbone_checkpoint stays random and never learns: refused unless this
    # says it is meant (timing runs, tests of the plumbing).
    allow_random_frozen_backbone: bool = False
    word_dim: int = 300
    glove_path: str | None = None  # GloVe-format vectors file; null = random word vectors
    gru_hidden: int = 512  # the caption embedding is the GRU state: must equal embed_dim
    word_dropout: float = 0.0
    margin: float = 0.2
    max_violation: bool = True  # hardest negative (VSE++); false = sum over negatives
    lr_decay: float = 0.1  # VSE++: x0.1 after 15 of 30 epochs
    decay_every: int = 15

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        yield from check_common(self)


def check_common(cfg) -> Iterator[tuple[str, str]]:
    """Checks for the fields VSE++-style configs share (SWAN reuses them)."""
    for name in ("embed_dim", "word_dim", "gru_hidden"):
        if getattr(cfg, name) < 1:
            yield name, f"must be positive, got {getattr(cfg, name)}"
    if cfg.gru_hidden != cfg.embed_dim:
        yield "gru_hidden", f"must equal embed_dim ({cfg.embed_dim}): the caption embedding is the GRU state"
    if not timm.is_model(cfg.backbone):
        yield "backbone", f"not a timm model name: {cfg.backbone!r}"
    for name in [f for f in vars(cfg) if f.endswith("dropout")]:
        if not 0.0 <= getattr(cfg, name) < 1.0:
            yield name, f"must be in [0, 1), got {getattr(cfg, name)}"
    if cfg.margin < 0:
        yield "margin", f"must not be negative, got {cfg.margin}"
    if cfg.freeze_backbone and not cfg.backbone_checkpoint and not cfg.allow_random_frozen_backbone:
        yield (
            "backbone_checkpoint",
            "is null while freeze_backbone is true: a frozen, randomly initialised backbone never learns. "
            "Give a local weights file, or set model.freeze_backbone=false, or "
            "model.allow_random_frozen_backbone=true if that is what you want",
        )


@register_model("vsepp", VseppConfig)
class VSEPP(RetrievalModel):
    """VSE++ with a timm image backbone and a BiGRU caption encoder (mean over valid tokens)."""

    two_tower = True

    def __init__(self, config: VseppConfig, vocab_size: int | None = None, vocab: Sequence[str] | None = None):
        super().__init__()
        if vocab_size is None:
            raise ValueError("VSE++ needs vocab_size for its word embedding")
        self.config = config
        self.backbone = TimmBackbone(
            config.backbone, out_indices=(-1,), freeze=config.freeze_backbone, checkpoint=config.backbone_checkpoint
        )
        self.image_proj = nn.Linear(self.backbone.channels[-1], config.embed_dim)
        self.embed = WordEmbedding(vocab_size, config.word_dim)
        if config.glove_path:
            self.embed.load_vectors(config.glove_path, vocab)
        self.word_dropout = nn.Dropout(config.word_dropout)
        self.gru = BiGRU(config.word_dim, config.gru_hidden, merge="mean")

    def encode_images(self, batch: Batch) -> torch.Tensor:
        (features,) = self.backbone(batch["images"])
        return F.normalize(self.image_proj(features.mean(dim=(2, 3))), dim=-1)

    def encode_texts(self, batch: Batch) -> torch.Tensor:
        tokens, lengths = batch["tokens"], batch["lengths"]
        words = self.gru(self.word_dropout(self.embed(tokens)), lengths_on_host(batch))
        return F.normalize(masked_mean(words, length_mask(lengths, tokens.shape[1])), dim=-1)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        scores = self.score(self.encode_images(batch), self.encode_texts(batch))
        triplet = triplet_loss(scores, batch.get("image_ids"), self.config.margin, self.config.max_violation)
        return {"total": triplet, "triplet": triplet}
