"""The scene prior: it trains on the sample's scene labels with the shared training core, reports its
accuracy and selects on it, sizes itself from the data, and its checkpoint becomes PriorCLIP's
frozen instruction encoder (weights equal, no gradients, BatchNorm statistics kept)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from rsray.checkpoint import CONFIG_FILE, STATE_FILE
from rsray.config import load_config
from rsray.data.loader import SCENES_KEY, make_train_loader
from rsray.data.prepare import prepare_in_process
from rsray.data.synthetic import SCENES, generate_sample
from rsray.eval.split import SplitScores, evaluate
from rsray.models import build_model, model_config
from rsray.optim import make_optimizer
from rsray.train.loop import selection_metric, train_epoch

VOCAB = 40


def tiny(name: str, *overrides: str):
    return load_config(f"model/{name}-tiny", list(overrides))


def with_scene_names(table: pa.Table) -> pa.Table:
    """What read_split attaches: the dataset's scene names, so ids agree across splits and batches."""
    return table.replace_schema_metadata({**(table.schema.metadata or {}), SCENES_KEY: json.dumps(sorted(SCENES))})


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    generate_sample(root, n_images=40, image_size=64, seed=0, progress=False)
    cfg = load_config("presets/cpu-tiny", [f"data.root={root}"])
    tables, vocab = prepare_in_process(cfg)
    return {split: with_scene_names(t) for split, t in tables.items()}, vocab


@pytest.fixture(scope="module")
def trained_prior(sample, tmp_path_factory):
    """The tiny scene prior after 2 epochs on the sample's training split, saved as `rsray train` does."""
    tables, vocab = sample
    cfg = tiny("scene_prior")
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=len(vocab))
    typed = model_config(cfg)
    loader = make_train_loader(tables["train"], typed.augment, batch_size=16, seed=0)
    optimizer, _ = make_optimizer(model, typed)
    before = evaluate(model, tables["train"], typed.augment)
    history = [train_epoch(model, loader, optimizer).losses for _ in range(2)]
    after = evaluate(model, tables["train"], typed.augment)
    folder = tmp_path_factory.mktemp("prior-checkpoint")
    torch.save({"model": model.state_dict(), "epoch": 1}, folder / STATE_FILE)
    cfg.save(folder / CONFIG_FILE)
    return model, folder, history, before, after


def test_prior_trains_on_scene_labels_and_reports_accuracy(trained_prior):
    _, _, history, before, after = trained_prior
    print("losses per epoch", history, "accuracy", before["accuracy"], "->", after["accuracy"])
    assert history[-1]["image_ce"] < 0.7 * history[0]["image_ce"]
    assert set(history[0]) == {"total", "image_ce", "caption_ce"}
    assert {"accuracy", "caption_accuracy", "mR", "i2t_R1"} <= set(after)  # classification and retrieval
    assert after["accuracy"] > before["accuracy"] and after["accuracy"] > 2 * 100 / len(SCENES)


def test_accuracy_counts_rows_whose_nearest_prototype_is_their_scene():
    torch.manual_seed(0)
    model = build_model(tiny("scene_prior"), vocab_size=VOCAB).eval()
    prototypes = torch.nn.functional.normalize(model.prototypes.detach(), dim=-1)
    table = pa.table({"scene": [SCENES[0], SCENES[3], SCENES[3], None]})  # the last image has no scene
    images = prototypes[torch.tensor([0, 3, 5, 1])]  # image 2 looks like scene 5, not its scene 3
    texts = prototypes[torch.tensor([0, 0, 3, 3, 3, 5, 1, 1])]  # two captions per image
    split = SplitScores(images @ texts.t(), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), None, images, texts)
    metrics = model.validation_metrics(split, with_scene_names(table))
    assert metrics["accuracy"] == pytest.approx(100 * 2 / 3)  # 3 images with a scene, 2 right
    assert metrics["caption_accuracy"] == pytest.approx(100 * 5 / 6)  # 6 captions with a scene; caption 5 wrong


def test_prior_selects_on_accuracy_and_sizes_itself_from_the_data():
    typed = model_config(load_config("model/scene_prior"))
    assert selection_metric(typed) == "val/accuracy" and typed.num_classes is None
    manifest = {"dataset": "x", "scenes": dict.fromkeys(SCENES, 5)}
    assert list(typed.check_data(manifest)) == [] and typed.from_data(manifest) == {"num_classes": len(SCENES)}
    assert [k for k, _ in typed.check_data({"dataset": "x", "scenes": {}})] == ["name"]
    small = model_config(load_config("model/scene_prior", ["model.num_classes=3"]))
    assert [k for k, _ in small.check_data(manifest)] == ["num_classes"] and small.from_data(manifest) == {}
    with pytest.raises(ValueError, match="model.num_classes: null is filled in"):
        build_model(load_config("model/scene_prior"), vocab_size=VOCAB)


def test_priorclip_loads_the_prior_frozen(trained_prior, sample):
    prior, folder, *_ = trained_prior
    prior.eval()
    _, vocab = sample
    torch.manual_seed(1)
    model = build_model(tiny("priorclip", f"model.instruction_checkpoint={folder}"), vocab_size=len(vocab)).train()
    backbone = model.instruction.backbone
    for key, value in prior.backbone.body.state_dict().items():  # weights and BatchNorm running statistics
        assert torch.equal(backbone.body.state_dict()[key], value), key
    assert not backbone.body.training and all(not p.requires_grad for p in backbone.parameters())

    g = torch.Generator().manual_seed(0)
    batch = {
        "images": torch.randn(4, 3, 64, 64, generator=g),
        "tokens": torch.randint(2, len(vocab), (4, 5), generator=g),
        "lengths": torch.tensor([5, 3, 2, 4]),
        "image_ids": torch.arange(4),
        "scene_ids": torch.tensor([0, 1, 1, 2]),
    }
    running_mean = backbone.body.bn1.running_mean.clone()
    model.loss(batch)["total"].backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert torch.equal(backbone.body.bn1.running_mean, running_mean)  # eval mode: statistics untouched
    with torch.no_grad():
        (features,) = prior.backbone(batch["images"])
        expected = model.instruction.proj(features.mean(dim=(2, 3)))
        torch.testing.assert_close(model.instruction(batch["images"]), expected)


def test_priorclip_refuses_a_prior_of_another_backbone_or_model(trained_prior, tmp_path):
    _, folder, *_ = trained_prior
    with pytest.raises(ValueError, match="model.instruction_backbone: 'resnet18', but the scene prior"):
        build_model(
            tiny("priorclip", f"model.instruction_checkpoint={folder}", "model.instruction_backbone=resnet18"),
            vocab_size=VOCAB,
        )
    vsepp_cfg = load_config("model/vsepp-tiny")
    other = tmp_path / "vsepp"
    other.mkdir()
    torch.save({"model": build_model(vsepp_cfg, vocab_size=VOCAB).state_dict()}, other / STATE_FILE)
    vsepp_cfg.save(other / CONFIG_FILE)
    with pytest.raises(ValueError, match="model.instruction_checkpoint: .* holds a 'vsepp' model, not a scene_prior"):
        build_model(tiny("priorclip", f"model.instruction_checkpoint={other}"), vocab_size=VOCAB)
    with pytest.raises(ValueError, match="`train` means: train that stage first"):
        build_model(tiny("priorclip", "model.instruction_checkpoint=train"), vocab_size=VOCAB)
