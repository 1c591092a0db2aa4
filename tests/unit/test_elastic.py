"""Elastic training's settings: `train.num_workers: [min, max]` and the learning-rate rule under a
changing worker count (`train.elastic_lr`), checked against the formula for both kinds of
schedule rsray builds (StepLR's chained form, the warmup LambdaLRs' closed form)."""

from __future__ import annotations

import pytest
from torch import nn

from rsray.config import ConfigError, load_config
from rsray.models import model_config
from rsray.optim import make_optimizer
from rsray.train.scaling import elastic_lr_scale, rescale_learning_rate, steps_per_epoch


def test_num_workers_takes_a_count_or_min_and_max():
    fixed = load_config("train/cpu-tiny", ["train.num_workers=3"]).train
    assert (fixed.elastic, fixed.min_workers, fixed.max_workers) == (False, 3, 3)
    elastic = load_config("train/cpu-tiny", ["train.num_workers=[1, 4]"]).train
    assert (elastic.elastic, elastic.min_workers, elastic.max_workers) == (True, 1, 4)
    for bad in ("[3, 1]", "[0, 2]", "[1, 2, 3]", "0"):
        with pytest.raises(ConfigError, match=r"command line: train\.num_workers: must be"):
            load_config("train/cpu-tiny", [f"train.num_workers={bad}"])
    with pytest.raises(ConfigError, match=r"train\.elastic_lr: must be linear or constant, got 'sqrt'"):
        load_config("train/cpu-tiny", ["train.elastic_lr=sqrt"])


def test_the_lr_scales_with_workers_over_max_only_when_elastic_and_linear():
    linear = load_config("train/cpu-tiny", ["train.num_workers=[1, 4]"]).train
    assert [elastic_lr_scale(linear, n) for n in (1, 2, 4)] == [0.25, 0.5, 1.0]
    constant = load_config("train/cpu-tiny", ["train.num_workers=[1, 4]", "train.elastic_lr=constant"]).train
    assert elastic_lr_scale(constant, 1) == 1.0
    assert elastic_lr_scale(load_config("train/cpu-tiny", ["train.num_workers=4"]).train, 1) == 1.0


def test_an_elastic_run_plans_its_steps_for_max_workers():
    tc = load_config("train/cpu-tiny", ["train.num_workers=[1, 2]", "train.batch_size=16"]).train
    assert steps_per_epoch({"splits": {"train": {"captions": 100}}}, tc) == 3  # 100 / 2 / 16


def _lrs(schedule: str, factor_at: int | None, factor: float, steps: int = 12) -> list[float]:
    """The lr of each of `steps` scheduler steps, rescaled by `factor` before step `factor_at`."""
    cfg = model_config_from({"schedule": schedule, "lr": 0.01, "warmup": 0.25, "decay_every": 3, "lr_decay": 0.5})
    optimizer, scheduler = make_optimizer(nn.Linear(2, 2), cfg, total_steps=steps)
    lrs = []
    for step in range(steps):
        if step == factor_at:
            rescale_learning_rate(optimizer, scheduler, factor)
        lrs.append(optimizer.param_groups[0]["lr"])
        assert scheduler.get_last_lr()[0] == pytest.approx(lrs[-1])
        optimizer.step()
        scheduler.step()
    return lrs


def model_config_from(model: dict):
    return model_config(load_config("train/cpu-tiny", [f"model.{k}={v}" for k, v in model.items()]))


@pytest.mark.parametrize("schedule", ["step", "cosine_warmup", "linear_warmup"])
def test_rescaling_multiplies_every_later_lr_of_the_schedule(schedule):
    plain = _lrs(schedule, None, 1.0)
    halved = _lrs(schedule, 5, 0.5)
    assert halved[:5] == plain[:5]
    assert halved[5:] == pytest.approx([lr * 0.5 for lr in plain[5:]], rel=1e-12)
    back = _lrs(schedule, 0, 0.5)  # a resumed run undoes the checkpoint's scale: new / old
    assert back == pytest.approx([lr * 0.5 for lr in plain], rel=1e-12)


def test_a_resumed_run_undoes_the_checkpoints_scale_through_the_saved_state():
    cfg = model_config_from({"schedule": "cosine_warmup", "lr": 0.01, "warmup": 0.25})
    optimizer, scheduler = make_optimizer(nn.Linear(2, 2), cfg, total_steps=12)
    rescale_learning_rate(optimizer, scheduler, 0.5)  # one worker of two
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "lr_scale": 0.5}
    expected = optimizer.param_groups[0]["lr"] / 0.5  # two workers again: the configured lr
    optimizer, scheduler = make_optimizer(nn.Linear(2, 2), cfg, total_steps=12)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rescale_learning_rate(optimizer, scheduler, 1.0 / saved["lr_scale"])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    optimizer.step()
    scheduler.step()
    plain_optimizer, plain = make_optimizer(nn.Linear(2, 2), cfg, total_steps=12)
    for _ in range(5):
        plain_optimizer.step()
        plain.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(plain_optimizer.param_groups[0]["lr"], rel=1e-12)
