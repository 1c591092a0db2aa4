"""Sweeps end to end: Ray Tune over Ray Train runs with ASHA, recorded on a real MLflow server.

One sweep serves every test here, because the trials are the expensive part: 2 trials over
model.lr (one that learns in an epoch, one too small to move the weights), each a 2-worker Ray
Train run of 2 epochs, ASHA after the first epoch, one trial at a time. It is started as
`python -m rsray.pipelines.sweep` in a subprocess joined to this module's Ray, killed with SIGKILL
(a crashed driver) as soon as its second trial has begun (the first finished), and then resumed by
running the same sweep again in this process: the second trial runs again in its MLflow run, and
ASHA stops it against the first trial's result, which the resumed sweep put back in its rungs.
(Until 2026-12-06 the space also crossed train.num_workers 1 and 2: four trials, two more Train
runs and about a minute; sweeping a train key is `tests/unit/test_sweep.py`'s, and a 1-worker trial
is the node-loss sweep's.)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from rsray.config import CONF_DIR, load_config
from rsray.sweep import TAG_EARLY, TAG_ROLE, TAG_SWEEP, TAG_TRIAL, load_sweep, run_sweep
from tests.credentials import PASSWORD, with_password

pytestmark = pytest.mark.integration

GOOD_LR, TOO_SMALL_LR = 3.0e-3, 1.0e-8
EPOCHS = 2
EXPERIMENT = "sweep-test"


@pytest.fixture(scope="module")
def sweep_file(prepared, tmp_path_factory, mlflow_server) -> Path:
    folder = tmp_path_factory.mktemp("sweep")
    path = folder / "lr-workers.yaml"
    path.write_text(f"""
defaults: [{CONF_DIR / "train" / "cpu-tiny.yaml"}]
train: {{data: {prepared}, epochs: {EPOCHS}, storage_path: {folder / "runs"}, num_workers: 2}}
tracking: {{uri: "{with_password(mlflow_server)}", experiment: {EXPERIMENT}, system_metrics: false}}
sweep:
  space:
    model.lr: {{grid: [{GOOD_LR}, {TOO_SMALL_LR}]}}
  scheduler: {{name: asha, grace_period: 1, reduction_factor: 2}}
  max_concurrent_trials: 1
""")
    return path


def _children(client, sweep_id=None, experiment_id=None):
    runs = client.search_runs(
        [experiment_id or client.get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.{TAG_ROLE} = 'trial'" + (f" and tags.{TAG_SWEEP} = '{sweep_id}'" if sweep_id else ""),
    )
    return {r.data.tags[TAG_TRIAL]: r for r in runs}


def _checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("checkpoint_*"))


class _Recorded(logging.Handler):
    """The sweep driver's log lines, kept (caplog is per test; the resume runs once per module)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def swept(sweep_file, ray_cluster, mlflow_server):
    """Run, kill and resume the sweep; return the report and what MLflow held at the kill."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    log = sweep_file.parent / "interrupted.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rsray.pipelines.sweep", str(sweep_file)],
            cwd=sweep_file.parent,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline, experiment = time.monotonic() + 600, None
        while True:  # one request a poll once the experiment exists (three before; the server's CPU is the suite's)
            assert proc.poll() is None, f"the sweep ended before it was interrupted:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no second trial after 600 s:\n{log.read_text()[-3000:]}"
            experiment = experiment or client.get_experiment_by_name(EXPERIMENT)
            children = _children(client, experiment_id=experiment.experiment_id) if experiment else {}
            if len(children) >= 2:
                break
            time.sleep(0.5)
        time.sleep(3)  # a moment for Tune to save its state (sweep.state_save_s = 2), not enough for an epoch
    finally:
        proc.kill()
        proc.wait(timeout=30)
    at_kill = _children(client)
    trials = sweep_file.parent / "runs" / "sweeps" / "lr-workers" / "trials"
    *done, _running = sorted(at_kill)  # one trial at a time: all but the newest had ended
    checkpoints = {trial_id: _checkpoints(trials / trial_id) for trial_id in done}
    interrupted_s = time.perf_counter() - started

    started = time.perf_counter()
    refilled, sweep_log = _Recorded(), logging.getLogger("rsray.sweep")
    level = sweep_log.level
    sweep_log.addHandler(refilled)
    sweep_log.setLevel(logging.INFO)
    try:
        report = run_sweep(load_sweep(sweep_file))
    finally:
        sweep_log.removeHandler(refilled)
        sweep_log.setLevel(level)
    print(f"\nsweep: {interrupted_s:.0f} s until the kill, {time.perf_counter() - started:.0f} s to resume and finish")
    return SimpleNamespace(
        report=report,
        at_kill=at_kill,
        done=done,
        checkpoints=checkpoints,
        trials=trials,
        client=client,
        refilled=refilled.messages,
    )


def test_resumed_sweep_reuses_runs_and_does_not_redo_finished_trials(swept):
    report, client = swept.report, swept.client
    assert report.resumed and len(report.trials) == 2
    sweep_id = next(iter(swept.at_kill.values())).data.tags[TAG_SWEEP]
    children = _children(client, sweep_id)
    assert sorted(children) == sorted(t.trial_id for t in report.trials)  # one run per trial, none twice
    for trial_id, before in swept.at_kill.items():
        assert children[trial_id].info.run_id == before.info.run_id  # found again by its tags
    assert swept.at_kill[swept.done[0]].info.status == "FINISHED"
    assert children[swept.done[0]].info.end_time == swept.at_kill[swept.done[0]].info.end_time
    for trial_id in swept.done:  # ASHA compares the trials left with those that had ended
        assert any(f"of trial {trial_id} back in its rungs" in m for m in swept.refilled), swept.refilled
    for trial_id in swept.done:  # trials that had ended were not trained again
        assert swept.checkpoints[trial_id] and _checkpoints(swept.trials / trial_id) == swept.checkpoints[trial_id]
    parents = client.search_runs(
        [children[swept.done[0]].info.experiment_id],
        filter_string=f"tags.{TAG_SWEEP} = '{sweep_id}' and tags.{TAG_ROLE} = 'parent'",
    )
    assert len(parents) == 1 and parents[0].info.run_id == report.parent_run_id
    for trial_id, run in children.items():  # every epoch logged once, also across the interruption
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/mR")]
        assert steps == sorted(set(steps)) and steps == list(range(len(steps))), trial_id


def test_parent_run_holds_the_comparison_and_child_runs_their_trials(swept):
    report, client = swept.report, swept.client
    parent = client.get_run(report.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.space.model.lr"] == f"grid({GOOD_LR!r}, {TOO_SMALL_LR!r})"
    assert parent.data.params["sweep.scheduler"] == "asha" and parent.data.params["sweep.algorithm"] == "grid"
    assert parent.data.params["best.trial_id"] == report.best.trial_id
    assert float(parent.data.params["best.model.lr"]) == report.best.params["model.lr"]
    assert parent.data.metrics["best/val/mR"] == pytest.approx(report.best.best)
    assert "best/test/mR" in parent.data.metrics and "best/test_smr/mR" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(report.parent_run_id)}
    assert {"trials.csv", "best_config.yaml", "best_test.json", "sweep.json", "figures"} <= artifacts
    table = client.download_artifacts(report.parent_run_id, "trials.csv")
    assert len(Path(table).read_text().strip().splitlines()) == 1 + 2

    children = _children(client, parent.data.tags[TAG_SWEEP])
    workers = set()
    for trial in report.trials:
        run = children[trial.trial_id]
        assert run.data.tags["mlflow.parentRunId"] == report.parent_run_id
        assert run.info.status == "FINISHED"
        assert float(run.data.params["model.lr"]) == trial.params["model.lr"]
        assert int(run.data.params["train.num_workers"]) == 2
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml"}
        assert not any(key.startswith("test") for key in run.data.metrics)  # only the sweep's best sees test
        assert run.inputs.dataset_inputs[0].dataset.name  # each trial records the data it used
        workers.add(int(run.data.metrics["workers"]))
    assert workers == {2}  # trials are themselves multi-worker Ray Train runs


def test_trials_asha_stopped_are_marked(swept):
    """A trial is early-stopped exactly when ASHA ended it before its last epoch; the weights that
    cannot move (lr 1e-8) fall below the trial that learned, so ASHA stops at least one."""
    report, client = swept.report, swept.client
    children = _children(client, client.get_run(report.parent_run_id).data.tags[TAG_SWEEP])
    stopped = []
    for trial in report.trials:
        run = children[trial.trial_id]
        epochs_logged = len(client.get_metric_history(run.info.run_id, "val/mR"))
        assert trial.epochs_done == epochs_logged
        assert run.data.tags[TAG_EARLY] == str(epochs_logged < EPOCHS).lower() == str(trial.early_stopped).lower()
        if trial.early_stopped:
            stopped.append(trial)
    assert stopped
    assert report.best.params["model.lr"] == GOOD_LR and not report.best.early_stopped


def test_no_credential_reaches_the_sweep_folder_the_console_or_mlflow(swept, sweep_file, mlflow_server, tmp_path):
    """The sweep's tracking URI carries a password: no file Ray Tune or rsray wrote under the
    sweep's folder (Tune's state, trial checkpoints, the best config), no console line of the
    interrupted `rsray sweep`, and nothing in the parent run holds it."""
    import mlflow.artifacts

    report = swept.report
    files = [p for p in sweep_file.parent.rglob("*") if p.is_file() and p != sweep_file]
    assert any(p.name == "config.yaml" for p in files) and Path(report.best_config) in files
    parent = swept.client.get_run(report.parent_run_id)
    texts = {str(p): p.read_bytes().decode("latin-1") for p in files}
    texts["parent params"] = json.dumps(parent.data.params)
    downloaded = Path(
        mlflow.artifacts.download_artifacts(
            run_id=parent.info.run_id, dst_path=str(tmp_path), tracking_uri=mlflow_server
        )
    )
    texts.update({str(p): p.read_bytes().decode("latin-1") for p in downloaded.rglob("*") if p.is_file()})
    assert [where for where, text in texts.items() if PASSWORD in text] == []
    assert "rsray-user:***@" in load_config(report.best_config).tracking.uri


def test_best_config_trains_again_to_the_same_validation_mr(swept, tmp_path):
    """`rsray train` reads the written config; training it again gives the best trial's val mR.
    Trials fix Ray Data's batch order (sweep.deterministic_data) and so does this run: with the same
    seeds and order on CPU the computation repeats exactly (measured: equal to the last digit for 1
    and 2 workers), so the tolerance only absorbs float round-off."""
    from ray.data import DataContext

    from rsray.runtime import configure_data_context
    from rsray.train.run import train

    report = swept.report
    cfg = load_config(
        report.best_config, [f"train.storage_path={tmp_path}", "train.run_name=reproduce", "tracking.enabled=false"]
    )
    assert cfg.model["lr"] == report.best.params["model.lr"] and cfg.train.num_workers == 2
    options = DataContext.get_current().execution_options
    preserve_order = options.preserve_order
    configure_data_context()
    try:
        history = train(cfg).return_value
    finally:
        options.preserve_order = preserve_order
    reproduced = history[report.best.best_epoch - 1]["val/mR"]
    assert reproduced == pytest.approx(report.best.best, abs=1e-6)


def test_smr_sweep_reranks_the_best_checkpoint_without_training(swept, tmp_path, mlflow_server):
    """The evaluation-only sweep: one checkpoint scored once, each trial re-ranks the scores."""
    report = swept.report
    path = tmp_path / "smr.yaml"
    path.write_text(f"""
tracking: {{uri: "{mlflow_server}", experiment: {EXPERIMENT}-smr, system_metrics: false}}
sweep:
  kind: smr
  checkpoint: {report.best_checkpoint}
  storage_path: {tmp_path / "sweeps"}
  space:
    smr.k: {{grid: [5, 30]}}
""")
    smr = run_sweep(load_sweep(path))
    assert [t.params["smr.k"] for t in smr.trials] == [5, 30] and all(t.status == "finished" for t in smr.trials)
    assert not (tmp_path / "sweeps" / "smr" / "trials").exists()  # nothing was trained
    written = yaml.safe_load(Path(smr.best_config).read_text())
    assert written["smr"]["k"] == smr.best.params["smr.k"] and written["checkpoint"] == report.best_checkpoint
    assert "mR" in smr.test["smr_metrics"] and smr.test["metrics"] == pytest.approx(report.test["metrics"])
    children = swept.client.search_runs(
        [swept.client.get_experiment_by_name(f"{EXPERIMENT}-smr").experiment_id],
        filter_string=f"tags.{TAG_ROLE} = 'trial'",
    )
    assert sorted(int(r.data.params["smr.k"]) for r in children) == [5, 30]
    assert all(r.data.tags["mlflow.parentRunId"] == smr.parent_run_id for r in children)


def test_a_space_with_no_grid_is_searched_by_optuna_in_real_trials(swept, tmp_path, mlflow_server):
    """Optuna's TPE, the default for a space with no grid key, suggesting every trial of a real
    Tune run (evaluation-only trials, so it is quick); each trial's values come from the space.
    Two trials: each is a Tune trial process of its own (about 10 s of CPU here), and two already
    show values drawn, not repeated (four until 2026-12-07)."""
    path = tmp_path / "smr-optuna.yaml"
    path.write_text(f"""
tracking: {{uri: "{mlflow_server}", experiment: {EXPERIMENT}-optuna, system_metrics: false}}
sweep:
  kind: smr
  checkpoint: {swept.report.best_checkpoint}
  storage_path: {tmp_path / "sweeps"}
  space:
    smr.k: {{choice: [5, 10, 30]}}
    smr.w: {{uniform: [0.0, 2.0]}}
  search: {{num_samples: 2, seed: 0}}
""")
    smr = run_sweep(load_sweep(path))
    assert swept.client.get_run(smr.parent_run_id).data.params["sweep.algorithm"] == "optuna"
    assert len(smr.trials) == 2 and all(t.status == "finished" for t in smr.trials)
    assert all(t.params["smr.k"] in (5, 10, 30) and 0.0 <= t.params["smr.w"] <= 2.0 for t in smr.trials)
    assert len({t.params["smr.w"] for t in smr.trials}) == 2  # drawn, not repeated
    assert smr.best.best == max(t.best for t in smr.trials)
