"""Training across two Ray nodes: a local folder is refused before any worker starts, and CMPAGL
tiny trains with its 2 DDP workers spread over both nodes (each worker's node id, gathered, says
so): one epoch, then a rerun of the same name that resumes from its checkpoint with the feature
queue it left (gathered from workers on different nodes), and `rsray evaluate` of the result
printing its three retrieval stages (ITC, +ITM, each with and without SMR). Tracked on the MLflow
server: the run's test numbers hold every stage."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from rsray.checkpoint import load_checkpoint_state
from rsray.config import CONF_DIR, load_config
from rsray.train.records import best_checkpoint
from rsray.train.run import train

pytestmark = pytest.mark.integration

BATCH, WORKERS = 16, 2
QUEUE = 1024  # larger than two epochs' entries, so nothing written is overwritten
EXPERIMENT = "cmpagl-test"


def _queue(result) -> dict[str, torch.Tensor]:
    state = load_checkpoint_state(result.checkpoint)["model"]
    return {name: state[f"queue.{name}"] for name in ("ids", "ptr", "filled", "image")}


def test_a_local_folder_is_refused_on_two_nodes_before_any_worker_starts(prepared_on_nodes, tmp_path, capsys):
    from pipelines.cli import main

    storage = tmp_path / "runs"
    code = main(
        [
            "train",
            "train/cpu-tiny",
            f"train.data={prepared_on_nodes}",
            f"train.storage_path={storage}",
            "tracking.enabled=false",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("rsray: error: command line: train.data: ") and "2 nodes" in err[0]
    assert "s3://" in err[0] and "train.shared_fs_ok=true" in err[0]
    assert not storage.exists()  # nothing started, nothing written


def test_cmpagl_trains_on_both_nodes_resumes_with_its_queue_and_evaluates_in_three_stages(
    prepared_on_nodes, mlflow_server, tmp_path, capsys
):
    from mlflow import MlflowClient

    from pipelines.cli import main

    run = tmp_path / "cmpagl.yaml"
    run.write_text(
        yaml.safe_dump(
            {"defaults": [str(CONF_DIR / "presets" / "cpu-tiny.yaml"), str(CONF_DIR / "model" / "cmpagl-tiny.yaml")]}
        )
    )
    cfg = load_config(
        run,
        [
            f"train.data={prepared_on_nodes}",
            f"train.storage_path={tmp_path / 'runs'}",
            "train.epochs=1",
            f"train.batch_size={BATCH}",
            f"train.num_workers={WORKERS}",
            "train.cpus_per_worker=0.5",
            "train.placement=spread",  # one worker per node
            "train.shared_fs_ok=true",  # both nodes are this machine: its folders are shared
            "train.run_name=cmpagl-tiny-test",
            f"model.queue_size={QUEUE}",
            f"tracking.uri={mlflow_server}",
            f"tracking.experiment={EXPERIMENT}",
            "tracking.system_metrics=false",
            "tracking.log_model=false",  # the logged model is tested on VSE++ in test_train
        ],
    )
    first = train(cfg)
    history = first.return_value
    assert all(math.isfinite(history[0][f"train/{term}"]) for term in ("itc", "triplet", "intra", "itm", "mlm"))
    assert "val/itm_mR" in history[0]  # the tiny config re-scores with ITM during validation
    assert history[0]["workers"] == WORKERS and history[0]["worker_nodes"] == 2
    # 480 training pairs / 2 workers / 16 = 15 steps; each step gathers both workers' 16 momentum features
    steps = 480 // WORKERS // BATCH
    after_one = _queue(first)
    assert int(after_one["ptr"]) == int(after_one["filled"]) == steps * WORKERS * BATCH
    written = after_one["ids"][: steps * WORKERS * BATCH]
    assert (written >= 0).all() and (after_one["ids"][steps * WORKERS * BATCH :] == -1).all()

    cfg.train.epochs = 2  # the same run name: Ray Train restores it and the loop resumes after epoch 0
    second = train(cfg)
    assert [int(m["epoch"]) for m in second.return_value] == [0, 1]
    after_two = _queue(second)
    n = steps * WORKERS * BATCH
    assert int(after_two["ptr"]) == int(after_two["filled"]) == 2 * n  # went on from where it was
    assert torch.equal(after_two["ids"][:n], after_one["ids"][:n])  # the first epoch's entries came back
    assert torch.equal(after_two["image"][:n], after_one["image"][:n])

    # `rsray evaluate` of the best checkpoint prints the three stages, and each is what the run logged
    out = tmp_path / "eval.json"
    best = best_checkpoint(second, cfg).path
    assert main(["evaluate", best, "--split", "test", "-o", str(out), "--no-mlflow"]) == 0
    printed = capsys.readouterr().out
    for title in ("ITC, without SMR", "ITC, with SMR", "+ITM (top 4 re-scored", "pairs", "s), with SMR"):
        assert title in printed, printed
    report = json.loads(out.read_text())
    logged = MlflowClient(mlflow_server).get_run(second.mlflow_run_id).data.metrics
    stage = report["stages"]["itm"]
    for prefix, numbers in (
        ("test", report["metrics"]),
        ("test_smr", report["smr_metrics"]),
        ("test_itm", stage["metrics"]),
        ("test_itm_smr", stage["smr_metrics"]),
    ):
        assert logged[f"{prefix}/mR"] == pytest.approx(numbers["mR"], abs=1e-6), prefix
