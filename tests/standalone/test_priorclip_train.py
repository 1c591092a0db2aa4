"""One `rsray train` call runs both PriorCLIP stages on real Ray Train (2 DDP workers each): the scene
prior first (its classifier sized from the prepared data, its best checkpoint chosen on validation
accuracy), then PriorCLIP from that checkpoint with the prior frozen through DDP training."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
import yaml

from rsray.checkpoint import CONFIG_FILE, STATE_FILE, load_checkpoint_state
from rsray.config import CONF_DIR, load_config
from rsray.train.run import train

pytestmark = pytest.mark.integration

EPOCHS = 2


def test_one_command_trains_the_prior_then_priorclip_from_its_best_checkpoint(prepared, tmp_path):
    # the prior's stage config leaves num_classes to the data, as the paper config does
    stage = tmp_path / "scene_prior_stage.yaml"
    stage.write_text(
        yaml.safe_dump(
            {"defaults": [str(CONF_DIR / "model" / "scene_prior-tiny.yaml")], "model": {"num_classes": None}}
        )
    )
    run = tmp_path / "priorclip.yaml"
    run.write_text(
        yaml.safe_dump(
            {"defaults": [str(CONF_DIR / "presets" / "cpu-tiny.yaml"), str(CONF_DIR / "model" / "priorclip-tiny.yaml")]}
        )
    )
    storage_path = tmp_path / "runs"
    cfg = load_config(
        run,
        [
            f"train.data={prepared}",
            f"train.storage_path={storage_path}",
            f"train.epochs={EPOCHS}",
            "train.batch_size=16",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            "train.run_name=pc",
            "tracking.enabled=false",
            "model.instruction_checkpoint=train",
            f"model.instruction_stage={stage}",
        ],
    )
    started = time.perf_counter()
    result = train(cfg)
    print(f"scene prior + PriorCLIP, 2 workers x {EPOCHS} epochs each: {time.perf_counter() - started:.0f}s")

    history = result.return_value
    assert [int(m["epoch"]) for m in history] == list(range(EPOCHS))
    assert all(math.isfinite(m[k]) for m in history for k in ("train/info_nce", "train/affiliation", "val/mR"))
    # linear schedule stepped per batch: 480 pairs / 2 workers / 16 = 15 steps an epoch, 3 of 30 warm up
    # from 0, then decay; the lr is logged as each epoch starts
    assert history[0]["lr"] == 0 and history[1]["lr"] == pytest.approx(1e-3 * (30 - 15) / (30 - 3))

    # the prior's run: classifier sized from the manifest, checkpoints ranked by validation accuracy
    prior_checkpoints = sorted(c for c in (storage_path / "pc-scene_prior").glob("checkpoint_*") if c.is_dir())
    assert len(prior_checkpoints) == EPOCHS
    prior_metrics = {str(c): torch.load(c / STATE_FILE, weights_only=True)["metrics"] for c in prior_checkpoints}
    assert all(0 <= m["val/accuracy"] <= 100 and "val/mR" in m for m in prior_metrics.values())
    assert yaml.safe_load((prior_checkpoints[0] / CONFIG_FILE).read_text())["model"]["num_classes"] == 10

    # PriorCLIP started from the best prior, which stayed frozen through DDP training
    priorclip_cfg = load_config(Path(result.checkpoint.path) / CONFIG_FILE)
    chosen = priorclip_cfg.model["instruction_checkpoint"]
    assert chosen == max(prior_metrics, key=lambda c: prior_metrics[c]["val/accuracy"])
    prior_state = torch.load(Path(chosen) / STATE_FILE, weights_only=True)["model"]
    trained = load_checkpoint_state(result.checkpoint)["model"]
    backbone = {k: v for k, v in prior_state.items() if k.startswith("backbone.body.")}
    assert backbone
    for key, value in backbone.items():
        assert torch.equal(trained["instruction." + key], value), key
