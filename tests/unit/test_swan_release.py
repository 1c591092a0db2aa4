"""`model/swan-release`: every switch it sets does what the SWAN release does (docs/release-facts.md)."""

from __future__ import annotations

import pytest
import torch

from rsray.config import load_config
from rsray.losses import triplet_loss
from rsray.models import build_model, model_config
from rsray.models.encoders import TimmBackbone, WordEmbedding
from tests.unit.test_models import random_batch

SWITCHES = {
    "text_pool": "last",
    "max_violation": False,
    "mask_padding": False,
    "gsa_floor_divide": True,
    "triplet_negatives": "off_diagonal",
    "frozen_bn": "train",
    "word_init": "normal",
    "decay_epoch_offset": 1,
}


def tiny_release(*overrides: str):
    """The release preset at test size (model/swan-release-tiny: its switches over the tiny sizes)."""
    return load_config("model/swan-release-tiny", list(overrides))


def test_the_release_preset_sets_each_documented_difference():
    cfg = load_config("model/swan-release")
    typed = model_config(load_config("model/swan-release", ["model.allow_random_frozen_backbone=true"]))
    assert {key: getattr(typed, key) for key in SWITCHES} == SWITCHES
    assert (cfg.train.grad_clip, cfg.train.epochs, cfg.train.batch_size) == (0.0, 50, 100)
    paper = model_config(load_config("model/swan", ["model.allow_random_frozen_backbone=true"]))
    assert {key: getattr(paper, key) for key in SWITCHES} == {
        "text_pool": "mean",
        "max_violation": True,
        "mask_padding": True,
        "gsa_floor_divide": False,
        "triplet_negatives": "other_images",
        "frozen_bn": "eval",
        "word_init": "uniform",
        "decay_epoch_offset": 0,
    }


def test_the_release_preset_trains_a_step_at_test_size():
    """Its loss is the summed triplet over every off-diagonal pair; its floor-divided GSA scores
    leave the gate, query and key weights without gradient while the values learn."""
    from rsray.models.blocks import GatedSelfAttention

    torch.manual_seed(0)
    model = build_model(tiny_release(), vocab_size=40)
    batch = random_batch()
    with torch.no_grad():
        model.eval()
        scores = model.score(model.encode_images(batch), model.encode_texts(batch))
        torch.testing.assert_close(model.loss(batch)["total"], triplet_loss(scores, None, 0.2, False))
    model.train().loss(batch)["total"].backward()
    (gsa,) = [m for m in model.modules() if isinstance(m, GatedSelfAttention)]
    starved = [gsa.gate_q, gsa.gate_k, gsa.gate, gsa.q, gsa.k]
    assert all(p.grad is None or not p.grad.any() for layer in starved for p in layer.parameters())
    assert gsa.v.weight.grad.abs().max() > 0


def test_off_diagonal_negatives_count_the_same_images_other_captions():
    torch.manual_seed(1)
    batch = dict(random_batch(), image_ids=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    for negatives, ids in (("off_diagonal", None), ("other_images", batch["image_ids"])):
        torch.manual_seed(2)
        model = build_model(tiny_release(f"model.triplet_negatives={negatives}"), vocab_size=40).eval()
        with torch.no_grad():
            scores = model.score(model.encode_images(batch), model.encode_texts(batch))
            expected = triplet_loss(scores, ids, model.config.margin, model.config.max_violation)
            assert model.loss(batch)["total"].item() == pytest.approx(expected.item())


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_frozen_backbone_normalises_with_batch_statistics_only_in_train_mode(mode):
    torch.manual_seed(3)
    backbone = TimmBackbone("resnet10t", (4,), freeze=True, frozen_bn=mode).train()
    before = backbone.body.bn1.running_mean.clone()
    backbone(torch.randn(4, 3, 32, 32))
    moved = not torch.equal(backbone.body.bn1.running_mean, before)
    assert moved == (mode == "train") and backbone.body.training == (mode == "train")
    assert not any(p.requires_grad for p in backbone.parameters())


def test_word_init_normal_is_torchs_default_and_uniform_vse_s():
    torch.manual_seed(4)
    normal = WordEmbedding(2000, 50, "normal").weight[1:].detach()
    uniform = WordEmbedding(2000, 50, "uniform").weight[1:].detach()
    assert float(normal.std()) == pytest.approx(1.0, abs=0.02) and float(normal.mean()) == pytest.approx(0.0, abs=0.02)
    assert float(uniform.abs().max()) <= 0.1 and float(uniform.std()) == pytest.approx(0.1 / 3**0.5, rel=0.05)


def test_wsa_activation_is_relu_in_the_paper_config_and_gelu_in_the_release():
    for name, expected in (("swan-tiny", torch.nn.ReLU), ("swan-release-tiny", torch.nn.GELU)):
        torch.manual_seed(0)
        model = build_model(load_config(f"model/{name}"), vocab_size=30)
        assert isinstance(model.visual.sfgs.wsa.block.ffn[1], expected), name
