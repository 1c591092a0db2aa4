"""Scene prior: the scene classifier whose image backbone PriorCLIP loads, frozen, as its instruction encoder.

PriorCLIP's instruction encoder is a CNN trained for remote-sensing scene classification (a
ResNet-50 fine-tuned on AID in the paper). No such weights exist here, so the pipeline trains the
prior itself on the dataset's scene labels, with the same `rsray train` machinery as every model
(Ray Train workers, per-epoch checkpoints, MLflow) [ours].

Image: timm backbone -> global average pool -> linear to embed_dim: the image embedding.
Caption: word embedding -> mean over valid words -> linear to embed_dim.
Classifier: cosine similarity of an embedding to learnable scene prototypes, times a learnable
scale (initial 1 / `temperature`), cross-entropy with the row's scene; rows of unknown scene
(-1) are skipped. Images and captions are classified against the same prototypes.

Why captions at all (our choice): the caption branch keeps the retrieval contract every
registered model keeps (encode_images / encode_texts / score), so the shared tests, evaluation
and figures apply unchanged, and what it reports is worth knowing: how far scene alone goes on
the retrieval protocol (a scene-only baseline). PriorCLIP loads only the image backbone;
`caption_weight: 0` trains the image classifier alone.

Validation adds the scene accuracy of images (`accuracy`, the metric that selects the best
checkpoint) and of captions (`caption_accuracy`), in percent, to the retrieval numbers.
`num_classes: null` is filled in by `rsray train` from the prepared data's scene list.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import timm
import torch
import torch.nn.functional as F
from torch import nn

from rsray.data.augment import AugmentConfig
from rsray.data.loader import image_scenes, scene_index
from rsray.losses import LogitScale, at_least_fp32
from rsray.models.base import Batch, RetrievalModel
from rsray.models.encoders import TimmBackbone, WordEmbedding, length_mask, masked_mean
from rsray.models.registry import register_model
from rsray.optim import OptimiserConfig

BACKBONE_PREFIX = "backbone.body."  # where the timm backbone's weights sit in this model's state dict


def priorclip_augment() -> AugmentConfig:
    """PriorCLIP's image pipeline: random resized crop 224 (scale 0.5-1, bicubic), horizontal flip,
    RandAugment(2, 7), CLIP mean/std; eval resize 224. The scene prior trains on the same pipeline
    (our choice), so its backbone sees images exactly as PriorCLIP will feed them to it."""
    return AugmentConfig(
        train_resize=224,
        crop=224,
        rotation=0.0,
        hflip=True,
        random_resized_crop=[0.5, 1.0],
        rand_augment=[2, 7],
        eval_resize=224,
        normalize="clip",
        interpolation="bicubic",
    )


@dataclass
class ScenePriorConfig(OptimiserConfig):
    """Every scene-prior setting (AdamW, our choice for fine-tuning an ImageNet CNN)."""

    # files read only for the initial weights: a saved state replaces them (`build_for_loading`)
    initial_weights: ClassVar[tuple[str, ...]] = ("backbone_checkpoint",)

    selection_metric: ClassVar[str] = "accuracy"  # the best checkpoint is the best image classifier

    augment: AugmentConfig = field(default_factory=priorclip_augment)
    backbone: str = "resnet50"  # the paper's instruction encoder; any timm CNN works
    backbone_checkpoint: str | None = None  # weights file or Hub name (rsray.weights); null = random init
    freeze_backbone: bool = False  # a prior is learned by fine-tuning the backbone
    num_classes: int | None = None  # scene classes; null = the prepared data's scenes (rsray train fills it)
    embed_dim: int = 512
    word_dim: int = 300
    caption_weight: float = 1.0  # weight of the caption classifier's loss; 0 = images only
    temperature: float = 0.07  # initial temperature of the prototype classifier (learnable)
    optimizer: str = "adamw"
    lr: float = 1.0e-4
    weight_decay: float = 0.05
    lr_decay: float = 0.1
    decay_every: int = 20

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        if not timm.is_model(self.backbone):
            yield "backbone", f"not a timm model name: {self.backbone!r}"
        if self.num_classes is not None and self.num_classes < 2:
            yield "num_classes", f"must be at least 2 (or null: from the data), got {self.num_classes}"
        for name in ("embed_dim", "word_dim"):
            if getattr(self, name) < 1:
                yield name, f"must be positive, got {getattr(self, name)}"
        if self.caption_weight < 0:
            yield "caption_weight", f"must not be negative, got {self.caption_weight}"
        if self.temperature <= 0:
            yield "temperature", f"must be positive, got {self.temperature}"

    def check_data(self, manifest: dict) -> Iterator[tuple[str, str]]:
        """Refuse prepared data the classifier cannot learn from (read by `rsray train`)."""
        scenes = len(manifest.get("scenes") or {})
        if scenes < 2:
            yield (
                "name",
                (f"scene_prior needs scene labels of at least 2 classes; {manifest.get('dataset')} has {scenes}"),
            )
        elif self.num_classes is not None and self.num_classes < scenes:
            yield "num_classes", f"{self.num_classes} classes for data with {scenes} scenes (null: from the data)"

    def from_data(self, manifest: dict) -> dict[str, Any]:
        """Keys that follow from the prepared data: the number of scene classes."""
        return {"num_classes": len(manifest.get("scenes") or {})} if self.num_classes is None else {}


@register_model("scene_prior", ScenePriorConfig)
class ScenePrior(RetrievalModel):
    """Scene classifier on images (and captions) against shared scene prototypes."""

    two_tower = True

    def __init__(self, config: ScenePriorConfig, vocab_size: int | None = None, vocab: Sequence[str] | None = None):
        super().__init__()
        if config.num_classes is None:
            raise ValueError(
                "model.num_classes: null is filled in from the prepared data by rsray train; "
                "give the number of scene classes to build the model directly"
            )
        if vocab_size is None:
            raise ValueError("the scene prior needs vocab_size for its caption branch")
        self.config = config
        self.backbone = TimmBackbone(
            config.backbone, out_indices=(-1,), freeze=config.freeze_backbone, checkpoint=config.backbone_checkpoint
        )
        self.image_proj = nn.Linear(self.backbone.channels[-1], config.embed_dim)
        self.embed = WordEmbedding(vocab_size, config.word_dim)
        self.text_proj = nn.Linear(config.word_dim, config.embed_dim)
        self.prototypes = nn.Parameter(torch.randn(config.num_classes, config.embed_dim) / config.embed_dim**0.5)
        self.logit_scale = LogitScale(config.temperature)
        if config.caption_weight == 0:  # the caption branch only validates: DDP must not wait for its gradients
            self.ddp_kwargs = {"find_unused_parameters": True}

    def encode_images(self, batch: Batch) -> torch.Tensor:
        (features,) = self.backbone(batch["images"])
        return F.normalize(self.image_proj(features.mean(dim=(2, 3))), dim=-1)

    def encode_texts(self, batch: Batch) -> torch.Tensor:
        tokens, lengths = batch["tokens"], batch["lengths"]
        words = masked_mean(self.embed(tokens), length_mask(lengths, tokens.shape[1]))
        return F.normalize(self.text_proj(words), dim=-1)

    def scene_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, num_classes]: scaled cosine of L2-normalised embeddings to each scene prototype, in
        fp32 under any autocast (rsray's rule for logits)."""
        with torch.autocast(embeddings.device.type, enabled=False):
            return self.logit_scale() * at_least_fp32(embeddings) @ F.normalize(self.prototypes, dim=-1).t()

    def _classification_loss(self, embeddings: torch.Tensor, scene_ids: torch.Tensor) -> torch.Tensor:
        known = scene_ids >= 0
        if not bool(known.any()):
            # no labelled row: zero, with every parameter the loss uses still in the graph (DDP
            # waits for a gradient of each, and another worker's batch may have labels)
            return (embeddings.sum() + self.scene_logits(embeddings[:1]).sum()) * 0.0
        if int(scene_ids.max()) >= self.config.num_classes:
            raise ValueError(f"scene id {int(scene_ids.max())} but model.num_classes is {self.config.num_classes}")
        return F.cross_entropy(self.scene_logits(embeddings[known]), scene_ids[known])

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        scene_ids = batch["scene_ids"]
        image_ce = self._classification_loss(self.encode_images(batch), scene_ids)
        if self.config.caption_weight == 0:
            return {"total": image_ce, "image_ce": image_ce}
        caption_ce = self._classification_loss(self.encode_texts(batch), scene_ids)
        return {
            "total": image_ce + self.config.caption_weight * caption_ce,
            "image_ce": image_ce,
            "caption_ce": caption_ce,
        }

    @torch.no_grad()
    def validation_metrics(self, split, table) -> dict[str, float]:
        """Scene accuracy (%) of the split's images and captions, from the embeddings evaluation
        already encoded (`split.image_features`, `split.text_features`); unknown scenes skipped."""
        names = scene_index(table)
        image_scene = torch.tensor(
            [names.get(s, -1) if s is not None else -1 for s in image_scenes(table)], device=split.image_features.device
        )
        caption_scene = image_scene[split.caption_image.to(image_scene.device)]
        return {
            "accuracy": self._accuracy(split.image_features, image_scene),
            "caption_accuracy": self._accuracy(split.text_features, caption_scene),
        }

    def _accuracy(self, embeddings: torch.Tensor, scene_ids: torch.Tensor) -> float:
        known = (scene_ids >= 0) & (scene_ids < self.config.num_classes)
        if not bool(known.any()):
            return float("nan")
        predicted = self.scene_logits(embeddings[known]).argmax(dim=1)
        return 100.0 * float((predicted == scene_ids[known]).float().mean())


def backbone_state_dict(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The timm backbone's weights (running BatchNorm statistics included) out of a scene prior's
    state dict, keyed as `TimmBackbone.body` expects them."""
    state = {k[len(BACKBONE_PREFIX) :]: v for k, v in model_state.items() if k.startswith(BACKBONE_PREFIX)}
    if not state:
        raise ValueError(f"no {BACKBONE_PREFIX}* weights: not a scene prior's state dict")
    return state
