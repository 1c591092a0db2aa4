"""Encoders the models share: a timm image backbone, word embeddings (GloVe file optional), a BiGRU,
a BERT-family text transformer.

Nothing here downloads: pretrained image weights come from a local checkpoint file, word
vectors from a local GloVe-format text file, text transformers from a local folder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rsray.losses import at_least_fp32
from rsray.weights import resolve

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- frozen parts


class FrozenParts:
    """Mixin for an nn.Module with pretrained parts that are not trained: `freeze_part(name)` stops
    the part's gradients and keeps it in eval mode through every later `.train()`, so BatchNorm
    keeps its running statistics and dropout stays off."""

    def freeze_part(self, name: str) -> None:
        part = self.get_submodule(name)
        for p in part.parameters():
            p.requires_grad_(False)
        part.eval()
        self.__dict__.setdefault("_frozen_parts", []).append(name)

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.__dict__.get("_frozen_parts", ()):
            self.get_submodule(name).eval()
        return self


# ----------------------------------------------------------------------------- image backbone


class TimmBackbone(FrozenParts, nn.Module):
    """A timm model as a feature extractor returning the maps at `out_indices` (timm's numbering).

    For ResNets, index 0 is the stem (`act1`, stride 2, before the max-pool) and 1..4 are
    layer1..layer4 (strides 4..32). With `pool_stem=True` index 0 is instead taken after the
    network's own max-pool, i.e. exactly the map layer1 receives (stride 4): timm's feature
    wrapper keeps the `maxpool` module, and it has no parameters, so applying it to the stem map
    is the same computation the backbone does next. Backbones without a max-pool refuse it.

    `freeze=True`: no parameter is trained and the backbone runs without autograd; with
    `frozen_bn="eval"` it stays in eval mode (BatchNorm uses its running statistics whatever
    `model.train()` says); with "train" it follows `model.train()`, so BatchNorm normalises with
    the batch's statistics and updates its running ones (the SWAN and PIR releases).
    `checkpoint`: the full model's weights (`torch.save(model.state_dict())`, or a dict holding it
    under `state_dict` / `model`, or .safetensors), a local file or a Hub name such as
    `hf-hub:timm/resnet50.a1_in1k` (`rsray.weights`: read from the cache); the classifier is dropped,
    every other weight must be present. `model_kwargs` go to `timm.create_model` as they are.
    """

    def __init__(
        self,
        name: str,
        out_indices: Sequence[int] = (4,),
        freeze: bool = False,
        checkpoint: str | Path | None = None,
        pool_stem: bool = False,
        frozen_bn: str = "eval",
        model_kwargs: dict | None = None,
    ):
        super().__init__()
        if frozen_bn not in ("eval", "train"):
            raise ValueError(f"frozen_bn must be eval or train, got {frozen_bn!r}")
        self.name, self.frozen, self.pool_stem = name, freeze, pool_stem
        self.out_indices = tuple(out_indices)
        kwargs = dict(features_only=True, out_indices=self.out_indices, **(model_kwargs or {}))
        if checkpoint is not None:
            state = load_backbone_state_dict(name, resolve(checkpoint, want_file=True).path)
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(state_dict=state))
        self.body = timm.create_model(name, **kwargs)
        info = self.body.feature_info
        self.channels: list[int] = list(info.channels())
        self.reductions: list[int] = list(info.reduction())
        if pool_stem:
            if 0 not in self.out_indices:
                raise ValueError("pool_stem=True needs feature index 0 (the stem) in out_indices")
            maxpool = getattr(self.body, "maxpool", None)
            if maxpool is None or isinstance(maxpool, nn.Identity):
                raise ValueError(f"backbone {name!r} has no stem max-pool: pool_stem needs a ResNet-style stem")
            self.reductions[self.out_indices.index(0)] *= 2  # the max-pool halves the stem map
        if freeze and frozen_bn == "eval":
            self.freeze_part("body")
        elif freeze:
            self.body.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            features = list(self.body(images))
            if self.pool_stem:
                i = self.out_indices.index(0)
                features[i] = self.body.maxpool(features[i])
        return features


def load_backbone_state_dict(name: str, path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of timm model `name` from a local file, checked against the model's own keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    state = timm.models.load_state_dict(str(path), weights_only=True)  # unwraps state_dict/model, strips module.
    with torch.device("meta"):  # the key list only: no memory, no init cost
        reference = timm.create_model(name)
    classifier = reference.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    needed = [
        k
        for k in reference.state_dict()
        if not k.endswith("num_batches_tracked") and not any(k.startswith(c + ".") for c in classifier)
    ]
    missing = [k for k in needed if k not in state]
    if missing:
        found = ", ".join(list(state)[:3])
        raise ValueError(
            f"backbone checkpoint {path}: {len(missing)} of {len(needed)} {name} weights missing "
            f"(first: {missing[0]}); the file's keys start: {found}"
        )
    return {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifier)}


# ----------------------------------------------------------------------------- text


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, max_len] bool, True at valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, L, D] over positions where mask [B, L] is True (at least one per row)."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def last_valid(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x [B, L, D] at position lengths - 1 of each row."""
    return x[torch.arange(x.shape[0], device=x.device), lengths.to(x.device) - 1]


class WordEmbedding(nn.Embedding):
    """Word vectors with <pad> (id 0) fixed at zero; random init U(-0.1, 0.1) (`init="uniform"`,
    VSE++'s) or N(0, 1) (`"normal"`, torch's default, which the SWAN release keeps for words
    GloVe lacks), or GloVe when loaded."""

    def __init__(self, vocab_size: int, dim: int, init: str = "uniform"):
        super().__init__(vocab_size, dim, padding_idx=0)
        if init == "uniform":
            nn.init.uniform_(self.weight, -0.1, 0.1)
        elif init == "normal":
            nn.init.normal_(self.weight, 0.0, 1.0)
        else:
            raise ValueError(f"word init must be uniform or normal, got {init!r}")
        with torch.no_grad():
            self.weight[0].zero_()

    def load_vectors(self, path: str | Path, itos: Sequence[str]) -> int:
        """Copy vectors from a GloVe-format text file (`word v1 ... vD` per line) for the words
        in `itos` (id -> word, the model's vocabulary); other words keep their random init.
        Returns how many vocabulary words were found."""
        if itos is None:
            raise ValueError(f"loading word vectors from {path} needs the vocabulary (id -> word)")
        if len(itos) != self.num_embeddings:
            raise ValueError(f"vocabulary has {len(itos)} words, the embedding {self.num_embeddings}")
        vectors = read_word_vectors(path, itos, self.embedding_dim)
        with torch.no_grad():
            for i, vector in vectors.items():
                if i != self.padding_idx:
                    self.weight[i] = vector
        log.info("word vectors: %d of %d vocabulary words found in %s", len(vectors), len(itos), path)
        return len(vectors)


def read_word_vectors(path: str | Path, itos: Sequence[str], dim: int) -> dict[int, torch.Tensor]:
    """{word id: vector} for the vocabulary words present in a GloVe-format file.

    Only lines whose word is in the vocabulary are parsed (GloVe 840B has 2.2M lines). A word may
    itself contain spaces (840B has a few), so the vector is the last `dim` fields of the line;
    the first occurrence of a word wins.
    """
    stoi = {w: i for i, w in enumerate(itos)}
    found: dict[int, torch.Tensor] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            word, _, rest = line.partition(" ")
            fields = rest.split()
            if len(fields) != dim:  # a word with spaces, or a wrong-sized file
                parts = line.rstrip("\n").rsplit(" ", dim)
                word, fields = parts[0], parts[1:]
                if len(fields) != dim:
                    raise ValueError(f"{path}:{line_no}: expected a word and {dim} numbers")
            i = stoi.get(word)
            if i is not None and i not in found:
                try:
                    found[i] = torch.tensor([float(v) for v in fields])
                except ValueError:
                    raise ValueError(f"{path}:{line_no}: expected a word and {dim} numbers") from None
    return found


class BiGRU(nn.Module):
    """1-layer bidirectional GRU over padded word vectors, run on packed sequences.

    `merge="mean"` returns one [B, L, H] sequence, the two directions averaged (SWAN, VSE++);
    `merge="separate"` returns (forward, backward), each [B, L, H] (DOVE's DTGA gates them).
    Positions past a row's length are zero.

    The GRU runs in fp32 outside any autocast (our choice, `train.amp`): CUDA autocast sends cuDNN's
    RNN to fp16 whatever dtype was asked for, bf16 included, and no GradScaler guards that fp16.
    Its output is fp32; the layers after it autocast as usual.
    """

    def __init__(self, input_dim: int, hidden: int, merge: str = "mean"):
        super().__init__()
        if merge not in ("mean", "separate"):
            raise ValueError(f"merge must be mean or separate, got {merge!r}")
        self.merge, self.hidden = merge, hidden
        self.rnn = nn.GRU(input_dim, hidden, num_layers=1, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        """`lengths` on the host (`rsray.models.base.lengths_on_host`): packing reads them there, and
        a device copy would make each step wait for the GPU to catch up."""
        packed = pack_padded_sequence(at_least_fp32(x), lengths.cpu(), batch_first=True, enforce_sorted=False)
        with torch.autocast(x.device.type, enabled=False):
            out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        forward, backward = out[..., : self.hidden], out[..., self.hidden :]
        if self.merge == "separate":
            return forward, backward
        return (forward + backward) / 2


# ----------------------------------------------------------------------------- BERT-family text transformer


class TransformerTextEncoder(FrozenParts, nn.Module):
    """A BERT-family text transformer (`transformers` AutoModel) returning every token's features.

    Weights come from a local folder (`checkpoint`: the save_pretrained layout, or an alias of
    `rsray.pretrained` such as `minilm`; nothing downloads), or the model is built with
    random weights from `config`, a dict of config fields whose `model_type` defaults to "bert"
    (how tiny test presets get a text transformer without any file). Models that pool on top
    (PriorCLIP takes position 0 and its own attention rounds, a CLIP-style tower may mean-pool)
    share this class and differ only in what they do with the tokens.

    The transformer's own pooler (BERT's next-sentence head input) is dropped: it is never used,
    and unused parameters would stall DistributedDataParallel. `freeze=True`: no parameter
    trains, the model stays in eval mode (no dropout) and runs without autograd.

    forward(input_ids [B, L], attention_mask [B, L]) -> (tokens [B, L, width], valid [B, L] bool).
    """

    def __init__(self, checkpoint: str | Path | None = None, config: dict | None = None, freeze: bool = False):
        super().__init__()
        from transformers import AutoConfig, AutoModel  # slow import: only for models that need it

        if checkpoint and config:
            raise ValueError("give a text checkpoint folder or a text config, not both")
        if checkpoint:
            self.model = AutoModel.from_pretrained(
                str(resolve(checkpoint).path), local_files_only=True, dtype=torch.float32
            )
        else:
            fields = dict(config or {})
            model_type = fields.pop("model_type", "bert")
            self.model = AutoModel.from_config(AutoConfig.for_model(model_type, **fields))
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None
        model_config = self.model.config
        self.width: int = model_config.hidden_size
        self.vocab_size: int = model_config.vocab_size
        self.max_positions: int | None = getattr(model_config, "max_position_embeddings", None)
        self.frozen = freeze
        if freeze:
            self.freeze_part("model")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.max_positions is not None and input_ids.shape[1] > self.max_positions:
            raise ValueError(
                f"captions of {input_ids.shape[1]} ids exceed the text transformer's "
                f"{self.max_positions} positions: truncate them first"
            )
        top = int(input_ids.max()) if input_ids.numel() else 0
        if top >= self.vocab_size:
            raise ValueError(
                f"caption id {top} is outside the text transformer's {self.vocab_size}-entry "
                "vocabulary: data.tokenizer must be the tokenizer of the text checkpoint"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            tokens = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return tokens, attention_mask.bool()


def check_text_config(fields: dict, key: str = "text_config") -> Iterator[tuple[str, str]]:
    """(key, problem) for names a transformers config of `fields["model_type"]` (default bert) does
    not define: transformers accepts unknown keywords silently, so a typo would go unnoticed."""
    if not fields:
        return
    from transformers import AutoConfig

    model_type = fields.get("model_type", "bert")
    try:
        known = set(AutoConfig.for_model(model_type).to_dict())
    except ValueError:
        yield f"{key}.model_type", f"not a transformers model type: {model_type!r}"
        return
    for name in sorted(set(fields) - known - {"model_type"}):
        yield f"{key}.{name}", f"not a {model_type} config field"
