"""CMPAGL (arXiv 2411.14704): Gswin image encoder, one BERT split into text and fusion halves,
pre-alignment by ITC with a momentum encoder plus the optimized triplet loss, fusion trained by ITM
and MLM, and retrieval in stages (ITC for all pairs, ITM re-scoring of each query's top k, SMR).

What comes from where (cmpagl.md; the paper gives only its abstract and figure captions):
- paper: Gswin = Swin with local window self-attention and global-local window cross-attention
  (`rsray.models.gswin`); "the text encoder and multi-modal encoder share a single BERT model",
  half and half (`rsray.models.bert_halves`); ITC with a momentum encoder; a triplet loss with
  "the ultimate narrowing of the distance between matching image-text pairs" (`lambda_intra` x
  mean of 1 - cos over matched pairs); ITM and MLM for fusion; SMR after re-ranking.
- ALBEF (the layout the paper's sentence describes): 256-d projections of the CLS tokens,
  temperature 0.07 learnable, momentum 0.995, multi-positive targets over a feature queue,
  momentum distillation alpha 0.4 (ramped over `distill_warmup_steps`), ITM negatives drawn from
  softmax(online . momentum / temperature) in each direction (`itm_negatives: sample`; `hardest`
  takes the most similar, our fallback), MLM 15% with BERT's 80/10/10, AdamW.
- our choice: the global window (pooled to the stage window) with its block's stochastic depth
  (drop path; the paper is silent), queue 8192 with image-id-aware positives, triplet averaged
  per batch (hardest negative; `triplet_reduction: sum` is VSE++'s sum), `lambda_intra` 0.1 (1.0 collapsed the
  embeddings, see the field), every loss weight 1, MLM without distillation, ITM re-scoring only
  the top `itm_topk` and keeping ITC order below them.

Features: `encode_images` returns (ITC embedding, image tokens), `encode_texts` (ITC embedding,
text-half states, mask); `score` is the ITC dot product (block-safe); `pair_scores` is ITM's
log-odds for aligned rows, used by the re-scoring stage. `two_tower` is False because evaluation
needs the tokens, not only the embeddings.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rsray.data.augment import AugmentConfig
from rsray.losses import (
    LogitScale,
    intra_class_loss,
    mask_tokens,
    queue_itc_loss,
    sample_hard_negatives,
    triplet_loss,
)
from rsray.models.base import Batch, RetrievalModel, full_precision_scores
from rsray.models.bert_halves import BertHalves
from rsray.models.encoders import check_text_config
from rsray.models.gswin import Gswin
from rsray.models.momentum import FeatureQueue, MomentumCopy
from rsray.models.priorclip import text_inputs
from rsray.models.registry import register_model
from rsray.optim import WarmupAdamWConfig
from rsray.weights import resolve


def cmpagl_augment() -> AugmentConfig:
    """ALBEF's fine-tuning pipeline at Swin-T's 224 px: random resized crop 0.5-1, horizontal flip."""
    return AugmentConfig(
        train_resize=224, crop=224, rotation=0.0, random_resized_crop=[0.5, 1.0], hflip=True, eval_resize=224
    )


@dataclass
class CmpaglConfig(WarmupAdamWConfig):
    """Every CMPAGL setting; values the paper does not give are ALBEF's or ours (module docstring)."""

    # files read only for the initial weights: a saved state replaces them (`build_for_loading`)
    initial_weights: ClassVar[tuple[str, ...]] = ("backbone_checkpoint",)

    augment: AugmentConfig = field(default_factory=cmpagl_augment)
    embed_dim: int = 256  # ITC projection (ALBEF)
    backbone: str = "swin_tiny_patch4_window7_224"
    backbone_checkpoint: str | None = None  # the Swin's weights (file or Hub name, rsray.weights); null = random
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # timm Swin sizes (the tiny preset)
    global_stages: list[int] = field(default_factory=lambda: [0, 1, 2])  # stages with the global window
    global_window: int | None = None  # global window side; null = the stage's window size
    text_input: str = "input_ids"  # input_ids (data.tokenizer = the BERT's) | tokens (word vocabulary)
    text_checkpoint: str | None = None  # local BertForMaskedLM / BERT folder; null = built from text_config
    text_config: dict[str, Any] = field(default_factory=dict)  # BertConfig fields ({} = BERT-base)
    fusion_layers: int | None = None  # null = half of the BERT's layers (paper)
    # special ids of the tokenizer (bert-base-uncased's); with text_input: tokens, CLS = V, MASK = V + 1
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103
    pad_token_id: int = 0
    max_text_tokens: int = 40
    temperature: float = 0.07
    learn_temperature: bool = True
    momentum: float = 0.995
    queue_size: int = 8192
    distill_alpha: float = 0.4
    distill_warmup_steps: int = 1000
    margin: float = 0.2
    max_violation: bool = True
    triplet_reduction: str = "mean"  # mean over the batch's queries | sum (VSE++'s): the spec's switch
    # our choice, measured: at 1.0 the intra pull (mean 1 - cos over matched pairs) outweighs the
    # batch-averaged hinge and every embedding collapsed to one point on the tiny preset (hinge stuck
    # at 2 x margin); at 0.1 the hinge reached 0 in 30 steps. Sweep it (conf/sweep/cmpagl-losses.yaml).
    lambda_intra: float = 0.1
    w_itc: float = 1.0
    w_triplet: float = 1.0
    w_itm: float = 1.0
    w_mlm: float = 1.0
    mlm_probability: float = 0.15
    itm_negatives: str = "sample"  # sample: from softmax(ITC logits) [ALBEF] | hardest: the most similar
    itm_topk: int = 16  # ITM re-scores each query's top k by ITC
    itm_batch: int = 256  # pairs per ITM forward when re-scoring
    itm_in_validation: bool = False  # validation is ITC only (ITM is slow on CPU); true adds ITM stages
    lr: float = 6.0e-5
    weight_decay: float = 0.02
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    @property
    def w_intra(self) -> float:
        """The intra term's weight in the total: it is part of the optimized triplet loss."""
        return self.w_triplet * self.lambda_intra

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        if self.text_input not in ("input_ids", "tokens"):
            yield "text_input", f"must be input_ids or tokens, got {self.text_input!r}"
        if self.text_checkpoint and self.text_input != "input_ids":
            yield "text_checkpoint", "needs text_input: input_ids (its tokenizer's ids, via data.tokenizer)"
        if not 0.0 <= self.momentum < 1.0:
            yield "momentum", f"must be in [0, 1), got {self.momentum}"
        if not 0.0 <= self.distill_alpha <= 1.0:
            yield "distill_alpha", f"must be in [0, 1], got {self.distill_alpha}"
        if not 0.0 < self.mlm_probability < 1.0:
            yield "mlm_probability", f"must be in (0, 1), got {self.mlm_probability}"
        if self.triplet_reduction not in ("mean", "sum"):
            yield "triplet_reduction", f"must be mean or sum, got {self.triplet_reduction!r}"
        if self.itm_negatives not in ("sample", "hardest"):
            yield "itm_negatives", f"must be sample or hardest, got {self.itm_negatives!r}"
        for name in ("embed_dim", "queue_size", "max_text_tokens", "itm_topk", "itm_batch"):
            if getattr(self, name) < 1:
                yield name, f"must be positive, got {getattr(self, name)}"
        for name in ("w_itc", "w_triplet", "w_itm", "w_mlm", "lambda_intra", "margin"):
            if getattr(self, name) < 0:
                yield name, f"must be >= 0, got {getattr(self, name)}"
        if self.text_checkpoint and self.text_config:
            yield "text_config", "a text_checkpoint brings its own BertConfig: text_config must be empty"
        yield from check_text_config(self.text_config)


class ImageFeatures(NamedTuple):
    embedding: torch.Tensor  # [N, D] L2-normalised ITC embedding
    tokens: torch.Tensor  # [N, T, W_img] Gswin tokens (mean first) for the fusion half


class TextFeatures(NamedTuple):
    embedding: torch.Tensor  # [M, D]
    hidden: torch.Tensor  # [M, L, W] text-half states (CLS first)
    mask: torch.Tensor  # [M, L] attention mask


@register_model("cmpagl", CmpaglConfig)
class Cmpagl(RetrievalModel):
    """CMPAGL: Gswin + split BERT; ITC (momentum, queue) + triplet + intra + ITM + MLM."""

    two_tower = False
    ddp_kwargs = {"broadcast_buffers": False}  # the queue is identical on every worker: never resent

    def __init__(self, config: CmpaglConfig, vocab_size: int | None = None, vocab: Sequence[str] | None = None):
        super().__init__()
        self.config = config
        self.visual = Gswin(
            config.backbone,
            config.backbone_checkpoint,
            config.global_stages,
            config.global_window,
            **config.backbone_kwargs,
        )
        text_config = dict(config.text_config)
        self.special = (config.cls_token_id, config.sep_token_id, config.pad_token_id, config.mask_token_id)
        if config.text_input == "tokens":  # word ids 0..V-1 (0 = <pad>), then CLS = V and MASK = V + 1
            if vocab_size is None:
                raise ValueError("text_input: tokens needs vocab_size (the word vocabulary)")
            text_config.update(vocab_size=vocab_size + 2, pad_token_id=0)
            self.special = (vocab_size, -1, 0, vocab_size + 1)
        checkpoint = resolve(config.text_checkpoint).path if config.text_checkpoint else None
        self.bert = BertHalves(checkpoint, text_config, config.fusion_layers, self.visual.width)
        self.vision_proj = nn.Linear(self.visual.width, config.embed_dim)
        self.text_proj = nn.Linear(self.bert.width, config.embed_dim)
        self.itm_head = nn.Linear(self.bert.width, 2)
        self.logit_scale = LogitScale(config.temperature, learnable=config.learn_temperature)
        self.momentum = MomentumCopy(self._online(), config.momentum)
        self.queue = FeatureQueue(config.queue_size, config.embed_dim)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._steps: int | None = None  # `step` mirrored on the host: reading the buffer each step syncs a GPU

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._steps = None  # a loaded `step` (a resumed run) is read once, at the next step

    def steps_taken(self) -> int:
        """Losses taken so far, from the host's count (the buffer is read once, after a load)."""
        if self._steps is None:
            self._steps = int(self.step)
        return self._steps

    def _online(self) -> dict[str, nn.Module]:
        """The modules the momentum encoder copies: the image side and the text half."""
        return {
            "visual": self.visual,
            "vision_proj": self.vision_proj,
            "embeddings": self.bert.embeddings,
            "text_layers": self.bert.text_layers,
            "text_proj": self.text_proj,
        }

    # -- inputs and features

    def text_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask) of at most `max_text_tokens`, as PriorCLIP's BERT reads them: the
        tokenizer's input_ids (a longer caption keeps its [SEP]), or word tokens behind a CLS id."""
        return text_inputs(batch, self.config.text_input, self.config.max_text_tokens, self.special[0])

    def encode_images(self, batch: Batch) -> ImageFeatures:
        tokens = self.visual(batch["images"])
        return ImageFeatures(F.normalize(self.vision_proj(tokens[:, 0]), dim=-1), tokens)

    def encode_texts(self, batch: Batch) -> TextFeatures:
        ids, mask = self.text_inputs(batch)
        hidden = self.bert.encode_text(ids, mask)
        return TextFeatures(F.normalize(self.text_proj(hidden[:, 0]), dim=-1), hidden, mask)

    def score(self, image_features: ImageFeatures, text_features: TextFeatures) -> torch.Tensor:
        """ITC similarity of every image and caption (fp32)."""
        return full_precision_scores(image_features.embedding, text_features.embedding)

    def itm_logits(self, image_tokens: torch.Tensor, text: TextFeatures | tuple) -> torch.Tensor:
        """[n, 2] ITM logits (no match, match) of aligned rows: image i with caption i."""
        fused = self.bert.fuse(text[1], text[2], image_tokens)
        return self.itm_head(fused[:, 0])

    def pair_scores(self, image_features: ImageFeatures, text_features: TextFeatures) -> torch.Tensor:
        """ITM log-odds z_match - z_no_match of aligned rows (the re-scoring stage's score); the
        captions are cut to the longest one here (padding at the end changes nothing)."""
        longest = max(int(text_features.mask.sum(1).max()), 1)
        text = (None, text_features.hidden[:, :longest], text_features.mask[:, :longest])
        logits = self.itm_logits(image_features.tokens, text).float()
        return logits[:, 1] - logits[:, 0]

    def validation_rescore(self) -> tuple[int, int] | None:
        """With `itm_in_validation`, (top k, pairs per forward) of the ITM stage that validation
        adds as `itm_*` numbers (`rsray.eval.split.rescore_metrics`); None keeps validation ITC only."""
        if not self.config.itm_in_validation:
            return None
        return self.config.itm_topk, self.config.itm_batch

    # -- training

    def distill_alpha(self) -> float:
        """ALBEF's alpha, ramped linearly from 0 over the first `distill_warmup_steps` steps."""
        c = self.config
        if c.distill_warmup_steps <= 0:
            return c.distill_alpha
        return c.distill_alpha * min(1.0, self.steps_taken() / c.distill_warmup_steps)

    @torch.no_grad()
    def _momentum_embeddings(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
        copies = self.momentum.copies
        tokens = copies["visual"](images)
        image = F.normalize(copies["vision_proj"](tokens[:, 0]), dim=-1)
        hidden = self.bert.encode_text(ids, mask, modules=(copies["embeddings"], copies["text_layers"]))
        return image, F.normalize(copies["text_proj"](hidden[:, 0]), dim=-1)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        c = self.config
        image_ids = batch["image_ids"]
        ids, mask = self.text_inputs(batch)
        self.momentum.update(self._online())  # ALBEF: the teacher moves first, then encodes
        image = self.encode_images(batch)
        text_hidden = self.bert.encode_text(ids, mask)
        text = TextFeatures(F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1), text_hidden, mask)
        momentum_image, momentum_text = self._momentum_embeddings(batch["images"], ids, mask)
        temperature = 1.0 / self.logit_scale()
        itc = queue_itc_loss(
            image.embedding,
            text.embedding,
            momentum_image,
            momentum_text,
            image_ids,
            self.queue.contents(),
            temperature,
            self.distill_alpha(),
        )
        sims = full_precision_scores(image.embedding, text.embedding)
        batch_size = sims.shape[0]
        triplet = triplet_loss(sims, image_ids, c.margin, c.max_violation)
        if c.triplet_reduction == "mean":
            triplet = triplet / batch_size
        intra = intra_class_loss(image.embedding, text.embedding)
        # ALBEF's ITM negatives: drawn from softmax(online . momentum / temperature), each direction
        itm_i2t = full_precision_scores(image.embedding, momentum_text) / temperature
        itm_t2i = full_precision_scores(text.embedding, momentum_image) / temperature
        itm = self._itm_loss(image, text, itm_i2t, itm_t2i, image_ids)
        mlm = self._mlm_loss(ids, mask, image.tokens)
        self.queue.enqueue(momentum_image, momentum_text, image_ids)
        self._steps = self.steps_taken() + 1
        self.step += 1
        total = c.w_itc * itc + c.w_triplet * triplet + c.w_intra * intra + c.w_itm * itm + c.w_mlm * mlm
        return {"total": total, "itc": itc, "triplet": triplet, "intra": intra, "itm": itm, "mlm": mlm}

    def _itm_loss(
        self,
        image: ImageFeatures,
        text: TextFeatures,
        i2t: torch.Tensor,
        t2i: torch.Tensor,
        image_ids: torch.Tensor,
    ):
        """Cross-entropy of ITM on the batch's pairs (match) and one hard negative per image and
        per caption (no match) among other images' rows: drawn from the softmax of the ITC logits
        `i2t` [images, texts] and `t2i` [texts, images] (`itm_negatives: sample`, ALBEF), or the
        most similar one (`hardest`)."""
        device, hardest = i2t.device, self.config.itm_negatives == "hardest"
        negative_text, image_rows = sample_hard_negatives(i2t, image_ids, hardest=hardest)
        negative_image, text_rows = sample_hard_negatives(t2i, image_ids, hardest=hardest)
        image_rows, text_rows = image_rows.nonzero().squeeze(1), text_rows.nonzero().squeeze(1)
        tokens = torch.cat([image.tokens, image.tokens[image_rows], image.tokens[negative_image[text_rows]]])
        pick = torch.cat([torch.arange(len(image_ids), device=device), negative_text[image_rows], text_rows])
        logits = self.itm_logits(tokens, (None, text.hidden[pick], text.mask[pick]))
        labels = torch.zeros(len(pick), dtype=torch.long, device=device)
        labels[: len(image_ids)] = 1
        return F.cross_entropy(logits.float(), labels)

    def _mlm_loss(self, ids: torch.Tensor, mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Masked tokens predicted from the fused states (text half -> fusion half -> tied head)."""
        cls, sep, pad, mask_id = self.special
        vocab = self.bert.config.vocab_size
        masked, labels = mask_tokens(ids, mask, (cls, sep, pad), mask_id, vocab, self.config.mlm_probability)
        fused = self.bert.fuse(self.bert.encode_text(masked, mask), mask, image_tokens)
        chosen = labels != -100
        if not chosen.any():  # an all-ignored cross-entropy is NaN; keep every parameter in the graph
            return 0.0 * self.bert.mlm_logits(fused[:, :1]).sum()
        return F.cross_entropy(self.bert.mlm_logits(fused[chosen]).float(), labels[chosen])
