"""MLflow after the trials: every child run given its trial's outcome, and runs no trial owns
retired. Needed because ASHA stops a trial by ending its actor (nobody inside can mark the run) and
an interruption can leave a run opened after Tune's last saved state."""

from __future__ import annotations

import logging

from rsray.config import Config
from rsray.sweep.spec import EPOCHS_DONE, TAG_EARLY, TAG_ROLE, TAG_SWEEP, TAG_TRIAL
from rsray.sweep.summary import TrialSummary

log = logging.getLogger(__name__)


def reconcile_child_runs(base: Config, sweep_id: str, trials: list[TrialSummary]) -> None:
    """Mark every child run with how its trial ended (ASHA stops a trial by ending its actor, so
    nobody inside the trial can), give each run its trial's final status, and retire runs of trials
    Tune no longer knows (opened just before an interruption, after Tune's last saved state)."""
    if not base.tracking.enabled:
        return

    from rsray.tracking import find_runs, mlflow_client, with_retries

    client = mlflow_client(base.tracking.uri)
    runs = {r.data.tags.get(TAG_TRIAL): r for r in find_runs(base.tracking, {TAG_SWEEP: sweep_id, TAG_ROLE: "trial"})}
    known = {t.trial_id for t in trials}
    for trial in trials:
        run = runs.get(trial.trial_id)
        if run is None:
            continue
        trial.run_id = run.info.run_id
        tags = {
            TAG_EARLY: str(trial.early_stopped).lower(),
            "trial_status": trial.status,
            EPOCHS_DONE: str(trial.epochs_done),
        }
        if any(run.data.tags.get(k) != v for k, v in tags.items()):
            for key, value in tags.items():
                with_retries(client.set_tag, run.info.run_id, key, value, retries=base.tracking.retries)
        status = "FAILED" if trial.status == "error" else "FINISHED"
        # left RUNNING by a stopped actor, or FAILED by one interrupted after its training had
        # finished (the resumed trial then replays its checkpoints and never reopens the run)
        if run.info.status != status:
            with_retries(client.set_terminated, run.info.run_id, status, retries=base.tracking.retries)
    for trial_id, run in runs.items():
        if trial_id not in known:
            log.warning("MLflow run %s belongs to no trial of the resumed sweep; deleted (restorable)", run.info.run_id)
            with_retries(client.delete_run, run.info.run_id, retries=base.tracking.retries)
