"""The contract every retrieval model keeps, so training, evaluation and sweeps treat them alike.

Batches are dicts of tensors made by `rsray.data.loader`:
  images        float [B, 3, H, W], normalised as the model's config says
  tokens        long  [B, L] word ids (0 = <pad>, 1 = <unk>), one caption per row
  lengths       long  [B] valid tokens per row (at least 1)
  input_ids, attention_mask   long [B, L'] when a BERT-family tokenizer is configured
  image_ids     long  [B] which image a row's caption belongs to (captions of one image are
                positives of each other: losses must not treat them as negatives)
  scene_ids     long  [B] scene class index, -1 when unknown
A training batch has one (image, caption) pair per row. Evaluation encodes the N images and the
5N captions separately, then `score`s features.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


class RetrievalModel(nn.Module, ABC):
    """Image-text retrieval: two encoders, a score between their features, a loss with its terms."""

    #: True when `score` is a plain dot product of the features (embeddings can be indexed, and
    #: evaluation can multiply matrices); False for pairwise scores computed on blocks.
    two_tower: bool = True

    @abstractmethod
    def encode_images(self, batch: Batch) -> torch.Tensor:
        """Image features: [B, D] embeddings for two-tower models, anything `score` accepts otherwise."""

    @abstractmethod
    def encode_texts(self, batch: Batch) -> torch.Tensor:
        """Caption features: [B, D] embeddings for two-tower models."""

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """[n_img, n_txt] similarities; the default is the dot product of L2-normalised embeddings."""
        return image_features @ text_features.t()

    @abstractmethod
    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Training loss on one batch: {"total": ..., <each term>: ...}, all scalars."""
