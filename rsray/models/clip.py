"""CLIP fine-tune: a `transformers` CLIP dual encoder trained with symmetric InfoNCE (RemoteCLIP-style).

Image: CLIP's vision transformer -> pooled CLS -> visual projection -> L2 norm.
Text: CLIP's causal text transformer pooled at the last attended token (see `ClipTextTower`) ->
text projection -> L2 norm; or, with `text_checkpoint`, a BERT-family encoder from a local folder
(mean-pooled or CLS) projected to the embedding size: that is how real pretrained text weights
(all-MiniLM-L6-v2, `rsray.pretrained`) enter on machines that cannot download.
Score: cosine. Loss: symmetric InfoNCE with a learnable temperature that starts at the checkpoint's
learned logit scale (`temperature: null`; a number overrides it); every in-batch caption of the
same image is a positive (open_clip: only the row's own caption). With `gather_across_workers`
each worker scores its own rows against every worker's (open_clip's local loss: the same
gradients as the whole matrix), so each query sees every worker's batch as negatives. AdamW skips
weight decay on biases, norms and the logit scale (open_clip's rule, `decay_exempt`). Unlike
open_clip's default, `train.grad_clip` clips at 2.0 unless set to 0 (docs/fidelity.md). Two
open_clip details are switches: the logit scale clamped where used (ours) or in place after each
step (`logit_scale_clamp: after_step`), and the towers' activation (`activation`: the
checkpoint's, quick_gelu as OpenAI's, or exact gelu as open_clip's own configs).

Weights come from a local CLIPModel folder (`checkpoint`, from_pretrained, nothing downloads) or
are initialised from a CLIPConfig written in the model config (`clip`), as the tiny preset does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rsray.data.augment import AugmentConfig
from rsray.data.text import PAD_ID
from rsray.losses import CLAMPS, LogitScale, gathered_info_nce_loss, info_nce_loss
from rsray.models.base import Batch, RetrievalModel
from rsray.models.encoders import TransformerTextEncoder, length_mask, masked_mean
from rsray.models.registry import register_model
from rsray.optim import WarmupAdamWConfig
from rsray.weights import resolve

ACTIVATIONS = ("quick_gelu", "gelu")  # transformers' names (ACT2FN), the towers' hidden_act


def clip_augment() -> AugmentConfig:
    """open_clip's fine-tuning pipeline at 224 px: random resized crop (scale 0.9-1, bicubic), CLIP
    mean/std; eval resizes to 224. Our choice of the RemoteCLIP-style recipe (no rotation, no flip)."""
    return AugmentConfig(
        train_resize=224,
        crop=224,
        rotation=0.0,
        random_resized_crop=[0.9, 1.0],
        eval_resize=224,
        normalize="clip",
        interpolation="bicubic",
    )


@dataclass
class ClipConfig(WarmupAdamWConfig):
    """Every CLIP fine-tune setting. The optimizer fields are data the training loop reads."""

    augment: AugmentConfig = field(default_factory=clip_augment)
    embed_dim: int = 512  # CLIP's projection_dim: the shared embedding size
    checkpoint: str | None = None  # local CLIPModel folder (save_pretrained layout); null = init from `clip`
    clip: dict[str, Any] = field(default_factory=dict)  # CLIPConfig fields (text_config, vision_config, ...)
    # where caption ids come from: input_ids (data.tokenizer, e.g. the checkpoint's CLIP tokenizer) or
    # tokens (the word vocabulary: our choice for training from scratch with no tokenizer at all)
    text_input: str = "input_ids"
    text_checkpoint: str | None = None  # BERT-family folder (or alias `minilm`) replacing CLIP's text tower
    text_pool: str = "mean"  # BERT-family tower: mean over attended tokens (sentence-transformers) | cls
    freeze_text: bool = (
        False  # keep the text_checkpoint's weights (LiT-style, the other way round); its projection trains
    )
    # initial temperature; null (default) = the CLIPModel's own logit scale: a pretrained checkpoint's
    # learned one (100 for OpenAI's CLIP), or CLIPConfig's init (1/0.07) when built from `clip`.
    # A fixed 0.07 would throw a checkpoint's scale away, and at fine-tuning learning rates it never
    # comes back (our choice, as open_clip's fine-tuning keeps it).
    temperature: float | None = None
    learn_temperature: bool = True
    # forward (ours: the scale clamped at 100 when used) | after_step (open_clip and PIR-CLIP's
    # release: the stored log scale clamped in place to [0, ln 100] after every optimizer step)
    logit_scale_clamp: str = "forward"
    # the towers' MLP activation: null keeps the checkpoint's (transformers' CLIPConfig default:
    # quick_gelu, OpenAI's) | quick_gelu | gelu (exact; open_clip's default, PIR-CLIP's release)
    activation: str | None = None
    gather_across_workers: bool = True  # InfoNCE over every worker's batch (open_clip); false = local batch
    # Our choice for fine-tuning a pretrained CLIP: open_clip's ViT settings (weight decay 0.2,
    # betas 0.9/0.98) with a small lr and 10% warm-up (rsray.optim).
    lr: float = 1.0e-5
    weight_decay: float = 0.2

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        if self.embed_dim < 1:
            yield "embed_dim", f"must be positive, got {self.embed_dim}"
        if self.text_input not in ("input_ids", "tokens"):
            yield "text_input", f"must be input_ids or tokens, got {self.text_input!r}"
        if self.checkpoint and self.clip:
            yield (
                "checkpoint",
                "a checkpoint brings its own CLIPConfig: model.clip must be empty (start from model/clip)",
            )
        if self.text_pool not in ("mean", "cls"):
            yield "text_pool", f"must be mean or cls, got {self.text_pool!r}"
        if self.freeze_text and not self.text_checkpoint:
            yield "freeze_text", "freezes a pretrained text_checkpoint; there is none"
        if self.text_checkpoint and self.text_input != "input_ids":
            yield "text_checkpoint", "needs text_input: input_ids (its own tokenizer's ids, via data.tokenizer)"
        if self.checkpoint and self.text_input == "tokens" and not self.text_checkpoint:
            yield "text_input", "a pretrained CLIP text tower needs its tokenizer's input_ids, not word tokens"
        if self.temperature is not None and self.temperature <= 0:
            yield "temperature", f"must be positive, got {self.temperature}"
        if self.logit_scale_clamp not in CLAMPS:
            yield "logit_scale_clamp", f"must be one of {', '.join(CLAMPS)}, got {self.logit_scale_clamp!r}"
        if self.activation not in (None, *ACTIVATIONS):
            yield "activation", f"must be null or one of {', '.join(ACTIVATIONS)}, got {self.activation!r}"
        for tower in ("text_config", "vision_config"):
            if self.activation and "hidden_act" in (self.clip.get(tower) or {}):
                yield f"clip.{tower}.hidden_act", "set model.activation instead (it sets both towers)"
        yield from _check_clip_fields(self.clip)


def _check_clip_fields(fields: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """transformers' configs accept any keyword silently; refuse names they do not define."""
    if not fields:
        return
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    if "projection_dim" in fields:
        yield "clip.projection_dim", "set model.embed_dim instead (it is CLIP's projection_dim)"
    known = set(CLIPConfig().to_dict()) - {"text_config", "vision_config", "projection_dim"}
    for key, value in fields.items():
        if key in ("text_config", "vision_config"):
            if not isinstance(value, dict):
                yield f"clip.{key}", f"expected a mapping, got {type(value).__name__}"
                continue
            sub_known = set((CLIPTextConfig if key == "text_config" else CLIPVisionConfig)().to_dict())
            for sub in sorted(set(value) - sub_known - {"projection_dim"}):
                yield f"clip.{key}.{sub}", f"not a {key} field (known: {', '.join(sorted(sub_known))})"
        elif key not in known and key != "projection_dim":
            yield f"clip.{key}", "not a CLIPConfig field (use text_config / vision_config for the towers)"


# ----------------------------------------------------------------------------- towers


def fit_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut right-padded ids to `max_len` positions; a row that was longer keeps its first
    max_len - 1 ids and its last one (the tokenizer's EOS / [SEP]), as the data loader does."""
    if input_ids.shape[1] <= max_len:
        return input_ids, attention_mask
    lengths = attention_mask.sum(dim=1)
    last_id = input_ids.gather(1, (lengths - 1).clamp(min=0)[:, None])
    ids, mask = input_ids[:, :max_len].clone(), attention_mask[:, :max_len].clone()
    too_long = lengths > max_len
    ids[too_long, -1] = last_id[too_long, 0]
    return ids, mask


class ClipVisionTower(nn.Module):
    """CLIP's vision transformer and projection; other input sizes interpolate the position grid."""

    def __init__(self, vision_model: nn.Module, projection: nn.Module):
        super().__init__()
        self.model, self.projection = vision_model, projection
        self.image_size = vision_model.config.image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        resized = tuple(images.shape[-2:]) != (self.image_size, self.image_size)
        out = self.model(pixel_values=images, interpolate_pos_encoding=resized)
        return self.projection(out.pooler_output)


class ClipTextTower(nn.Module):
    """CLIP's causal text transformer and projection, pooled at each row's last attended token.

    CLIP's own pooler takes the EOS position (the first `eos_token_id`, or the highest id for old
    configs); with a CLIP tokenizer and right padding that is exactly the last attended token, so
    both agree (tests/unit/test_clip.py checks it). Pooling by the mask also works for ids without
    an EOS (word tokens, other tokenizers): under the causal mask that token has seen the whole caption.
    """

    def __init__(self, text_model: nn.Module, projection: nn.Module):
        super().__init__()
        self.model, self.projection = text_model, projection
        self.vocab_size = text_model.config.vocab_size
        self.max_positions = text_model.config.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask = fit_positions(input_ids, attention_mask, self.max_positions)
        _check_vocabulary(input_ids, self.vocab_size)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = (attention_mask.sum(dim=1) - 1).clamp(min=0)
        return self.projection(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])


class BertTextTower(nn.Module):
    """A BERT-family encoder from a local folder (`TransformerTextEncoder`) pooled and projected to `embed_dim`.

    `pool="mean"` averages attended tokens (how sentence-transformers trained MiniLM); "cls" takes
    position 0. Projection without bias, as CLIP's own text projection."""

    def __init__(self, path: str, embed_dim: int, pool: str = "mean", freeze: bool = False):
        super().__init__()
        self.encoder = TransformerTextEncoder(checkpoint=path, freeze=freeze)
        self.pool = pool
        self.projection = nn.Linear(self.encoder.width, embed_dim, bias=False)

    @property
    def model(self) -> nn.Module:
        """The transformers model itself."""
        return self.encoder.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.encoder.max_positions is not None:
            input_ids, attention_mask = fit_positions(input_ids, attention_mask, self.encoder.max_positions)
        tokens, valid = self.encoder(input_ids, attention_mask)
        pooled = tokens[:, 0] if self.pool == "cls" else masked_mean(tokens, valid)
        return self.projection(pooled)


def _refuse_missing(info: dict, folder, ignore: tuple[str, ...] = ()) -> None:
    """transformers only warns about weights a folder lacks (they stay random): refuse instead."""
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith(ignore)]
    if missing:
        raise ValueError(
            f"{folder}: {len(missing)} weights missing (first: {sorted(missing)[0]}); "
            "is this the right kind of checkpoint?"
        )


def _check_vocabulary(input_ids: torch.Tensor, vocab_size: int) -> None:
    top = int(input_ids.max()) if input_ids.numel() else 0
    if top >= vocab_size:
        raise ValueError(
            f"caption id {top} is outside the text transformer's {vocab_size}-entry vocabulary: "
            "data.tokenizer must be the tokenizer of the text tower (model.checkpoint or text_checkpoint)"
        )


# ----------------------------------------------------------------------------- the model


def load_clip_model(config: ClipConfig, vocab_size: int | None = None):
    """The transformers CLIPModel: from the local `checkpoint` folder, or initialised from `clip`
    (with `text_input: tokens` the text vocabulary is the word vocabulary, `vocab_size`)."""
    from transformers import CLIPConfig, CLIPModel

    if config.checkpoint:
        folder = resolve(config.checkpoint).path
        saved = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
        if config.activation:
            saved.text_config.hidden_act = saved.vision_config.hidden_act = config.activation
        model, info = CLIPModel.from_pretrained(
            str(folder), config=saved, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
        _refuse_missing(info, folder)
        if model.config.projection_dim != config.embed_dim:
            raise ValueError(
                f"model.embed_dim: {config.embed_dim}, but checkpoint {config.checkpoint} "
                f"projects to {model.config.projection_dim}"
            )
        return model
    fields = {k: dict(v) if isinstance(v, dict) else v for k, v in config.clip.items()}
    fields["projection_dim"] = config.embed_dim
    if config.activation:
        for tower in ("text_config", "vision_config"):
            fields.setdefault(tower, {})["hidden_act"] = config.activation
    if config.text_input == "tokens":
        if vocab_size is None:
            raise ValueError("text_input: tokens needs vocab_size (the word vocabulary) to size the text tower")
        # word ids have no BOS/EOS; CLIP's own pooler (which we do not read) then looks for <pad>
        fields.setdefault("text_config", {}).update(
            vocab_size=vocab_size, bos_token_id=None, eos_token_id=PAD_ID, pad_token_id=PAD_ID
        )
    return CLIPModel(CLIPConfig(**fields))


@register_model("clip", ClipConfig)
class Clip(RetrievalModel):
    """CLIP dual encoder fine-tuned with multi-positive symmetric InfoNCE, gathered across workers."""

    two_tower = True

    def __init__(self, config: ClipConfig, vocab_size: int | None = None, vocab: Sequence[str] | None = None):
        super().__init__()
        self.config = config
        clip = load_clip_model(config, vocab_size)
        self.visual = ClipVisionTower(clip.vision_model, clip.visual_projection)
        if config.text_checkpoint:
            self.text = BertTextTower(config.text_checkpoint, config.embed_dim, config.text_pool, config.freeze_text)
        else:
            self.text = ClipTextTower(clip.text_model, clip.text_projection)
        temperature = (
            config.temperature if config.temperature is not None else 1.0 / float(clip.logit_scale.detach().exp())
        )
        self.logit_scale = LogitScale(temperature, learnable=config.learn_temperature, clamp=config.logit_scale_clamp)

    def encode_images(self, batch: Batch) -> torch.Tensor:
        return F.normalize(self.visual(batch["images"]), dim=-1)

    def encode_texts(self, batch: Batch) -> torch.Tensor:
        if self.config.text_input == "tokens":
            tokens = batch["tokens"]
            ids, mask = tokens, length_mask(batch["lengths"], tokens.shape[1]).long()
        else:
            if "input_ids" not in batch:
                raise ValueError(
                    "model.text_input is input_ids but the batch has none: set data.tokenizer to the "
                    "text tower's tokenizer folder and prepare again (or model.text_input=tokens)"
                )
            ids, mask = batch["input_ids"], batch["attention_mask"]
        return F.normalize(self.text(ids, mask), dim=-1)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        images, texts = self.encode_images(batch), self.encode_texts(batch)
        image_ids = batch.get("image_ids")
        if self.config.gather_across_workers:  # this worker's rows against every worker's batch
            contrastive = gathered_info_nce_loss(images, texts, self.logit_scale(), image_ids, self.score)
        else:
            contrastive = info_nce_loss(self.score(images, texts), self.logit_scale(), image_ids)
        return {"total": contrastive, "info_nce": contrastive}
