"""Tracker against a real `mlflow server` whose artifacts land in S3 (moto)."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest

from rsray.config import TrackingConfig
from rsray.figures import loss_and_mr_curves
from rsray.tracking import Tracker
from tests.credentials import PASSWORD, USER

pytestmark = pytest.mark.integration


def test_run_through_a_tracking_server(mlflow_server, s3_endpoint, s3_bucket, tmp_path):
    from mlflow import MlflowClient

    cfg = TrackingConfig(uri=mlflow_server, experiment="integration", retries=2, system_metrics=False)
    config = {"model": {"name": "vsepp"}, "train": {"epochs": 3}, "storage": {"secret_key": "hidden"}}
    history = []
    with Tracker.start(cfg, "server-run", params=config, tags={"model": "vsepp", "dataset": "sample"}) as tracker:
        for epoch in range(3):
            metrics = {"i2t_R@1": 5.0 * epoch, "mR": 10.0 + epoch}
            tracker.log_metrics(metrics, step=epoch, prefix="val/")
            history.append({"epoch": epoch, "train/total": 1.0 / (epoch + 1), "val/mR": metrics["mR"]})
        final = tmp_path / "final_metrics.json"
        final.write_text(json.dumps({"mR": 12.0}))
        tracker.log_artifact(final, "results")
        tracker.log_figure(loss_and_mr_curves(history), "figures/curves.png")
    assert (
        tracker.ui_link() == f"{mlflow_server}/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning"
    )

    client = MlflowClient(mlflow_server)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"model.name": "vsepp", "train.epochs": "3"}
    assert run.data.tags["dataset"] == "sample"
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "val/i2t_R1")] == [
        (0, 0.0),
        (1, 5.0),
        (2, 10.0),
    ]
    assert client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert {a.path for a in client.list_artifacts(tracker.run_id, "figures")} == {"figures/curves.png"}
    local = client.download_artifacts(tracker.run_id, "results/final_metrics.json", str(tmp_path / "back"))
    assert json.loads(Path(local).read_text()) == {"mR": 12.0}

    keys = [
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_endpoint)
        .list_objects_v2(Bucket=s3_bucket, Prefix="mlflow/")
        .get("Contents", [])
    ]
    assert any(k.endswith(f"{tracker.run_id}/artifacts/results/final_metrics.json") for k in keys), keys
    assert any(k.endswith("figures/curves.png") for k in keys), keys


def test_the_basic_auth_server_refuses_anyone_without_a_valid_login(mlflow_server, monkeypatch):
    """The session's server runs MLflow's basic-auth app: no login or a wrong password is refused,
    MLflow's own client without the login variables too; the user's login works."""
    import requests
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    def search(**login) -> int:
        url = f"{mlflow_server}/api/2.0/mlflow/experiments/search"
        return requests.get(url, params={"max_results": 1}, timeout=30, **login).status_code

    assert search() == 401
    assert search(auth=(USER, "not-the-password")) == 401
    assert search(auth=(USER, PASSWORD)) == 200
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(MlflowException, match="401"):
        MlflowClient(mlflow_server).search_experiments(max_results=1)


def test_the_image_entrypoint_starts_the_server_without_mlflows_job_runner(mlflow_server, mlflow_server_process):
    """start-mlflow.sh turns MLflow's job runner off (rsray runs none of its jobs): with it on, the
    server starts eight more processes, a runner and seven huey consumers."""
    commands = mlflow_server_process.commands()
    assert any("mlflow" in line and "server" in line for line in commands), commands
    assert not [line for line in commands if "huey" in line or "_job_runner" in line], commands
