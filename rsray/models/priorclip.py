"""PriorCLIP, closed domain (PIR, ACM MM 2023; PriorCLIP 2024), from the paper and the authors' release.

Image: Swin-T (timm) -> final feature map as tokens [pooled, 7x7 patches] (50 at 224 px) ->
  linear to D. Instruction: a frozen scene-classification CNN (the `scene_prior` stage's
  backbone) -> pooled -> linear to D. Spatial-PAE: belief = softmax over tokens of
  token . instruction; `belief: hard` keeps the `filter_size` most believed tokens (PIR), `soft`
  keeps all, each scaled by belief + 1/sqrt(rank) (PriorCLIP); then `instru_num` rounds of
  self-attention followed by cross-attention whose query is a per-round linear map of the
  instruction. Embedding: L2norm(token 0 before the rounds + linear(token 0 after them)).
Text: a BERT-family transformer (local folder, or built from `text_config`) -> linear to D ->
  Temporal-PAE: `cycle_num` rounds of self-attention then cross-attention whose queries are a
  linear map of the previous round's tokens, padding masked throughout (the release attends to
  padding; we pass the mask). Embedding: L2norm(CLS + linear(CLS after the rounds)).
Loss: multi-positive symmetric InfoNCE (learnable temperature) + lambda_cs * affiliation loss
  (scene centres, its own learnable temperature), on embeddings gathered across Ray Train
  workers (`gather_across_workers`: contrastive losses want every worker's negatives; the
  triplet models stay per-worker).

PIR's release (jaychempan/PIR; `conf/model/priorclip-release.yaml`, docs/fidelity.md) differs in:
hard belief (`belief`), a LayerNorm inside every PAE feed-forward (`pae_ffn_norm`), per-sample
affiliation centres computed per GPU with a transposed text->image term (`affiliation_centres`,
`affiliation_local_centres`, `affiliation_t2i_transposed`), the frozen prior's BatchNorm in train
mode (`instruction_bn`), narrower AdamW decay exemptions (`decay_exempt: pir`), BLIP's
RandomAugment (`augment.rand_augment_impl`), no gradient clipping (`train.grad_clip: 0`), 1/W of
the whole batch's gradient (its AllGather's backward keeps only the local slice:
`gather_gradient`), the belief ranking only the first 50 Swin tokens (`ranked_tokens`; the same
at 224 px) and a random frozen prior: its ResNet-50 file is loaded with strict=False into an
nn.Sequential whose keys (0.*, 1.*, 4.*-7.*) match none of a ResNet's (conv1.*, layer1.*, ...),
so no tensor loads (`instruction_checkpoint: null` with `instruction_init: torchvision`). Not
reproduced: BERT without an attention mask, temperatures as unclamped, weight-decayed divisors
(ours: clamped log-scales), checkpoint selection on the test split.

The instruction encoder's weights come from a scene-prior checkpoint folder
(`instruction_checkpoint`, loaded with weights_only=True), or are trained first by the same
command when it says `train` (see `rsray train --help`); null leaves a random frozen CNN (tests,
and the release preset, which reproduces the release's random prior). Open-domain PriorCLIP
(stage 2 on a CLIP dual encoder) is `rsray.models.priorclip_open`.
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
from rsray.distributed import gather_no_grad, gather_with_grad, rank, world_size
from rsray.losses import LogitScale, affiliation_loss, info_nce_loss, local_info_nce_loss, row_centres
from rsray.models.base import Batch, RetrievalModel, full_precision_scores
from rsray.models.clip import fit_positions
from rsray.models.encoders import FrozenParts, TimmBackbone, TransformerTextEncoder, check_text_config, length_mask
from rsray.models.pae import SpatialPAE, TemporalPAE
from rsray.models.registry import register_model
from rsray.models.scene_prior import backbone_state_dict, priorclip_augment
from rsray.models.stages import check_stage_checkpoint, read_stage_checkpoint
from rsray.optim import WarmupAdamWConfig
from rsray.weights import resolve

GATHER_GRADIENTS = ("whole_batch", "mean_over_workers")


@dataclass
class PriorClipLossConfig(WarmupAdamWConfig):
    """The loss switches the closed and open-domain configs share: InfoNCE + lambda_cs * affiliation."""

    affiliation_temperature: float = 0.07  # tau2, learnable (unless shared_logit_scale)
    lambda_cs: float = 1.0
    # affiliation centres: class (the paper's scene centres; ours) | sample (both releases: one per
    # row, the row's own as target); PIR's text->image term is transposed (a bug: true)
    affiliation_centres: str = "class"
    # sample centres from each worker's own rows, then gathered (both releases), instead of from
    # every worker's rows (ours: a scene's centre is the same on every worker)
    affiliation_local_centres: bool = False
    affiliation_t2i_transposed: bool = False
    # InfoNCE positives: image (every caption of the row's image; ours and PIR's) | pair (only the
    # row's own caption; open_clip's, as PIR-CLIP's release trains)
    contrastive_positives: str = "image"
    gather_across_workers: bool = True  # InfoNCE and affiliation over every worker's batch
    # the gradient the gathered loss gives each worker: whole_batch (ours: the whole batch's, as
    # open_clip's local loss) | mean_over_workers (both releases: they gather without a gradient
    # path to the other workers' rows, so after DDP's average each worker holds 1/W of it)
    gather_gradient: str = "whole_batch"

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        if self.affiliation_temperature <= 0:
            yield "affiliation_temperature", f"must be positive, got {self.affiliation_temperature}"
        if self.lambda_cs < 0:
            yield "lambda_cs", f"must not be negative, got {self.lambda_cs}"
        if self.affiliation_centres not in ("class", "sample"):
            yield "affiliation_centres", f"must be class or sample, got {self.affiliation_centres!r}"
        if self.affiliation_t2i_transposed and self.affiliation_centres != "sample":
            yield "affiliation_t2i_transposed", "reproduces the release's term over per-sample centres: needs sample"
        if self.affiliation_local_centres and self.affiliation_centres != "sample":
            yield "affiliation_local_centres", "the releases' per-worker centres are per-sample ones: needs sample"
        if self.contrastive_positives not in ("image", "pair"):
            yield "contrastive_positives", f"must be image or pair, got {self.contrastive_positives!r}"
        if self.gather_gradient not in GATHER_GRADIENTS:
            yield "gather_gradient", f"must be one of {', '.join(GATHER_GRADIENTS)}, got {self.gather_gradient!r}"

    def loss_switches(self) -> dict[str, Any]:
        """The keyword arguments `contrastive_and_affiliation` takes from this config."""
        return {
            "gather": self.gather_across_workers,
            "lambda_cs": self.lambda_cs,
            "centres": self.affiliation_centres,
            "local_centres": self.affiliation_local_centres,
            "transposed_t2i": self.affiliation_t2i_transposed,
            "positives": self.contrastive_positives,
            "gather_gradient": self.gather_gradient,
        }


@dataclass
class PriorClipConfig(PriorClipLossConfig):
    """Every closed-domain PriorCLIP setting; defaults are the paper's. Optimizer fields are read
    by the training loop."""

    # files read only for the initial weights: a saved state replaces them (`build_for_loading`)
    initial_weights: ClassVar[tuple[str, ...]] = ("backbone_checkpoint", "instruction_checkpoint")

    # `rsray train` trains model.instruction_stage first when instruction_checkpoint is "train"
    earlier_stages: ClassVar[dict[str, str]] = {"instruction_checkpoint": "instruction_stage"}

    augment: AugmentConfig = field(default_factory=priorclip_augment)
    embed_dim: int = 512
    # vision
    backbone: str = "swin_tiny_patch4_window7_224"  # a timm model whose forward_features is a map
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    backbone_checkpoint: str | None = None  # weights (timm or the Swin release; file or Hub name); null = random
    freeze_backbone: bool = False  # the paper fine-tunes Swin-T
    # instruction (Spatial-PAE)
    instruction_backbone: str = "resnet50"  # must be the scene prior's backbone
    instruction_checkpoint: str | None = None  # scene-prior checkpoint folder | "train" | null (random, tests)
    instruction_stage: str = "model/scene_prior"  # the config trained first when instruction_checkpoint: train
    # a random prior's initialisation (instruction_checkpoint: null): timm (its ResNets zero each
    # block's last BatchNorm) | torchvision (kaiming fan-out, every BatchNorm 1/0: what PIR's release
    # trains with, since its checkpoint loads 0 of 318 tensors into its nn.Sequential)
    instruction_init: str = "timm"
    belief: str = "soft"  # soft (PriorCLIP) | hard (PIR: keep the filter_size most believed tokens)
    filter_size: int = 40
    # the Swin tokens the belief ranks: null = all of them (ours) | N = the first N (PIR: 50, the
    # pooled token and 49 patches of Swin-T at 224 px; more tokens at larger sizes are dropped)
    ranked_tokens: int | None = None
    instru_num: int = 2
    # the frozen scene prior's BatchNorm: eval = its running statistics (ours; the paper is silent) |
    # train = batch statistics, running ones updated (PIR's release only turns off requires_grad)
    instruction_bn: str = "eval"
    # text (Temporal-PAE)
    text_input: str = "input_ids"  # input_ids (data.tokenizer) | tokens (word vocabulary + a [CLS] id; ours)
    text_checkpoint: str | None = None  # local BERT-family folder (or alias, e.g. minilm)
    # transformers config fields, used only when text_checkpoint is null (model_type defaults to bert);
    # with text_input: tokens the vocabulary size comes from the data's word vocabulary
    text_config: dict[str, Any] = field(default_factory=dict)
    max_text_tokens: int = 47
    cycle_num: int = 3
    # attention rounds of both PAEs
    heads: int = 8
    ffn_dim: int = 1024
    dropout: float = 0.2
    pae_ffn_norm: bool = False  # paper: not said (ours: Linear-GELU-Linear); release: LayerNorm after the first Linear
    # loss (the affiliation switches: PriorClipLossConfig)
    temperature: float = 0.07  # InfoNCE, learnable
    lr: float = 6.0e-5  # AdamW with warm-up (rsray.optim)

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        yield from check_pae(self)
        if not timm.is_model(self.backbone):
            yield "backbone", f"not a timm model name: {self.backbone!r}"
        if self.text_input not in ("input_ids", "tokens"):
            yield "text_input", f"must be input_ids or tokens, got {self.text_input!r}"
        if self.text_checkpoint and self.text_input != "input_ids":
            yield "text_input", "a text_checkpoint reads input_ids from its own tokenizer (set data.tokenizer)"
        if not self.text_checkpoint and self.text_input == "input_ids" and "vocab_size" not in self.text_config:
            yield "text_config", "a text transformer built for input_ids needs the tokenizer's vocab_size"
        yield from check_text_config(self.text_config)
        if self.max_text_tokens < 2:
            yield "max_text_tokens", f"must be at least 2 ([CLS] and a word), got {self.max_text_tokens}"
        if self.cycle_num < 0:
            yield "cycle_num", f"must not be negative, got {self.cycle_num}"
        if self.instruction_bn not in ("eval", "train"):
            yield "instruction_bn", f"must be eval or train, got {self.instruction_bn!r}"
        if self.instruction_init not in ("timm", "torchvision"):
            yield "instruction_init", f"must be timm or torchvision, got {self.instruction_init!r}"
        if self.instruction_init == "torchvision" and self.instruction_checkpoint is not None:
            yield "instruction_init", "initialises a random prior: needs instruction_checkpoint: null"
        if self.instruction_init == "torchvision" and not _is_timm_resnet(self.instruction_backbone):
            yield "instruction_init", f"torchvision's init is a ResNet's; {self.instruction_backbone!r} is not one"
        if self.ranked_tokens is not None and self.ranked_tokens < 1:
            yield "ranked_tokens", f"must be positive or null, got {self.ranked_tokens}"
        if self.ranked_tokens is not None and self.belief == "hard" and self.filter_size > self.ranked_tokens:
            yield "filter_size", f"keeps {self.filter_size} of only {self.ranked_tokens} ranked tokens"


def _is_timm_resnet(name: str) -> bool:
    """A model of timm's resnet module (the one whose blocks take `zero_init_last`)."""
    from timm.models import model_entrypoint

    return timm.is_model(name) and model_entrypoint(name).__module__ == "timm.models.resnet"


def check_pae(cfg) -> Iterator[tuple[str, str]]:
    """Checks for the Spatial-PAE and attention fields the closed and open-domain configs share."""
    if cfg.embed_dim < 1:
        yield "embed_dim", f"must be positive, got {cfg.embed_dim}"
    if not timm.is_model(cfg.instruction_backbone):
        yield "instruction_backbone", f"not a timm model name: {cfg.instruction_backbone!r}"
    yield from check_stage_checkpoint("instruction_checkpoint", cfg.instruction_checkpoint)
    if cfg.belief not in ("soft", "hard"):
        yield "belief", f"must be soft or hard, got {cfg.belief!r}"
    if cfg.filter_size < 1:
        yield "filter_size", f"must be positive, got {cfg.filter_size}"
    if cfg.instru_num < 0:
        yield "instru_num", f"must not be negative, got {cfg.instru_num}"
    if cfg.heads < 1 or cfg.embed_dim % cfg.heads:
        yield "heads", f"must divide embed_dim ({cfg.embed_dim}), got {cfg.heads}"
    if cfg.ffn_dim < 1:
        yield "ffn_dim", f"must be positive, got {cfg.ffn_dim}"
    if not 0.0 <= cfg.dropout < 1.0:
        yield "dropout", f"must be in [0, 1), got {cfg.dropout}"
    if cfg.temperature <= 0:
        yield "temperature", f"must be positive, got {cfg.temperature}"


def load_instruction_backbone(uri: str, backbone: str, key: str = "instruction_checkpoint") -> dict[str, torch.Tensor]:
    """The backbone weights of the scene-prior checkpoint folder `uri`, checked to be a `backbone`."""
    state, config = read_stage_checkpoint(uri, key)
    model = config.get("model", {})
    if model.get("name") != "scene_prior":
        raise ValueError(f"model.{key}: {uri} holds a {model.get('name')!r} model, not a scene_prior")
    if model.get("backbone") != backbone:
        raise ValueError(
            f"model.instruction_backbone: {backbone!r}, but the scene prior at {uri} is a {model.get('backbone')!r}"
        )
    return backbone_state_dict(state["model"])


# ----------------------------------------------------------------------------- encoders


class SwinTokens(FrozenParts, nn.Module):
    """A timm model's final feature map (normalised, as its head would see it) as tokens:
    [mean of the map, then every position] -> [B, 1 + h*w, C] (Swin-T at 224 px: 1 + 7x7 = 50).

    `checkpoint`: a weights file given to timm (state dict, or the original Swin release's
    layout, which timm's filter converts), local or a Hub name in the cache (`rsray.weights`); the
    classifier is dropped. `freeze` as TimmBackbone."""

    def __init__(
        self, name: str, kwargs: dict[str, Any] | None = None, checkpoint: str | None = None, freeze: bool = False
    ):
        super().__init__()
        create = dict(kwargs or {}, num_classes=0)
        if checkpoint:
            weights = resolve(checkpoint, want_file=True).path
            create.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
        try:
            self.model = timm.create_model(name, **create)
        except TypeError as exc:
            raise ValueError(f"model.backbone_kwargs: {name} does not accept them: {exc}") from None
        self.width: int = self.model.num_features
        self.channels_last = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        self.frozen = freeze
        if freeze:
            self.freeze_part("model")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            features = self.model.forward_features(images)
        if features.dim() != 4:
            raise ValueError(
                f"model.backbone: {type(self.model).__name__}.forward_features gives "
                f"{features.dim()}-d output; PriorCLIP needs a feature map"
            )
        patches = features.flatten(1, 2) if self.channels_last else features.flatten(2).transpose(1, 2)
        return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)


class InstructionEncoder(nn.Module):
    """The frozen scene-prior CNN -> global average pool -> trainable linear to `dim` (the instruction)."""

    def __init__(
        self,
        backbone: str,
        checkpoint: str | None,
        dim: int,
        key: str = "instruction_checkpoint",
        bn: str = "eval",
        init: str = "timm",
    ):
        super().__init__()
        model_kwargs = {"zero_init_last": False} if init == "torchvision" else None
        self.backbone = TimmBackbone(backbone, out_indices=(-1,), freeze=True, frozen_bn=bn, model_kwargs=model_kwargs)
        if checkpoint:
            self.backbone.body.load_state_dict(load_instruction_backbone(checkpoint, backbone, key))
        self.proj = nn.Linear(self.backbone.channels[-1], dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (features,) = self.backbone(images)
        return self.proj(features.mean(dim=(2, 3)))


def text_inputs(
    batch: Batch, text_input: str, max_tokens: int, cls_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) of a batch's captions, at most `max_tokens` long.

    input_ids: the BERT-family tokenizer's ids; a longer caption keeps its first max_tokens - 1
    ids and its final [SEP]. tokens: the word ids with `cls_id` prepended as position 0 (our
    choice: a word-vocabulary transformer then has a [CLS] to pool, as BERT does)."""
    if text_input == "tokens":
        tokens = batch["tokens"][:, : max_tokens - 1]
        lengths = batch["lengths"].clamp(max=max_tokens - 1)
        ids = torch.cat([torch.full_like(tokens[:, :1], cls_id), tokens], dim=1)
        return ids, length_mask(lengths + 1, ids.shape[1]).long()
    if "input_ids" not in batch:
        raise ValueError(
            "model.text_input is input_ids but the batch has none: set data.tokenizer to the text "
            "checkpoint's tokenizer folder and prepare again (or model.text_input=tokens)"
        )
    return fit_positions(batch["input_ids"], batch["attention_mask"], max_tokens)


# ----------------------------------------------------------------------------- the model


def contrastive_and_affiliation(
    images: torch.Tensor,
    texts: torch.Tensor,
    batch: Batch,
    logit_scale: torch.Tensor,
    affiliation_scale: torch.Tensor,
    gather: bool,
    lambda_cs: float,
    centres: str = "class",
    transposed_t2i: bool = False,
    local_centres: bool = False,
    positives: str = "image",
    gather_gradient: str = "whole_batch",
) -> dict[str, torch.Tensor]:
    """PriorCLIP's loss on L2-normalised embeddings: InfoNCE + lambda_cs * affiliation, both over
    every worker's rows when `gather` (InfoNCE as open_clip's local loss: this worker's rows
    against all, the same gradients as the whole matrix). The switches are PriorClipLossConfig's
    (`loss_switches`). The affiliation term is computed even at lambda_cs = 0, so every parameter
    stays in the graph (DistributedDataParallel needs that) and the term is still reported.
    `gather_gradient: mean_over_workers` divides the gathered total's gradient (not its value) by
    the number of workers, which is what the releases' gradient-free gathers leave after DDP."""
    image_ids, scene_ids = batch.get("image_ids") if positives == "image" else None, batch["scene_ids"]
    if gather and world_size() > 1:  # InfoNCE: this worker's rows against all; affiliation: all rows
        if image_ids is None:
            image_ids = torch.arange(images.shape[0], device=images.device) + rank() * images.shape[0]
        all_images, all_texts = gather_with_grad(images), gather_with_grad(texts)
        all_ids, all_scenes = gather_no_grad(image_ids), gather_no_grad(scene_ids)
        contrastive = local_info_nce_loss(
            images, texts, image_ids, all_images, all_texts, all_ids, logit_scale, full_precision_scores
        )
        given = None
        if local_centres:  # the releases: each worker's own rows make its rows' centres
            given = (
                gather_with_grad(row_centres(images, scene_ids)),
                gather_with_grad(row_centres(texts, scene_ids)),
            )
        affiliation = affiliation_loss(
            all_images, all_texts, all_scenes, affiliation_scale, centres, transposed_t2i, given
        )
        total = contrastive + lambda_cs * affiliation
        if gather_gradient == "mean_over_workers":
            total = scale_gradient(total, 1.0 / world_size())
        return {"total": total, "info_nce": contrastive, "affiliation": affiliation}
    else:
        contrastive = info_nce_loss(full_precision_scores(images, texts), logit_scale, image_ids)
        affiliation = affiliation_loss(images, texts, scene_ids, affiliation_scale, centres, transposed_t2i)
    return {"total": contrastive + lambda_cs * affiliation, "info_nce": contrastive, "affiliation": affiliation}


def scale_gradient(value: torch.Tensor, factor: float) -> torch.Tensor:
    """`value` unchanged, its gradient times `factor` (value + 0: the same number to the last bit)."""
    return value.detach() + (value - value.detach()) * factor


@register_model("priorclip", PriorClipConfig)
class PriorCLIP(RetrievalModel):
    """Closed-domain PriorCLIP: Swin-T + Spatial-PAE under a frozen scene prior, BERT + Temporal-PAE."""

    two_tower = True

    def __init__(self, config: PriorClipConfig, vocab_size: int | None = None, vocab: Sequence[str] | None = None):
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.visual = SwinTokens(
            config.backbone, config.backbone_kwargs, config.backbone_checkpoint, config.freeze_backbone
        )
        self.vision_proj = nn.Linear(self.visual.width, d)
        self.instruction = InstructionEncoder(
            config.instruction_backbone,
            config.instruction_checkpoint,
            d,
            bn=config.instruction_bn,
            init=config.instruction_init,
        )
        self.spatial_pae = SpatialPAE(
            d,
            config.instru_num,
            config.heads,
            config.ffn_dim,
            config.dropout,
            config.belief,
            config.filter_size,
            config.pae_ffn_norm,
        )
        text_config = dict(config.text_config)
        self.cls_id = None
        if config.text_input == "tokens":
            if vocab_size is None:
                raise ValueError(
                    "text_input: tokens needs vocab_size (the word vocabulary) to size the text transformer"
                )
            self.cls_id = vocab_size  # one id past the word vocabulary
            text_config.update(vocab_size=vocab_size + 1, pad_token_id=0)
        self.text = TransformerTextEncoder(config.text_checkpoint, None if config.text_checkpoint else text_config)
        self.text_proj = nn.Linear(self.text.width, d)
        self.temporal_pae = TemporalPAE(
            d, config.cycle_num, config.heads, config.ffn_dim, config.dropout, config.pae_ffn_norm
        )
        self.logit_scale = LogitScale(config.temperature)
        self.affiliation_scale = LogitScale(config.affiliation_temperature)

    def encode_images(self, batch: Batch) -> torch.Tensor:
        images = batch["images"]
        tokens = self.vision_proj(self.visual(images))
        if self.config.ranked_tokens is not None:
            tokens = tokens[:, : self.config.ranked_tokens]
        return F.normalize(self.spatial_pae(tokens, self.instruction(images)), dim=-1)

    def encode_texts(self, batch: Batch) -> torch.Tensor:
        ids, mask = text_inputs(batch, self.config.text_input, self.config.max_text_tokens, self.cls_id)
        tokens, valid = self.text(ids, mask)
        return F.normalize(self.temporal_pae(self.text_proj(tokens), valid), dim=-1)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        return contrastive_and_affiliation(
            self.encode_images(batch),
            self.encode_texts(batch),
            batch,
            self.logit_scale(),
            self.affiliation_scale(),
            **self.config.loss_switches(),
        )
