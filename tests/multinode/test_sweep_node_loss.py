"""A sweep that loses a node: two trials train at once, one Train worker on each node (each worker
takes the `train_slot` every node has once), and the worker node is removed mid-training. Whatever
ran there (a Train worker, a trial's driver actor or both) is restarted: Ray Train restarts a lost
worker group from the trial's last checkpoint (`train.max_failures`), Tune restarts a trial whose
actor died (`sweep.trial_max_failures`) and its Train run resumes the same way. The sweep finishes
with each trial in one MLflow child run holding each epoch once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rsray.config import CONF_DIR
from rsray.sweep import TAG_ROLE, TAG_TRIAL
from tests.multinode.test_node_loss import add_a_node, lose_the_worker_node, wait_until

pytestmark = pytest.mark.integration

EPOCHS = 3
EXPERIMENT = "sweep-node-loss"


def _sweep_file(folder: Path, prepared: str, mlflow_server: str) -> Path:
    path = folder / "lr-on-two-nodes.yaml"
    path.write_text(f"""
defaults: [{CONF_DIR / "train" / "cpu-tiny.yaml"}]
train:
  data: {prepared}
  epochs: {EPOCHS}
  storage_path: {folder / "runs"}
  shared_fs_ok: true  # both nodes are this machine
  num_workers: 1
  cpus_per_worker: 0.5
  worker_resources: {{train_slot: 1}}  # one per node: two trials at once put one worker on each
  max_failures: 4
tracking: {{uri: "{mlflow_server}", experiment: {EXPERIMENT}, system_metrics: false, log_model: false}}
sweep:
  space:
    model.lr: {{grid: [3.0e-3, 1.0e-3]}}
  scheduler: {{name: fifo}}
  max_concurrent_trials: 2
  evaluate_test: false
""")
    return path


def _trial_runs(client) -> dict[str, object]:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.{TAG_ROLE} = 'trial'")
    return {run.info.run_id: run for run in runs}


def _epochs_logged(client, run_id: str) -> list[int]:
    return [metric.step for metric in client.get_metric_history(run_id, "val/mR")]


def test_a_sweep_resumes_its_trials_after_a_node_loss_without_duplicated_runs(
    ray_nodes, prepared_on_nodes, mlflow_server, tmp_path
):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    sweep_file, log = _sweep_file(tmp_path, prepared_on_nodes, mlflow_server), tmp_path / "sweep.log"
    env = {**os.environ, "RAY_ADDRESS": ray_nodes.address, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rsray.pipelines.sweep", str(sweep_file)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def both_trials_trained_an_epoch() -> bool:
            runs = _trial_runs(client)
            return len(runs) == 2 and all(_epochs_logged(client, run_id) for run_id in runs)

        wait_until(both_trials_trained_an_epoch, proc, log, "an epoch in both trials", timeout=300)
        lose_the_worker_node(ray_nodes)
        at_loss = {run_id: len(_epochs_logged(client, run_id)) for run_id in _trial_runs(client)}
        assert all(done < EPOCHS for done in at_loss.values()), f"a trial ended before the node loss: {at_loss}"
        add_a_node(ray_nodes)
        code = proc.wait(timeout=420)
    finally:
        proc.kill()
    assert code == 0, log.read_text()[-4000:]
    runs = _trial_runs(client)
    assert len(runs) == 2, f"one child run per trial, got {sorted(r.data.tags[TAG_TRIAL] for r in runs.values())}"
    for run_id, run in runs.items():
        assert run.info.status == "FINISHED", (run.data.tags[TAG_TRIAL], run.info.status)
        assert sorted(_epochs_logged(client, run_id)) == list(range(EPOCHS)), run.data.tags[TAG_TRIAL]
    print(f"\nepochs logged per trial at the node loss: {sorted(at_loss.values())}")
