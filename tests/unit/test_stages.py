"""Earlier training stages (`rsray.train.stages`): what a model's config class declares is trained
first, with this run's data and train sections, and its best checkpoint becomes the key's value."""

from __future__ import annotations

from types import SimpleNamespace

from rsray.config import load_config
from rsray.train.stages import train_earlier_stages


def test_a_stage_the_config_asks_for_is_trained_first_and_named_in_the_key(tmp_path):
    cfg = load_config(
        "model/priorclip-tiny", ["model.instruction_checkpoint=train", "train.run_name=run", "train.epochs=4"]
    )
    trained = []

    def train(stage):
        trained.append(stage)
        best = SimpleNamespace(path=str(tmp_path / "prior" / "checkpoint_000"))
        return SimpleNamespace(get_best_checkpoint=lambda metric, order: best if metric == "val/accuracy" else None)

    staged = train_earlier_stages(cfg, train)
    (stage,) = trained  # PriorCLIP declares one earlier stage: the scene prior
    assert stage.model["name"] == "scene_prior" and stage.train.run_name == "run-scene_prior"
    assert stage.train.epochs == 4 and stage.data == cfg.data  # this run's data and train sections
    assert staged.model["instruction_checkpoint"] == str(tmp_path / "prior" / "checkpoint_000")
    assert staged.origins["model.instruction_checkpoint"] == "stage run-scene_prior"
    assert cfg.model["instruction_checkpoint"] == "train"  # the caller's config is left as it was


def test_nothing_is_trained_when_no_key_says_train():
    cfg = load_config("model/priorclip-tiny")
    assert train_earlier_stages(cfg, lambda stage: (_ for _ in ()).throw(AssertionError("trained"))).model == cfg.model
