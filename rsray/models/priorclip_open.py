"""PriorCLIP, open domain, stage 2: vision-instruction fine-tuning of a CLIP dual encoder.

Stage 1 is contrastive pre-training of a CLIP-style dual encoder: that is the `clip` model
(rsray.models.clip) trained by `rsray train` on any image-caption data. Stage 2 (this model)
starts from stage 1's checkpoint (`clip_checkpoint`, state.pt loaded with weights_only=True) and
fine-tunes on the target set:
  image: CLIP's vision transformer with the scene prior injected before its layers, as the
    authors' release does: patch + class embeddings -> pre-LayerNorm -> Spatial-PAE belief over
    the tokens (token . instruction; soft: scaled by belief + 1/sqrt(rank), hard: the
    `filter_size` most believed) -> the instruction prepended as a token -> the transformer
    layers -> post-LayerNorm of the pooled token -> CLIP's visual projection -> L2 norm.
    `pool: instruction` pools the prepended instruction token (the release); `cls` pools CLIP's
    class token (our alternative: it keeps stage 1's pooling, needs belief soft).
  instruction: the frozen scene-prior CNN (as closed-domain PriorCLIP) -> linear to the vision width.
  text: stage 1's text tower, frozen (eval mode, no autograd): captions keep stage 1's embeddings
    (our choice; `freeze_text: false` trains it, as the release does).
Loss: InfoNCE (stage 1's learnable temperature, carried on) + lambda_cs * affiliation (own
  learnable tau2, or CLIP's scale with `shared_logit_scale`), gathered across workers like the
  closed-domain model.

The authors' release (PIR-CLIP, read at jaychempan/PIR-CLIP's HEAD 9554baf and at 20bbe30 before
it; docs/release-facts.md) and `conf/model/priorclip_open-release.yaml`: belief `token_norm_index`
(HEAD's line; `token_norm` is 20bbe30's), random towers with exact GELU (`clip_checkpoint: null`,
`clip.activation: gelu`: its README trains with no --pretrained), `shared_logit_scale`, the
stored logit scale clamped in place to [0, ln 100] after each step (`logit_scale_clamp:
after_step`; ours clamps where it is used), 1/W of the whole batch's gradient (`gather_gradient:
mean_over_workers`; ours gives the whole batch's), per-sample affiliation centres from each
worker's rows (`affiliation_centres: sample`, `affiliation_local_centres`), single-positive
InfoNCE (`contrastive_positives: pair`), the text tower trained (`freeze_text: false`), AdamW
(0.9, 0.999) with weight decay 0.5 and a cosine schedule after 10000 warm-up steps, open_clip's
default augmentation. Not reproduced: its instruction CNN is CLIP's ModifiedResNet trained with
the rest (no scene-prior stage), ours the frozen scene prior.

`clip_checkpoint: null` builds stage 1 from the `clip` section instead (a ClipConfig, as in
model/clip.yaml): random towers from a CLIPConfig for tests, or `clip.checkpoint` = a local
CLIPModel folder to start stage 2 straight from public CLIP weights. `clip_checkpoint: train`
makes `rsray train` run stage 1 (`clip_stage`) first; `instruction_checkpoint: train` likewise
trains the scene prior first. With `text_input: tokens` in stage 1, stage 2 must use the same
prepared data (the same word vocabulary); with a tokenizer, any data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import timm
import torch
import torch.nn.functional as F

from rsray.config import config_from_dict
from rsray.data.augment import AugmentConfig
from rsray.losses import CLAMPS, LogitScale
from rsray.models.base import Batch, RetrievalModel
from rsray.models.clip import Clip, ClipConfig
from rsray.models.encoders import FrozenParts
from rsray.models.pae import belief_tokens
from rsray.models.priorclip import InstructionEncoder, PriorClipLossConfig, contrastive_and_affiliation
from rsray.models.registry import model_config, register_model
from rsray.models.scene_prior import priorclip_augment
from rsray.models.stages import check_stage_checkpoint, read_stage_checkpoint

BELIEFS = ("soft", "hard", "token_norm", "token_norm_index")


@dataclass
class PriorClipOpenConfig(PriorClipLossConfig):
    """Every stage-2 setting. Optimizer fields are read by the training loop."""

    # files read only for the initial weights: a saved state replaces them (`build_for_loading`)
    initial_weights: ClassVar[tuple[str, ...]] = ("instruction_checkpoint",)

    # `rsray train` trains these stages first (in this order) when their checkpoint key says "train"
    earlier_stages: ClassVar[dict[str, str]] = {
        "clip_checkpoint": "clip_stage",
        "instruction_checkpoint": "instruction_stage",
    }

    augment: AugmentConfig = field(default_factory=priorclip_augment)
    embed_dim: int = 512  # must equal stage 1's embedding size
    clip_checkpoint: str | None = None  # stage-1 `clip` checkpoint folder | train | null (build from `clip`)
    clip_stage: str = "model/clip"  # the config trained first when clip_checkpoint: train
    clip: ClipConfig = field(default_factory=ClipConfig)  # stage 1's model when clip_checkpoint is null
    freeze_backbone: bool = False  # true: CLIP's vision transformer stays as stage 1 left it
    instruction_backbone: str = "resnet50"  # must be the scene prior's backbone
    instruction_checkpoint: str | None = None  # scene-prior checkpoint folder | train | null (random, tests)
    instruction_stage: str = "model/scene_prior"
    # soft (the paper: belief + 1/sqrt(rank)) | hard (keep the filter_size most believed tokens) |
    # token_norm (the release at 20bbe30: tokens scaled by belief, each channel L2-normalised across
    # tokens) | token_norm_index (the release at its HEAD 9554baf: belief + 1/sqrt(1 + sorted index))
    belief: str = "soft"
    filter_size: int = 40
    pool: str = "instruction"  # instruction (the release) | cls (CLIP's class token; needs belief soft)
    freeze_text: bool = True  # ours: captions keep stage 1's embeddings; the release trains the text tower
    shared_logit_scale: bool = False  # the release: affiliation uses CLIP's logit scale, no tau2 of its own
    # forward (ours: each scale clamped at 100 where used) | after_step (the release, open_clip's:
    # the stored log scales clamped in place to [0, ln 100] after every optimizer step)
    logit_scale_clamp: str = "forward"
    lr: float = 1.0e-5  # our choice: stage 2 fine-tunes a pretrained CLIP, as the clip baseline does

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        yield from check_stage_checkpoint("clip_checkpoint", self.clip_checkpoint)
        yield from check_stage_checkpoint("instruction_checkpoint", self.instruction_checkpoint)
        if self.clip_checkpoint is None and self.clip.embed_dim != self.embed_dim:
            yield "embed_dim", f"must equal clip.embed_dim ({self.clip.embed_dim})"
        if not timm.is_model(self.instruction_backbone):
            yield "instruction_backbone", f"not a timm model name: {self.instruction_backbone!r}"
        if self.belief not in BELIEFS:
            yield "belief", f"must be one of {', '.join(BELIEFS)}, got {self.belief!r}"
        if self.filter_size < 1:
            yield "filter_size", f"must be positive, got {self.filter_size}"
        if self.pool not in ("instruction", "cls"):
            yield "pool", f"must be instruction or cls, got {self.pool!r}"
        if self.logit_scale_clamp not in CLAMPS:
            yield "logit_scale_clamp", f"must be one of {', '.join(CLAMPS)}, got {self.logit_scale_clamp!r}"
        if self.pool == "cls" and self.belief == "hard":
            yield "pool", "cls needs belief soft (hard filtering may drop the class token)"


def stage_one(config: PriorClipOpenConfig, vocab_size: int | None) -> Clip:
    """Stage 1's dual encoder: the `clip` model of `clip_checkpoint` with its trained weights, or
    built from the `clip` section when there is no checkpoint."""
    if not config.clip_checkpoint:
        return Clip(config.clip, vocab_size=vocab_size)
    state, saved = read_stage_checkpoint(config.clip_checkpoint, "clip_checkpoint")
    if saved.get("model", {}).get("name") != "clip":
        raise ValueError(
            f"model.clip_checkpoint: {config.clip_checkpoint} holds a "
            f"{saved.get('model', {}).get('name')!r} model, not a clip (stage 1)"
        )
    clip_config = model_config(config_from_dict(saved, source=f"{config.clip_checkpoint} config.yaml"))
    if clip_config.embed_dim != config.embed_dim:
        raise ValueError(f"model.embed_dim: {config.embed_dim}, but stage 1 embeds in {clip_config.embed_dim}")
    clip = Clip(clip_config, vocab_size=vocab_size)
    clip.load_state_dict(state["model"])
    return clip


@register_model("priorclip_open", PriorClipOpenConfig)
class PriorCLIPOpen(FrozenParts, RetrievalModel):
    """Stage 2: CLIP's vision transformer under a frozen scene prior; stage 1's text tower frozen
    (trained with `freeze_text: false`)."""

    two_tower = True

    def __init__(self, config: PriorClipOpenConfig, vocab_size: int | None = None, vocab: Sequence[str] | None = None):
        super().__init__()
        self.config = config
        self.clip = stage_one(config, vocab_size)
        frozen = (["clip.text"] if config.freeze_text else []) + (["clip.visual"] if config.freeze_backbone else [])
        for part in frozen:
            self.freeze_part(part)  # frozen: no gradient, and no dropout either
        vision = self.clip.visual.model
        self.instruction = InstructionEncoder(
            config.instruction_backbone, config.instruction_checkpoint, vision.config.hidden_size
        )
        # with a shared scale there is no tau2 parameter at all (DDP refuses parameters without gradients)
        self.affiliation_scale = (
            None
            if config.shared_logit_scale
            else LogitScale(config.affiliation_temperature, clamp=config.logit_scale_clamp)
        )
        self.clip.logit_scale.clamp = config.logit_scale_clamp  # stage 1's scale, now under stage 2's rule
        self.train()

    def encode_images(self, batch: Batch) -> torch.Tensor:
        images = batch["images"]
        vision = self.clip.visual.model  # transformers' CLIPVisionModel
        size = vision.config.image_size
        tokens = vision.embeddings(images, interpolate_pos_encoding=tuple(images.shape[-2:]) != (size, size))
        tokens = vision.pre_layrnorm(tokens)
        instruction = self.instruction(images)
        tokens = belief_tokens(tokens, instruction, self.config.belief, self.config.filter_size)
        hidden = vision.encoder(inputs_embeds=torch.cat([instruction.unsqueeze(1), tokens], dim=1)).last_hidden_state
        pooled = vision.post_layernorm(hidden[:, 0 if self.config.pool == "instruction" else 1])
        return F.normalize(self.clip.visual.projection(pooled), dim=-1)

    def encode_texts(self, batch: Batch) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_text):
            return self.clip.encode_texts(batch)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        logit_scale = self.clip.logit_scale()
        return contrastive_and_affiliation(
            self.encode_images(batch),
            self.encode_texts(batch),
            batch,
            logit_scale,
            logit_scale if self.affiliation_scale is None else self.affiliation_scale(),
            **self.config.loss_switches(),
        )
