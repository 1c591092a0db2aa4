"""Tracker against a real local MLflow store (SQLite file in tmp_path)."""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from pathlib import Path

import pytest

from rsray.config import TrackingConfig
from rsray.tracking import (
    NullTracker,
    Tracker,
    TrackingUnavailable,
    default_tags,
    flatten_params,
    metric_history,
    metric_name,
    open_tracker,
    ui_command,
    with_retries,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_cfg(tmp_path, monkeypatch) -> TrackingConfig:
    monkeypatch.chdir(tmp_path)  # the default artifact root is relative to the working directory
    return TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="unit", retries=1, system_metrics=False)


CONFIG = {
    "model": {"name": "vsepp", "embed_dim": 64},
    "train": {"epochs": 3, "lr": 0.0002, "workers": [1, 2]},
    "data": {"tokenizer": "/models/bert", "max_tokens": 32},
    "storage": {
        "aws_secret_access_key": "s3cr3t",
        "access_key_id": "AKIA",
        "hf_token": "tok",
        "password": "pw",
        "endpoint": "http://user:pw@minio:9000",
    },
}


def test_flatten_params_drops_secrets_and_stringifies():
    flat = flatten_params(CONFIG)
    assert flat["model.name"] == "vsepp"
    assert flat["train.epochs"] == "3"
    assert flat["train.workers"] == "[1, 2]"
    assert flat["data.tokenizer"] == "/models/bert"  # a tokenizer is not a token
    assert flat["data.max_tokens"] == "32"
    assert not any(k.startswith("storage.") and k != "storage.endpoint" for k in flat)
    assert flat["storage.endpoint"] == "http://user:***@minio:9000"
    assert "s3cr3t" not in json.dumps(flat)


def test_metric_names_are_sanitized():
    assert metric_name("val/i2t_R@1") == "val/i2t_R1"
    assert metric_name("val/mR") == "val/mR"
    assert metric_name("loss(total)") == "loss_total_"


def test_run_params_tags_metrics_and_artifacts(local_cfg, tmp_path):
    from mlflow import MlflowClient

    with Tracker.start(
        local_cfg, "unit-run", params=CONFIG, tags={"model": "vsepp", "dataset": "sample"}, base_delay=0.0
    ) as tracker:
        for epoch in range(3):
            tracker.log_metrics(
                {"i2t_R@1": 10.0 + epoch, "mR": 20.0 + epoch, "note": "x", "none": None}, step=epoch, prefix="val/"
            )
        config_file = tmp_path / "config.yaml"
        config_file.write_text("model: vsepp\n")
        tracker.log_artifact(config_file)
        tracker.log_dict({"mR": 22.0}, "final_metrics.json")
        run_id, experiment_id = tracker.run_id, tracker.experiment_id

    client = MlflowClient(local_cfg.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "unit-run"
    params = run.data.params
    assert params["model.embed_dim"] == "64" and params["train.lr"] == "0.0002"
    assert not any("secret" in k or "password" in k or k.endswith("token") for k in params)
    tags = run.data.tags
    assert tags["model"] == "vsepp" and tags["dataset"] == "sample"
    assert tags["git_commit"] and tags["host"]
    assert set(run.data.metrics) == {"val/i2t_R1", "val/mR"}
    assert metric_history(run_id, "val/i2t_R@1", local_cfg.uri) == [(0, 10.0), (1, 11.0), (2, 12.0)]
    assert tracker.metric_history("val/mR") == [(0, 20.0), (1, 21.0), (2, 22.0)]
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "final_metrics.json"}
    experiment = client.get_experiment(experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert (
        tracker.ui_link("http://h:5000/")
        == f"http://h:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    )
    assert (  # a bare run page opens in MLflow 3.17's GenAI view (seen in a browser)
        tracker.run_link("http://h:5000")
        == f"http://h:5000/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    )


def test_failed_block_marks_run_failed_and_child_nests(local_cfg):
    from mlflow import MlflowClient

    parent = Tracker.start(local_cfg, "sweep", params={}, tags={})
    with pytest.raises(ValueError, match="boom"):
        with Tracker.start(local_cfg, "trial", params={}, tags={}, parent_run_id=parent.run_id) as child:
            raise ValueError("boom")
    parent.end()
    client = MlflowClient(local_cfg.uri)
    assert client.get_run(child.run_id).info.status == "FAILED"
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert parent.experiment_id == child.experiment_id  # the experiment is reused, not re-created


def test_system_metrics_are_logged(local_cfg, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    local_cfg.system_metrics = True
    tracker = Tracker.start(local_cfg, "sys", params={}, tags={})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(k.startswith("system/") for k in MlflowClient(local_cfg.uri).get_run(tracker.run_id).data.metrics):
            break
        time.sleep(0.2)
    tracker.end()
    metrics = MlflowClient(local_cfg.uri).get_run(tracker.run_id).data.metrics
    assert any(k.startswith("system/cpu") for k in metrics), metrics


def test_retry_helper_recovers_then_gives_up(caplog):
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) < 3:
            raise ConnectionError("server hiccup")
        return x * 2

    assert with_retries(flaky, 21, retries=3, base_delay=0.0) == 42
    assert len(calls) == 3

    def dead():
        raise ConnectionError("gone")

    with caplog.at_level(logging.WARNING, logger="rsray.tracking"):
        assert with_retries(dead, retries=2, base_delay=0.0, what="log metrics") is None
    assert "log metrics failed after 3 attempt(s)" in caplog.text


def test_logging_never_raises_when_the_store_breaks_and_an_outage_costs_one_round_of_retries(
    local_cfg, caplog, monkeypatch
):
    import rsray.tracking

    tracker = Tracker.start(local_cfg, "broken", params={}, tags={}, base_delay=0.0)
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("store went away")

    healthy_log_batch = tracker.client.log_batch
    tracker.client.log_batch = broken
    tracker.client.log_artifact = broken
    with caplog.at_level(logging.WARNING, logger="rsray.tracking"):
        tracker.log_metrics({"mR": 1.0}, step=0)
        tracker.log_artifact(__file__)  # the store counts as down: skipped without a call
        assert tracker.metric_history("mR") is None
    assert caplog.text.count("skipped") == 1 and len(calls) == local_cfg.retries + 1
    assert tracker.not_logged == ["log metrics (step 0)", f"log artifact {__file__}", "read mR history"]
    assert (
        tracker.outage().startswith("MLflow at sqlite:///") and "not logged: log metrics (step 0), " in tracker.outage()
    )

    monkeypatch.setattr(rsray.tracking, "OUTAGE_COOLDOWN_S", 0.0)  # the cool-down is over: one attempt, no retries
    tracker.log_metrics({"mR": 2.0}, step=1)
    assert len(calls) == local_cfg.retries + 2
    tracker.client.log_batch = healthy_log_batch  # the store is back
    tracker.log_metrics({"mR": 3.0}, step=2)
    assert tracker.metric_history("mR") == [(2, 3.0)] and tracker._down_since is None
    tracker.end()
    assert "stays RUNNING" not in tracker.outage()


def test_unreachable_server_is_one_clear_line():
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{free_port()}", system_metrics=False)
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as info:
        Tracker.start(cfg, "nope", params={}, tags={})
    message = str(info.value)
    assert "\n" not in message
    assert cfg.uri in message and "tracking.uri" in message
    assert time.monotonic() - started < 10


def test_null_tracker_and_open_tracker(local_cfg):
    null = NullTracker.start(local_cfg, "x", params={"a": 1}, tags={})
    with null as t:
        t.log_metrics({"mR": 1.0}, step=0)
        t.log_artifact("/does/not/exist")
        t.log_dict({}, "x.json")
        t.log_figure(None, "x.png")
    assert t.run_id is None and t.ui_link("http://h") == "" and t.metric_history("mR") == []
    assert isinstance(open_tracker(local_cfg, "r", rank=1), NullTracker)
    local_cfg.enabled = False
    assert isinstance(open_tracker(local_cfg, "r", rank=0), NullTracker)


def test_default_tags():
    tags = default_tags()
    assert tags["host"]
    assert len(tags["git_commit"]) == 40 or tags["git_commit"] == "unknown"


def test_start_accepts_whole_config_or_its_dict(local_cfg):
    from rsray.config import Config

    cfg = Config(tracking=local_cfg)
    with Tracker.start(cfg, "whole", params={}, tags={}) as from_config:
        pass
    with Tracker.start(cfg.to_dict(), "dict", params={}, tags={}) as from_dict:
        pass
    assert from_config.experiment_id == from_dict.experiment_id


def test_git_commit_falls_back_to_the_image_label(tmp_path, monkeypatch):
    """No .git (a container image): the commit baked in as RSRAY_GIT_COMMIT is reported."""
    import rsray.tracking_store as tracking

    monkeypatch.setattr(tracking, "__file__", str(tmp_path / "rsray" / "tracking_store.py"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setenv("RSRAY_GIT_COMMIT", "abc123")
    assert tracking.git_commit() == "abc123"
    monkeypatch.delenv("RSRAY_GIT_COMMIT")
    assert tracking.git_commit() == "unknown"


def test_the_ui_command_works_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the venv is not under this folder: its mlflow is named absolutely
    command = ui_command("sqlite:///mlflow.db")
    executable, _, rest = command.partition(" ui ")
    assert Path(executable) == Path(sys.executable).parent / "mlflow" and Path(executable).is_absolute()
    assert rest == f"--backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(Path(sys.executable).parent.parent)  # inside the venv: a short relative name
    assert ui_command("http://h:5000").startswith("bin/mlflow ui --backend-store-uri http://h:5000")


def test_a_run_left_running_by_a_dead_driver_is_marked_killed_by_the_next_run_of_its_folder(local_cfg):
    """A SIGKILLed driver never ends its MLflow run; the next run of that name and folder (which
    holds the folder's lock, so no live driver has it) marks it KILLED. A RUNNING run of the same
    name in another folder is someone else's and stays."""
    from mlflow import MlflowClient

    orphan = Tracker.start(local_cfg, "named", params={"train": {"storage_path": "/runs"}})
    elsewhere = Tracker.start(local_cfg, "named", params={"train": {"storage_path": "/other"}})
    again = Tracker.start(local_cfg, "named", params={"train": {"storage_path": "/runs"}})
    assert again.end_orphans("named", "/runs") == [orphan.run_id]
    client = MlflowClient(local_cfg.uri)
    status = {t.run_id: client.get_run(t.run_id).info.status for t in (orphan, elsewhere, again)}
    assert status == {orphan.run_id: "KILLED", elsewhere.run_id: "RUNNING", again.run_id: "RUNNING"}
    assert NullTracker().end_orphans("named", "/runs") == []
