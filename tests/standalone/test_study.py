"""`rsray study` end to end: vsepp-tiny over 2 seeds on real Ray Train (2 workers each), tracked
on the real MLflow server: two child runs under one parent whose means and spreads are those of
the children's own test numbers, the report line, and `rsray compare` counting the members (not the
parent) as repeats."""

from __future__ import annotations

import statistics

import pytest

from pipelines.cli import main

pytestmark = pytest.mark.integration

EXPERIMENT = "study-test"


def test_a_study_over_two_seeds_logs_two_children_and_their_spread_in_the_parent(
    prepared, mlflow_server, tmp_path, capsys
):
    from mlflow import MlflowClient

    code = main(
        [
            "study",
            "train/cpu-tiny",
            f"train.data={prepared}",
            f"train.storage_path={tmp_path}",
            "train.epochs=1",
            "train.num_workers=1",  # a member is an ordinary training (2 workers: test_train's); one starts faster
            "tracking.log_model=false",  # a member is an ordinary training: its model is tested in test_train
            "study.name=vsepp-seeds",
            f"tracking.uri={mlflow_server}",
            f"tracking.experiment={EXPERIMENT}",
            "tracking.system_metrics=false",
            "--seeds",
            "0",
            "1",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("rsray.kind") == "study")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["vsepp-seeds-seed0", "vsepp-seeds-seed1"]
    assert sorted(r.data.params["train.seed"] for r in children) == ["0", "1"]
    for key in ("test/mR", "test/i2t_R1", "test/t2i_R10", "test_smr/mR"):
        values = [r.data.metrics[key] for r in children]
        prefix, name = key.split("/")
        assert parent.data.metrics[key] == pytest.approx(statistics.fmean(values), abs=1e-9), key
        assert parent.data.metrics[f"{prefix}_std/{name}"] == pytest.approx(statistics.stdev(values), abs=1e-9), key
    values = [r.data.metrics["test/mR"] for r in children]
    line = f"mR {statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} (2 seeds)"
    assert line in printed.splitlines()

    assert main(["compare", f"tracking.uri={mlflow_server}", f"tracking.experiment={EXPERIMENT}", "--no-log"]) == 0
    table = capsys.readouterr().out
    assert "| vsepp | 2 | " in table and f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}" in table
