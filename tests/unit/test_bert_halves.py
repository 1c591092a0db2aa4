"""rsray.models.bert_halves: one BERT folder makes the text half and the fusion half; each fusion
layer starts from its checkpoint layer, the MLM head is tied, and fusion self-attention is
bidirectional with or without padding."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from rsray.models.bert_halves import BertHalves

CONFIG = dict(
    vocab_size=60,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**CONFIG))
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder)
    return folder, model


def test_each_fusion_layer_starts_from_its_checkpoint_layer_and_the_head_is_tied(bert_folder):
    folder, original = bert_folder
    halves = BertHalves(folder, image_width=48)
    assert len(halves.text_layers) == len(halves.fusion_layers) == 2  # paper: half and half
    for i, layer in enumerate(halves.fusion_layers):
        source = original.bert.encoder.layer[2 + i].state_dict()
        own = layer.state_dict()
        assert {k for k in own if k not in source} == {k for k in own if k.startswith("crossattention.")}
        assert all(torch.equal(own[k], v) for k, v in source.items()), i
    assert all(not hasattr(layer, "crossattention") for layer in halves.text_layers)
    decoder = halves.mlm_head.predictions.decoder.weight
    assert decoder.data_ptr() == halves.embeddings.word_embeddings.weight.data_ptr()
    assert isinstance(halves.image_to_text, torch.nn.Linear) and halves.image_to_text.in_features == 48


def test_the_text_half_is_the_checkpoints_first_layers(bert_folder):
    folder, original = bert_folder
    halves = BertHalves(folder).eval()
    ids = torch.tensor([[1, 5, 7, 9, 2, 0, 0], [1, 4, 2, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    bert = BertModel(BertConfig(**CONFIG), add_pooling_layer=False)
    bert.load_state_dict(original.bert.state_dict())
    expected = bert.eval()(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    got = halves.encode_text(ids, mask)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)


def test_fusion_self_attention_is_bidirectional_with_and_without_padding(bert_folder):
    halves = BertHalves(bert_folder[0]).eval()
    image = torch.randn(1, 5, 32)
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    full = torch.ones_like(ids)
    edited = ids.clone()
    edited[0, -2] = 11  # the last word: only a bidirectional CLS sees it

    def fused_cls(ids, mask):
        return halves.fuse(halves.encode_text(ids, mask), mask, image)[:, 0]

    with torch.no_grad():
        assert not torch.allclose(fused_cls(ids, full), fused_cls(edited, full), atol=1e-4)  # unpadded batch
        padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
        torch.testing.assert_close(fused_cls(padded, (padded != 0).long()), fused_cls(ids, full), atol=1e-5, rtol=1e-5)
        # and the image matters: cross-attention reaches it
        assert not torch.allclose(
            halves.fuse(halves.encode_text(ids, full), full, image + 1)[:, 0], fused_cls(ids, full)
        )


def test_a_folder_missing_encoder_weights_is_refused_by_key(bert_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = bert_folder
    for name in ("config.json",):
        (tmp_path / name).write_text((folder / name).read_text())
    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if ".layer.3." not in k}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"weights missing \(first: bert.encoder.layer.3."):
        BertHalves(tmp_path)
    with pytest.raises(ValueError, match=r"fusion_layers must be in \[1, 3\]"):
        BertHalves(config=CONFIG, fusion_layers=4)


def test_bert_base_halves_count_the_published_parameters():
    with torch.device("meta"):
        halves = BertHalves(config={})  # BertConfig's defaults: BERT-base
    count = sum(p.numel() for p in halves.parameters())  # a tied tensor counts once
    h, v, layers = 768, 30522, 12
    embeddings = v * h + 512 * h + 2 * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * 3072 + 3072) + (3072 * h + h) + 2 * h
    cross = 4 * (h * h + h) + 2 * h  # q, k, v, output dense + its LayerNorm
    head = h * h + h + 2 * h + v  # transform dense + LayerNorm + the decoder's bias (weight tied)
    assert count == embeddings + layers * layer + 6 * cross + head
    assert round((embeddings + layers * layer) / 1e6, 2) == 108.89 and round(cross / 1e6, 2) == 2.36
