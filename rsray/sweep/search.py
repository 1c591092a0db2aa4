"""Tune's side of a sweep: how many trials run at once, the search algorithm that draws their
values (Tune's grid/random generator or Optuna's TPE) and the scheduler that stops them early (ASHA,
with its rungs refilled when a sweep resumes)."""

from __future__ import annotations

import json
import logging
from typing import Any

from rsray.sweep.spec import EPOCHS_DONE, Sweep, candidates, resolved_algorithm, resolved_scheduler

log = logging.getLogger(__name__)


def max_concurrent_trials(sweep: Sweep, cluster: dict[str, float]) -> int:
    """Trials that fit at once: each needs its driver actor (`trial_cpus`) plus num_workers Train
    workers of `cpus_per_worker` (and one GPU each with use_gpu), counted for the largest worker
    count the space allows; `reserve_cpus` stay free for Ray Data. At least 1. An evaluation-only
    trial takes one CPU."""
    s = sweep.settings
    if s.max_concurrent_trials:
        return s.max_concurrent_trials
    cpus = float(cluster.get("CPU", 0)) - s.reserve_cpus
    if s.kind == "smr":
        return max(1, int(cpus))
    workers = max(
        max(value) if isinstance(value, list) else value  # an elastic [min, max]: its max
        for value in candidates(sweep, "train.num_workers", sweep.base.train.num_workers)
    )
    per_worker = max(candidates(sweep, "train.cpus_per_worker", sweep.base.train.cpus_per_worker))
    fits = int(cpus / (s.trial_cpus + workers * per_worker) + 1e-9)  # 3 / 0.75 is 4, not 3.99...
    if any(candidates(sweep, "train.use_gpu", sweep.base.train.use_gpu)):
        fits = min(fits, int(float(cluster.get("GPU", 0)) // workers))
    return max(1, fits)


def make_search_algorithm(sweep: Sweep, concurrency: int):
    """Tune's variant generator (grid and random), or Optuna's TPE; both hold at most
    `concurrency` trials in flight (Tune ignores TuneConfig's limit for a variant generator)."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if resolved_algorithm(sweep) == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=sweep.settings.search.seed), max_concurrent=concurrency)
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=sweep.settings.search.seed)


def make_scheduler(sweep: Sweep):
    from ray.tune.schedulers import FIFOScheduler

    if resolved_scheduler(sweep) == "fifo":
        return FIFOScheduler()
    s = sweep.settings.scheduler
    return _asha_keeping_rungs(
        time_attr=EPOCHS_DONE, max_t=sweep.max_epochs, grace_period=s.grace_period, reduction_factor=s.reduction_factor
    )


def _asha_keeping_rungs(**asha_options):
    """ASHA that refills its rungs when a sweep resumes. Tune saves no scheduler state: it re-adds
    every restored trial to a fresh scheduler, so the trials left would be compared only with those
    that report after the resume. Here each re-added trial replays, in order, the results Tune had
    recorded for it before the interruption (`recorded_results`)."""
    from ray.tune.schedulers import ASHAScheduler

    class ASHAKeepingRungs(ASHAScheduler):
        def on_trial_add(self, tune_controller, trial):
            super().on_trial_add(tune_controller, trial)
            bracket = self._trial_info[trial.trial_id]
            replayed = [r for r in recorded_results(trial) if self._time_attr in r and self._metric in r]
            for result in replayed:
                bracket.on_result(trial, result[self._time_attr], self._metric_op * result[self._metric])
            if replayed:
                log.info("ASHA: %d earlier result(s) of trial %s back in its rungs", len(replayed), trial.trial_id)

    return ASHAKeepingRungs(**asha_options)


def recorded_results(trial) -> list[dict[str, Any]]:
    """Every result Tune recorded for a restored trial (the JSON lines of result.json in the
    trial's folder, local or s3://); [] for a trial that has not reported yet."""
    from ray.tune.result import EXPR_RESULT_FILE

    if EPOCHS_DONE not in trial.run_metadata.last_result or not trial.storage.trial_dir_name:
        return []  # not `trial.last_result`: Tune fills that with defaults before a trial reports
    try:
        with trial.storage.storage_filesystem.open_input_stream(
            f"{trial.storage.trial_fs_path}/{EXPR_RESULT_FILE}"
        ) as stream:
            text = stream.read().decode()
    except (FileNotFoundError, OSError):
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
