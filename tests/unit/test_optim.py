"""AdamW's weight decay skips biases, norm weights and logit scales (open_clip's rule, PIR's AdamW)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rsray.config import load_config
from rsray.losses import LogitScale
from rsray.models import model_config
from rsray.optim import exempt_from_decay, make_optimizer


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.ln_post = nn.LayerNorm(3)
        self.bn1 = nn.BatchNorm1d(3)
        self.embed = nn.Embedding(5, 3)
        self.logit_scale = LogitScale(0.07)


def one_step_with_zero_gradients(model, cfg) -> dict[str, torch.Tensor]:
    """AdamW with a zero gradient moves a parameter only by its decay: p <- p * (1 - lr * wd)."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer, _ = make_optimizer(model, cfg, total_steps=10)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return {name: p.detach() / before[name] for name, p in model.named_parameters() if before[name].abs().min() > 0}


@pytest.mark.parametrize("rule", ["open_clip", "pir", "none"])
def test_adamw_decays_what_its_exemption_rule_leaves(rule):
    torch.manual_seed(0)
    cfg = model_config(
        load_config("model/clip-tiny", ["model.lr=0.1", "model.weight_decay=0.5", f"model.decay_exempt={rule}"])
    )
    ratios = one_step_with_zero_gradients(Small(), cfg)
    decayed = {  # open_clip: matrices only; pir: all but names with bias/LayerNorm/norm (so its temperature too)
        "open_clip": {"proj.weight", "embed.weight"},
        "pir": {"proj.weight", "embed.weight", "bn1.weight", "ln_post.weight", "logit_scale.log_scale"},
        "none": set(ratios),
    }[rule]
    shrunk = 1 - 0.1 * 0.5
    for name, ratio in ratios.items():
        torch.testing.assert_close(ratio, torch.full_like(ratio, shrunk if name in decayed else 1.0), msg=name)


def test_the_exemption_rule_is_open_clips():
    assert exempt_from_decay("visual.transformer.resblocks.0.ln_1.weight", torch.zeros(8, 8))  # by name
    assert exempt_from_decay("encoder.layer.0.attention.output.LayerNorm.weight", torch.zeros(8))
    assert exempt_from_decay("text_projection.bias", torch.zeros(8))
    assert exempt_from_decay("logit_scale.log_scale", torch.zeros(()))
    assert not exempt_from_decay("visual.conv1.weight", torch.zeros(8, 3, 4, 4))


def test_adam_l2_decay_still_applies_to_every_parameter():
    cfg = model_config(load_config("model/vsepp-tiny", ["model.weight_decay=0.1"]))
    optimizer, _ = make_optimizer(Small(), cfg)
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("offset, changes", [(0, [20, 40]), (1, [19, 39])])
def test_step_decay_follows_its_formula_and_the_releases_phase(offset, changes):
    """lr of epoch e = lr * 0.7 ** ((e + offset) // 20): the paper's phase, or the SWAN release's
    (it decays before epochs where e % 20 == 19)."""
    cfg = model_config(load_config("model/swan-tiny", ["model.lr=0.1", f"model.decay_epoch_offset={offset}"]))
    optimizer, schedule = make_optimizer(nn.Linear(2, 2), cfg)
    lrs = []
    for _ in range(45):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()  # once per epoch, as the training loop does
    assert lrs == pytest.approx([0.1 * 0.7 ** ((e + offset) // 20) for e in range(45)])
    assert [e for e in range(1, 45) if lrs[e] != lrs[e - 1]] == changes


@pytest.mark.parametrize("schedule", ["linear_warmup", "cosine_warmup"])
def test_warmup_schedules_follow_their_formulas(schedule):
    """A linear rise from 0 over `warmup_steps` (absolute, as open_clip's --warmup), then a linear
    or a half-cosine decay to 0 over the rest, one value per optimizer step."""
    overrides = ["model.lr=0.1", f"model.schedule={schedule}", "model.warmup_steps=4", "model.warmup=0.5"]
    cfg = model_config(load_config("model/clip-tiny", overrides))
    optimizer, sched = make_optimizer(nn.Linear(2, 2), cfg, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    decay = {
        "linear_warmup": lambda s: (20 - s) / 16,
        "cosine_warmup": lambda s: 0.5 * (1 + math.cos(math.pi * (s - 4) / 16)),
    }[schedule]
    expected = [0.1 * (s / 4 if s < 4 else decay(s)) for s in range(20)]  # warmup_steps wins over the fraction
    assert lrs == pytest.approx(expected)
