"""Run names: one live run per name, and no resume that would ignore a changed setting."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from rsray import storage
from rsray.config import ConfigError, load_config
from rsray.train.run_folder import LOCK_FILE, ResumePoint, RunLock, check_resume
from rsray.train.scaling import placeable_workers, worker_resources


def config(tmp_path, *overrides):
    return load_config("train/cpu-tiny", [f"train.storage_path={tmp_path}", "train.run_name=named", *overrides])


def write_lock(tmp_path, **record):
    (tmp_path / "named").mkdir(exist_ok=True)
    (tmp_path / "named" / LOCK_FILE).write_text(json.dumps(record))


def test_a_live_holder_refuses_the_name_and_a_dead_or_silent_one_is_taken_over(tmp_path):
    import socket

    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, host=host, pid=sleeper.pid, heartbeat=time.time())
        with pytest.raises(
            ConfigError, match=rf"train.run_name: 'named' is in use by a live run \(pid {sleeper.pid} on"
        ):
            RunLock(config(tmp_path)).__enter__()
    finally:
        sleeper.kill()
        sleeper.wait()
    write_lock(tmp_path, host=host, pid=sleeper.pid, heartbeat=time.time())  # that process is gone: stale
    with RunLock(config(tmp_path)):
        held = json.loads((tmp_path / "named" / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid()
    assert not (tmp_path / "named" / LOCK_FILE).exists()

    write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=time.time())
    with pytest.raises(ConfigError, match="in use by a live run"):
        RunLock(config(tmp_path)).__enter__()
    write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 3600)  # no heartbeat for an hour
    with RunLock(config(tmp_path)):
        pass


def point(tmp_path, cfg, epoch=2) -> ResumePoint:
    return ResumePoint(epoch, storage.resolve(tmp_path / "named" / "checkpoint_x"), cfg.public_dict())


def test_resuming_with_a_changed_model_or_training_setting_is_refused_naming_it(tmp_path):
    trained = config(tmp_path)
    for override, key in [
        ("model.lr=0.5", "model.lr"),
        ("train.seed=3", "train.seed"),
        ("train.num_workers=1", "train.num_workers"),
    ]:
        with pytest.raises(ConfigError, match=rf"command line: {key}: run 'named' would resume from epoch 2 of "):
            check_resume(config(tmp_path, override), point(tmp_path, trained))


def test_resuming_with_more_epochs_or_other_logging_is_allowed_and_said(tmp_path, caplog):
    trained = config(tmp_path)
    rerun = config(tmp_path, "train.epochs=9", "tracking.uri=http://u:pw@h:5000", "train.keep_checkpoints=5")
    with caplog.at_level(logging.INFO, logger="rsray.train"):
        check_resume(rerun, point(tmp_path, trained))
    assert "resuming run named from epoch 2 (" in caplog.text and "epochs 3..8 to go" in caplog.text


def test_placeable_workers_counts_whole_workers_per_alive_node():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}},
        {"Alive": True, "Resources": {"CPU": 3.0}},
        {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},
    ]
    assert placeable_workers(nodes, {"CPU": 2.0}) == 4 + 1
    assert placeable_workers(nodes, {"CPU": 2.0, "GPU": 1.0}) == 2
    assert placeable_workers(nodes, {"CPU": 0.5}) == 16 + 6
    assert worker_resources(load_config("train/cpu-tiny", ["train.use_gpu=true"]).train) == {"CPU": 0.5, "GPU": 1.0}
