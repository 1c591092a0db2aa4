"""The per-worker training core (rsray.train.loop) as a plain PyTorch process, without Ray."""

from __future__ import annotations

import time

import pytest
import torch

from rsray.config import load_config
from rsray.data.loader import make_train_loader
from rsray.data.prepare import prepare_in_process
from rsray.data.synthetic import generate_sample
from rsray.eval.split import evaluate, score_split
from rsray.models import build_model, model_config
from rsray.optim import make_optimizer
from rsray.train.loop import train_epoch

BATCH = 16


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    generate_sample(root, n_images=30, image_size=64, seed=0, progress=False)
    tables, vocab = prepare_in_process(load_config("presets/cpu-tiny", [f"data.root={root}"]))
    return tables, len(vocab)


def vsepp(vocab_size: int):
    cfg = load_config("model/vsepp-tiny")
    torch.manual_seed(0)
    return build_model(cfg, vocab_size=vocab_size), model_config(cfg)


class SlowBatches:
    """Yields the loader's batches, each after `delay` seconds (a slow storage or decode stand-in)."""

    def __init__(self, batches, delay: float):
        self.batches, self.delay = list(batches), delay

    def __iter__(self):
        for batch in self.batches:
            time.sleep(self.delay)
            yield batch


def test_an_epoch_counts_pairs_and_the_time_spent_waiting_for_batches(sample):
    tables, vocab_size = sample
    model, typed = vsepp(vocab_size)
    optimizer, _ = make_optimizer(model, typed)
    batches = list(make_train_loader(tables["train"], typed.augment, batch_size=BATCH, seed=0))
    delay = 0.05
    stats = train_epoch(model, SlowBatches(batches, delay), optimizer)
    assert stats.pairs == BATCH * len(batches)
    assert stats.data_seconds >= delay * len(batches)  # every batch was waited for
    assert stats.data_seconds < stats.seconds  # and the model's steps took the rest
    assert set(stats.losses) >= {"total"} and all(v == v for v in stats.losses.values())  # no NaN


def test_an_epoch_steps_a_per_batch_schedule_once_per_batch(sample):
    tables, vocab_size = sample
    model, typed = vsepp(vocab_size)
    optimizer, schedule = make_optimizer(model, typed)
    batches = list(make_train_loader(tables["train"], typed.augment, batch_size=BATCH, seed=0))
    train_epoch(model, batches, optimizer, scheduler=schedule)
    assert schedule.last_epoch == len(batches)


def test_an_epoch_changes_the_trainable_weights_only(sample):
    tables, vocab_size = sample
    model, typed = vsepp(vocab_size)
    frozen = next(p for p in model.parameters())
    frozen.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer, _ = make_optimizer(model, typed)
    train_epoch(model, make_train_loader(tables["train"], typed.augment, batch_size=BATCH, seed=0), optimizer)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    frozen_name = next(name for name, p in model.named_parameters() if p is frozen)
    assert frozen_name not in changed and len(changed) > 0


def test_the_evaluation_batch_size_does_not_change_the_numbers(sample):
    tables, vocab_size = sample
    model, typed = vsepp(vocab_size)
    small = evaluate(model, tables["val"], typed.augment, image_batch=2)
    large = evaluate(model, tables["val"], typed.augment, image_batch=64)
    assert small.keys() == large.keys()
    for key in small:
        assert small[key] == pytest.approx(large[key], abs=1e-4), key


def test_a_split_is_scored_whole(sample):
    tables, vocab_size = sample
    model, typed = vsepp(vocab_size)
    split = score_split(model, tables["val"], typed.augment, image_batch=3)
    images = tables["val"].num_rows
    assert split.scores.shape == (images, len(split.caption_image))
    assert split.caption_image.max().item() == images - 1


class _ScaleOnly(torch.nn.Module):
    """A loss that only pushes a LogitScale up (what a confident contrastive loss does)."""

    def __init__(self, clamp: str):
        super().__init__()
        from rsray.losses import LogitScale

        self.scale = LogitScale(1 / 90.0, clamp=clamp)

    def loss(self, batch):
        return {"total": -self.scale()}


@pytest.mark.parametrize("clamp", ["forward", "after_step"])
def test_an_epoch_runs_each_modules_after_step_hook(clamp):
    """The loop clamps open_clip's way after every optimizer step (`after_optimizer_step`)."""
    import math

    model = _ScaleOnly(clamp)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    train_epoch(model, [{"images": torch.zeros(1, 1)}] * 2, optimizer, grad_clip=None)
    stored = float(model.scale.log_scale.detach())
    if clamp == "after_step":
        assert stored == pytest.approx(math.log(100.0), abs=1e-6)
    else:
        assert stored > math.log(100.0) + 50  # one step of lr 1 past it, then stuck
