"""The contract every retrieval model keeps, so training, evaluation and sweeps treat them alike.

Batches are dicts of tensors made by `rsray.data.loader`:
  images        float [B, 3, H, W], normalised as the model's config says
  tokens        long  [B, L] word ids (0 = <pad>, 1 = <unk>), one caption per row
  lengths       long  [B] valid tokens per row (at least 1)
  lengths_host  long  [B] `lengths` left on the host by `to_device` (a GRU's packing wants them
                there; copying them back from a GPU would make every step wait for it)
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
HOST_LENGTHS = "lengths_host"


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """The batch's tensors on `device` (other values, e.g. caption strings, as they are). To a GPU
    they go from pinned memory, so the copy is asynchronous (`non_blocking` from pageable memory
    waits for it); the decode processes hand over pageable tensors."""
    device = torch.device(device)
    host_lengths = batch.get(HOST_LENGTHS, batch.get("lengths"))
    if device.type == "cuda":
        batch = {k: v.pin_memory() if torch.is_tensor(v) and v.device.type == "cpu" else v for k, v in batch.items()}
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if torch.is_tensor(host_lengths) and host_lengths.device.type == "cpu":
        moved[HOST_LENGTHS] = host_lengths
    return moved


def lengths_on_host(batch: Batch) -> torch.Tensor:
    """The batch's caption lengths on the host, without a copy back from the device when
    `to_device` kept them (`lengths_host`); `lengths` otherwise (a batch built on its device)."""
    return batch.get(HOST_LENGTHS, batch["lengths"])


def full_precision_scores(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """image @ text.T in fp32, also under bf16 autocast (`train.amp`). Hardest-negative mining
    picks among similarities that differ in the third decimal, finer than bf16's spacing near 1
    (2^-8): with bf16 scores the max-violation triplet gradient was 13% away from fp32's, with
    these 3-5% (B=256, D=512, embeddings left in bf16). The matrix is small, so fp32 is cheap."""
    with torch.autocast(image.device.type, enabled=False):
        return image.float() @ text.float().t()


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
        return full_precision_scores(image_features, text_features)

    @abstractmethod
    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Training loss on one batch: {"total": ..., <each term>: ...}, all scalars."""
