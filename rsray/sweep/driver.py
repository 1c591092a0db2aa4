"""The sweep's driver: claim (or resume) the sweep folder, open the MLflow parent run, run every
trial with Tune, then reconcile the child runs and record the outcome."""

from __future__ import annotations

import copy
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from rsray import storage
from rsray.config import Config
from rsray.sweep.reconcile import reconcile_child_runs
from rsray.sweep.report import SweepReport, best_trial, record_outcome, summarize
from rsray.sweep.search import make_scheduler, make_search_algorithm, max_concurrent_trials
from rsray.sweep.spec import (
    SPEC_FILE,
    TAG_ROLE,
    TAG_SWEEP,
    TRIALS_FOLDER,
    Sweep,
    join_uri,
    resolved_algorithm,
    resolved_scheduler,
)
from rsray.sweep.trials import TrialContext, make_trainable

log = logging.getLogger(__name__)


def run_sweep(sweep: Sweep) -> SweepReport:
    """Start (or resume) the sweep, wait for every trial, then record and return the outcome."""
    import ray
    from ray import tune

    from rsray.runtime import ensure_ray
    from rsray.tracking import NullTracker, Tracker

    ensure_ray()
    folder = storage.resolve(sweep.folder)
    sweep_id, resumed = claim_folder(sweep, folder)
    base = _prepared_base(sweep)
    s = sweep.settings
    concurrency = max_concurrent_trials(sweep, ray.cluster_resources())
    scored, trained = _smr_scores(sweep) if s.kind == "smr" else (None, base)  # `trained`: whose model this is
    run_tags = {"model": trained.model.get("name", ""), "dataset": trained.data.name, "sweep": sweep.name}

    parent = NullTracker()
    if base.tracking.enabled:
        parent = Tracker.start_or_resume(
            base.tracking,
            sweep.name,
            key_tags={TAG_SWEEP: sweep_id, TAG_ROLE: "parent"},
            params=_parent_params(sweep),
            tags={**run_tags, "sweep_folder": sweep.folder},
        )
        parent.set_tags({"max_concurrent_trials": concurrency})
        parent.log_dict(sweep.spec(), "sweep.json")
        parent.log_text(Path(sweep.path).read_text(), f"sweep_file/{Path(sweep.path).name}")
    context = TrialContext(
        sweep_id,
        sweep.name,
        s.kind,
        base.to_dict(),
        join_uri(sweep.folder, TRIALS_FOLDER),
        parent.run_id,
        sweep.metric,
        run_tags,
        s.checkpoint,
        s.deterministic_data,
    )
    trainable = make_trainable(sweep, context, scored)
    keep_credentials_out_of_trial_runtime_envs()
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(s.state_save_s))
    fs = folder.fs if storage.is_s3(sweep.folder) else None
    try:
        if tune.Tuner.can_restore(folder.path, storage_filesystem=fs):
            log.info("resuming sweep %s from %s", sweep.name, sweep.folder)
            tuner = tune.Tuner.restore(
                folder.path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
            )
            resumed = True
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={p.key: p.domain() for p in sweep.params},
                tune_config=tune.TuneConfig(
                    metric=sweep.metric,
                    mode="max",
                    search_alg=make_search_algorithm(sweep, concurrency),
                    scheduler=make_scheduler(sweep),
                    num_samples=s.search.num_samples,
                    reuse_actors=False,
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=sweep.name,
                    storage_path=folder.path.rsplit("/", 1)[0],
                    storage_filesystem=fs,
                    failure_config=tune.FailureConfig(max_failures=s.trial_max_failures),
                    verbose=1,
                ),
            )
        grid = tuner.fit()
    except KeyboardInterrupt:
        parent.end("KILLED")
        raise
    except BaseException:
        parent.end("FAILED")
        raise
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    if unfinished:  # Tune stops on Ctrl-C after saving its state, and returns
        parent.end("KILLED")
        raise SweepInterrupted(
            f"sweep {sweep.name} was interrupted with {unfinished} trial(s) unfinished; "
            f"run the same command again to resume it from {sweep.folder}"
        )
    trials = summarize(grid, sweep)
    reconcile_child_runs(base, sweep_id, trials)
    report = SweepReport(
        sweep.name,
        sweep.folder,
        sweep.metric,
        trials,
        best_trial(trials),
        parent_run_id=parent.run_id,
        mlflow_link=parent.ui_link(),
        resumed=resumed,
    )
    record_outcome(sweep, base, report, parent)
    parent.end("FINISHED" if report.best is not None else "FAILED")
    return report


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial ended (Ctrl-C); its folder holds what it needs to resume."""


def claim_folder(sweep: Sweep, folder) -> tuple[str, bool]:
    """The sweep id stored in the folder (a sweep resumed), or a new one written there first, so an
    interruption at any later point finds the same MLflow runs. A folder holding a different sweep
    is refused rather than mixed."""
    spec_file = folder.join(SPEC_FILE)
    if storage.exists(spec_file):
        stored = json.loads(storage.read_bytes(spec_file))
        if stored["spec"] != sweep.spec():
            changed = sorted(
                k for k in set(stored["spec"]) | set(sweep.spec()) if stored["spec"].get(k) != sweep.spec().get(k)
            )
            raise sweep.error(
                "sweep.name",
                f"{sweep.folder} holds a different sweep (changed: {', '.join(changed)}); "
                f"choose another sweep.name or remove that folder",
            )
        return stored["sweep_id"], True
    sweep_id = uuid.uuid4().hex
    storage.write_bytes(spec_file, json.dumps({"sweep_id": sweep_id, "spec": sweep.spec()}, indent=1).encode())
    return sweep_id, False


def _prepared_base(sweep: Sweep) -> Config:
    """The training config as trials receive it: paths absolute (a trial's driver runs in its own
    trial folder), its prepared data checked against the manifest, and earlier stages (PriorCLIP's
    scene prior) trained once for all trials."""
    from rsray.data.verify import verify_prepared
    from rsray.train.plan import absolute_paths
    from rsray.train.run import train
    from rsray.train.stages import train_earlier_stages

    base = absolute_paths(copy.deepcopy(sweep.base))
    if sweep.settings.kind == "train":  # bad shards are refused once, before any trial starts
        verify_prepared(base.train.data, base.prepare.s3_endpoint, tuple(base.train.verify_checksums))
        if not base.train.run_name:
            base.train.run_name = sweep.name  # names the earlier stages' runs, if any
        base = train_earlier_stages(base, train)
        base.train.run_name = ""
    return base


def _smr_scores(sweep: Sweep):
    """The checkpoint's score matrix on the sweep's split, computed once for every trial, and the
    config the checkpoint was trained with."""
    from rsray.data.loader import read_split
    from rsray.eval.checkpoint import load_checkpoint
    from rsray.eval.split import score_split
    from rsray.models import model_config

    model, cfg, _ = load_checkpoint(sweep.settings.checkpoint)
    table = read_split(cfg.train.data, sweep.settings.split, cfg.prepare.s3_endpoint)
    scored = score_split(model, table, model_config(cfg).augment)
    scored.image_features = scored.text_features = None  # trials need only the scores
    return scored, cfg


def _parent_params(sweep: Sweep) -> dict[str, Any]:
    s = sweep.settings
    asha = (
        {
            "grace_period": s.scheduler.grace_period,
            "reduction_factor": s.scheduler.reduction_factor,
            "max_t": sweep.max_epochs,
        }
        if resolved_scheduler(sweep) == "asha"
        else {}
    )
    smr = {"checkpoint": s.checkpoint, "split": s.split} if s.kind == "smr" else {}
    return {
        "sweep": {
            "kind": s.kind,
            "metric": sweep.metric,
            "algorithm": resolved_algorithm(sweep),
            "num_samples": s.search.num_samples,
            "seed": s.search.seed,
            "scheduler": resolved_scheduler(sweep),
            **asha,
            **smr,
            "space": {p.key: p.describe() for p in sweep.params},
        }
    }


def _trial_dirname(trial) -> str:
    return trial.trial_id


def keep_credentials_out_of_trial_runtime_envs() -> None:
    """Ray Tune copies the driver's AWS keys into every trial actor's `runtime_env` env_vars, which
    Ray's runtime-env agent writes whole into its log and the dashboard shows (found by the secret
    scan of tests/integration/test_train.py: the S3 secret key in Ray's logs after a sweep). A
    trial inherits its node's environment like every other Ray worker, where the keys already are
    (a Secret, an env file, an instance profile), so the copy adds nothing but the leak. Tune's
    list is a module constant of Ray 2.60 (`ray.tune.execution.class_cache`)."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(
        name for name in class_cache.ENV_VARS_TO_PROPAGATE if not name.startswith("AWS_")
    )
