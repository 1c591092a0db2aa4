"""What runs inside one trial's Tune actor: a full Ray Train run (training sweeps) or one SMR
re-ranking of a shared score matrix (evaluation-only sweeps), each logged into the trial's MLflow
child run, and the bridge that hands every epoch's metrics on to Tune."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rsray import storage
from rsray.config import Config
from rsray.sweep.spec import EPOCHS_DONE, TAG_ROLE, TAG_SWEEP, TAG_TRIAL, Sweep, join_uri, trial_config


@dataclass
class TrialContext:
    """What every trial's driver needs from the sweep (sent once through the object store)."""

    sweep_id: str
    sweep_name: str
    kind: str
    base: dict[str, Any]
    trials_uri: str
    parent_run_id: str | None
    metric: str
    tags: dict[str, str]  # model and dataset, for every child run
    checkpoint: str = ""
    deterministic_data: bool = True


def make_trainable(sweep: Sweep, context: TrialContext, scored=None):
    from ray import tune

    if sweep.settings.kind == "smr":
        return tune.with_resources(tune.with_parameters(_smr_trial, context=context, scored=scored), {"CPU": 1})
    return tune.with_resources(tune.with_parameters(_train_trial, context=context), {"CPU": sweep.settings.trial_cpus})


def _child_tracker(context: TrialContext, cfg: Config, trial_id: str, params: dict[str, Any]):
    from rsray.tracking import NullTracker, Tracker

    if not cfg.tracking.enabled:
        return NullTracker()
    number = trial_id.rsplit("_", 1)[-1]
    return Tracker.start_or_resume(
        cfg.tracking,
        f"{context.sweep_name}-{number}",
        key_tags={TAG_SWEEP: context.sweep_id, TAG_ROLE: "trial", TAG_TRIAL: trial_id},
        params=cfg.to_dict() if context.kind == "train" else params,
        tags=context.tags,
        parent_run_id=context.parent_run_id,
    )


def _train_trial(params: dict[str, Any], context: TrialContext) -> None:
    """One trial of a training sweep (runs in its Tune actor): a full Ray Train run."""
    import ray.tune
    from ray.data import DataContext

    from rsray.console import own_lines_in_workers
    from rsray.train.run import train

    own_lines_in_workers()  # this actor's rsray warnings reach the driver's console on a cluster too
    trial_id = ray.tune.get_context().get_trial_id()
    # This actor builds the trial's Ray Dataset, so its DataContext applies. No progress bars: with
    # trials reading at once they interleave into thousands of lines, and Tune's table is the progress.
    DataContext.get_current().enable_progress_bars = False
    if context.deterministic_data:
        from rsray.runtime import configure_data_context

        configure_data_context()
    cfg = trial_config(context.base, params)
    cfg.train.run_name = trial_id
    cfg.train.storage_path = context.trials_uri
    finished = finished_train_run(join_uri(context.trials_uri, trial_id), cfg.train.epochs)
    if finished is not None:  # trained before the sweep was interrupted: report, do not retrain
        for metrics in finished:
            ray.tune.report(metrics)
        return
    tracker = _child_tracker(context, cfg, trial_id, params)
    tracker.log_dict(cfg.public_dict(), "config.yaml")  # early-stopped trials never reach train()'s artifacts
    # no trial is scored on the test split: the sweep scores its best checkpoint (rsray.sweep.report)
    result = train(cfg, tracker=tracker, callbacks=[_epochs_to_tune(cfg.train.epochs)], score_test=False)
    last = (result.return_value or [result.metrics])[-1]
    ray.tune.report(
        {
            **last,
            EPOCHS_DONE: int(last["epoch"]) + 1,
            "checkpoint_path": result.checkpoint.path if result.checkpoint else None,
        }
    )


def _epochs_to_tune(epochs: int):
    """A Ray Train callback passing each epoch's rank-0 metrics (and checkpoint path) on to Tune,
    plus `epochs_done`: Ray's TuneReportCallback with ASHA's clock added. The last epoch is left to
    the trial function, which reports it once the run has finished: Tune ends a trial as soon as
    it reaches the scheduler's max_t, and ending it inside `fit` would lose the run's closing work
    (artifacts, the child run's final status)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochsToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            rank0 = next((m for m in metrics if "epoch" in m and any(k.startswith("val/") for k in m)), metrics[0])
            if int(rank0["epoch"]) + 1 < epochs:
                super().after_report(run_context, [{**rank0, EPOCHS_DONE: int(rank0["epoch"]) + 1}], checkpoint)

    return EpochsToTune()


def finished_train_run(uri: str, epochs: int) -> list[dict[str, Any]] | None:
    """The per-epoch metrics (as Tune received them) of a Ray Train run folder whose last
    checkpoint is its final epoch; None when the run is missing or unfinished."""
    import ray.train

    from rsray.checkpoint import load_checkpoint_state

    location = storage.resolve(uri)
    try:
        result = ray.train.Result.from_path(location.path, storage_filesystem=location.fs)
    except (RuntimeError, FileNotFoundError, OSError):
        return None
    if not result.metrics or int(result.metrics.get("epoch", -1)) != epochs - 1 or result.checkpoint is None:
        return None
    history = load_checkpoint_state(result.checkpoint).get("history") or []
    paths = {int(m["epoch"]): ckpt.path for ckpt, m in result.best_checkpoints or []}
    replay = []
    for metrics in history:
        epoch = int(metrics["epoch"])
        row = {**metrics, EPOCHS_DONE: epoch + 1}
        if epoch in paths:
            row["checkpoint_path"] = paths[epoch]
        replay.append(row)
    return replay


def _smr_trial(params: dict[str, Any], context: TrialContext, scored) -> None:
    """One trial of an evaluation-only sweep: the shared score matrix re-ranked with this trial's
    SMR settings and measured; nothing is trained."""
    import ray.tune

    from rsray.config import config_from_dict
    from rsray.console import own_lines_in_workers
    from rsray.eval.metrics import retrieval_metrics
    from rsray.eval.rerank import SMRConfig, smr_rerank

    own_lines_in_workers()
    trial_id = ray.tune.get_context().get_trial_id()
    smr = SMRConfig(**{key.split(".")[1]: value for key, value in params.items()})
    metrics = retrieval_metrics(
        smr_rerank(scored.scores, k=smr.k, w=smr.w, beta=smr.beta), scored.caption_image, scored.scenes
    )
    split = context.metric.split("/")[0]
    reported = {f"{split}/{k}": float(v) for k, v in metrics.items()}
    cfg = config_from_dict(context.base)
    tracker = _child_tracker(context, cfg, trial_id, {**params, "checkpoint": context.checkpoint})
    if not (tracker.resumed and tracker.metric_history(context.metric)):  # logged before an interruption
        tracker.log_metrics(reported, step=0)
    tracker.end("FINISHED")
    ray.tune.report({**reported, EPOCHS_DONE: 1})
