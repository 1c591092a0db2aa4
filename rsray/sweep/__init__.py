"""Hyperparameter sweeps: Ray Tune over full Ray Train runs, recorded in MLflow as one parent run
with one child run per trial.

    sweep = load_sweep("sweep/swan-margin", ["train.epochs=20", "sweep.search.num_samples=8"])
    report = run_sweep(sweep)      # what `rsray sweep` prints

A sweep file is a training config (the same `defaults:` chain and sections `rsray train` reads)
plus a `sweep:` section: the search space over any config key, the search algorithm, the
scheduler and where results go (`SweepSettings`). Command-line `key=value` overrides go to the
training config, or to the sweep section when the key starts with `sweep.`.

    sweep:
      space:
        model.margin: {grid: [0.1, 0.2, 0.3]}       # every value, in this order
        model.lr: {loguniform: [1.0e-5, 1.0e-3]}    # also uniform, choice: [...], randint: [lo, hi]
      search: {algorithm: auto, num_samples: 4, seed: 0}
      scheduler: {name: asha, grace_period: 2, reduction_factor: 2}

How a trial runs
----------------
Tune calls `trials._train_trial` once per trial inside a small actor, the trial's driver. It builds the
trial's config, opens (or, after an interruption, finds again) the trial's MLflow child run and
calls `rsray.train.run.train` on it with `_EpochsToTune`, Ray's `TuneReportCallback` (the
documented bridge: Train V2 rejects Tune callbacks) plus an `epochs_done` count that ASHA uses as
its clock. Rank 0 of the trial's Train workers logs every epoch into the child run, as in any
training run. When ASHA stops a trial, Tune ends its actor and with it the Train controller and
workers that actor owns. An evaluation-only sweep (`kind: smr`) scores one checkpoint once and
lets every trial re-rank that score matrix with its own SMR K, w and beta.

Resuming
--------
Everything lives under `<storage_path>/<name>`: Tune's experiment state, one Ray Train run per
trial (`trials/<trial id>`) and `rsray_sweep.json` (the sweep's id and spec). Started again, a
sweep restores Tune from there (`Tuner.restore`): finished trials stay finished, interrupted ones
restart and their Train runs resume from their last checkpoint. MLflow runs carry the tags
`sweep_id`, `sweep_role` and `trial_id`, so the parent and every child are found again instead of
opened twice. A trial whose Train run had already finished replays its recorded epochs to Tune
without training. Tune does not save its scheduler; ASHA's rungs are refilled from what Tune
recorded of each trial's results, so early stopping after a resume still compares every trial.

The parts, one concern each: `spec` (the sweep file, checked), `search` (Tune's search algorithm,
scheduler and concurrency), `trials` (what runs in a trial), `driver` (`run_sweep`), `reconcile`
(MLflow child runs after the trials), `report` (summaries and the parent run's record), `figures`.
Ray, MLflow, the models and training are imported inside the functions that use them, so loading
and checking a sweep file (`rsray sweep --help`, a config error) starts in a fraction of a second.
"""

from rsray.sweep.driver import SweepInterrupted, run_sweep
from rsray.sweep.report import SweepReport, best_trial
from rsray.sweep.spec import (
    TAG_EARLY,
    TAG_ROLE,
    TAG_SWEEP,
    TAG_TRIAL,
    Param,
    Sweep,
    load_sweep,
    resolved_algorithm,
    resolved_scheduler,
    trial_config,
)
from rsray.sweep.summary import TrialSummary

__all__ = [
    "TAG_EARLY",
    "TAG_ROLE",
    "TAG_SWEEP",
    "TAG_TRIAL",
    "Param",
    "Sweep",
    "SweepInterrupted",
    "SweepReport",
    "TrialSummary",
    "best_trial",
    "load_sweep",
    "resolved_algorithm",
    "resolved_scheduler",
    "run_sweep",
    "trial_config",
]
