"""One BERT split in two, as CMPAGL's paper says: "the text encoder and multi-modal encoder share a
single BERT model, with the first half (N0/2 layers) ... text encoder and the latter half (N0/2
layers) ... multi-modal encoder" (ALBEF's layout).

- **Text half**: BERT's embeddings and its first N - F layers, unchanged.
- **Fusion half**: F layers that add cross-attention to the image tokens, each initialised from
  checkpoint layer N - F + i (self-attention, feed-forward and norms); only the cross-attention is
  new. Their self-attention is bidirectional whatever the padding: transformers 5.x builds a layer
  with cross-attention as a decoder (`is_decoder=True`), and under SDPA an unpadded batch then
  gets no mask and a causal kernel, so the CLS token would not see the caption after it (measured
  with transformers 5.23; `is_causal` is switched off here and a test edits the last token).
- **MLM head**: `BertForMaskedLM`'s, its decoder tied to the word embeddings (one tensor).
- Image tokens of another width pass through `image_to_text` (a Linear; Identity at equal widths)
  before the cross-attention, whose keys and values take the text width.

Weights come from a local `BertForMaskedLM` folder (save_pretrained layout; a plain BERT folder
works too: only the MLM head's `cls.*` weights may be missing) or from a config (random init).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn


class BertHalves(nn.Module):
    """`encode_text` (text half), `fuse` (fusion half over image tokens), `mlm_logits`."""

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        config: dict[str, Any] | None = None,
        fusion_layers: int | None = None,
        image_width: int | None = None,
    ):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertLayer

        mlm = load_masked_lm(checkpoint, config)
        self.config = mlm.config
        n = self.config.num_hidden_layers
        fusion = n // 2 if fusion_layers is None else fusion_layers  # paper: the latter half
        if not 1 <= fusion <= n - 1:
            raise ValueError(f"fusion_layers must be in [1, {n - 1}] for a {n}-layer BERT, got {fusion}")
        layers = mlm.bert.encoder.layer
        self.embeddings = mlm.bert.embeddings
        self.text_layers = nn.ModuleList(layers[: n - fusion])
        fusion_config = copy.deepcopy(self.config)
        fusion_config.is_decoder, fusion_config.add_cross_attention = True, True  # BertLayer's condition
        self.fusion_layers = nn.ModuleList()
        for i in range(fusion):
            layer = BertLayer(fusion_config, layer_idx=i)
            result = layer.load_state_dict(layers[n - fusion + i].state_dict(), strict=False)
            new = [k for k in result.missing_keys if not k.startswith("crossattention.")]
            if new or result.unexpected_keys:
                raise RuntimeError(
                    f"fusion layer {i}: keys differ from BERT layer {n - fusion + i}: {new or result.unexpected_keys}"
                )
            layer.attention.self.is_causal = False  # bidirectional (see the module docstring)
            self.fusion_layers.append(layer)
        self.mlm_head = mlm.cls
        width = self.config.hidden_size
        self.image_to_text = nn.Identity() if image_width in (None, width) else nn.Linear(image_width, width)
        self.width = width

    def _self_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(self.config, hidden, attention_mask)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, modules: tuple[nn.Module, nn.Module] | None = None
    ) -> torch.Tensor:
        """[B, L, W] hidden states of the text half (CLS first); `modules` = (embeddings, layers)
        runs copies of them instead (the momentum encoder's)."""
        embeddings, layers = modules or (self.embeddings, self.text_layers)
        hidden = embeddings(input_ids=input_ids)
        mask = self._self_mask(hidden, attention_mask)
        for layer in layers:
            hidden = layer(hidden, mask)
        return hidden

    def fuse(self, text: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, W]: the text half's states after the fusion half, attending to `image_tokens`
        [B, T, W_img] (all valid)."""
        image = self.image_to_text(image_tokens)
        mask = self._self_mask(text, attention_mask)
        hidden = text
        for layer in self.fusion_layers:
            hidden = layer(hidden, mask, encoder_hidden_states=image)
        return hidden

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of fused states (the head's decoder is the word embedding matrix)."""
        return self.mlm_head(hidden)


def load_masked_lm(checkpoint: str | Path | None, config: dict[str, Any] | None):
    """A `BertForMaskedLM` from a local folder (every encoder weight must be there; the MLM head's
    own may be missing: a plain BERT folder) or built from `config` (BertConfig fields)."""
    from transformers import BertConfig, BertForMaskedLM

    if checkpoint is None:
        return BertForMaskedLM(BertConfig(**(config or {}), attn_implementation="sdpa"))
    folder = Path(checkpoint)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"BERT folder {folder}: no config.json (a save_pretrained folder is needed)")
    model, info = BertForMaskedLM.from_pretrained(
        str(folder), local_files_only=True, output_loading_info=True, attn_implementation="sdpa"
    )
    missing = [k for k in info["missing_keys"] if not k.startswith("cls.")]
    if missing:
        raise ValueError(f"BERT folder {folder}: {len(missing)} weights missing (first: {missing[0]})")
    return model
