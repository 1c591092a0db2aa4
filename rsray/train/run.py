"""Ray Train: one model trained data-parallel (DDP) on `train.num_workers` workers.

    result = train(load_config("train/cpu-tiny"))   # ensures Ray, fits, returns ray.train.Result

`train` reads top to bottom: train the earlier stages a model starts from (`stages`), take the run
name's lock (`run_folder`), check everything once into a `RunPlan` (`plan`), open the MLflow run,
build the TorchTrainer over the training stream (`rsray.data.stream`) with the worker function
(`worker`) and fit it with Ctrl-C handled here; then record what a person opens in MLflow
(`records`). Where the workers run and how many is `scaling`'s.

Every epoch every worker calls `ray.train.report`; rank 0 attaches a checkpoint folder
(`rsray.checkpoint.write_checkpoint`: `state.pt` and the resolved `config.yaml`). A restarted
worker group resumes from `ray.train.get_checkpoint()` at the next epoch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from typing import Any

from rsray import storage
from rsray.config import Config
from rsray.train.errors import TrainingFailed, TrainingInterrupted, error_summary
from rsray.train.plan import RunPlan, absolute_paths, default_run_name, preflight
from rsray.train.scaling import check_every_node_sees_the_paths
from rsray.train.stages import train_earlier_stages

__all__ = ["TrainingFailed", "TrainingInterrupted", "build_trainer", "train"]

log = logging.getLogger("rsray.train")

WORKER_GROUP_START_RETRIES = 2  # Ray Train's default retries a worker group that cannot start forever


def train(cfg: Config, tracker=None, callbacks: Sequence[Any] = (), score_test: bool = True):
    """Start or join Ray, train, record the run in MLflow (`tracking.enabled`), and return the
    `ray.train.Result` (raises TrainingFailed). The driver owns the MLflow run; each epoch is logged
    into it by `EpochLogger` in the Ray Train controller, so a worker-group restart adds no second run. The returned
    Result also carries `mlflow_run_id` and `mlflow_link` (the runs table in the MLflow UI).
    A sweep trial passes its own `tracker` (its child run, which this function ends) and
    `callbacks` for `build_trainer`, and `score_test=False`: a sweep scores only its best
    checkpoint on the test split, so no trial's test numbers are there to select by."""
    from ray.train import TrainingFailedError

    from rsray.runtime import configure_data_context, ensure_ray
    from rsray.tracking import NullTracker, Tracker
    from rsray.train.records import log_data_input, log_earlier_epochs, log_run_artifacts, run_tags
    from rsray.train.run_folder import RunLock

    check_every_node_sees_the_paths(cfg)  # before the run lock writes into train.storage_path
    cfg = absolute_paths(train_earlier_stages(cfg, train))
    if not cfg.train.run_name:
        cfg.train.run_name = default_run_name(cfg)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(RunLock(cfg))  # one live run per name: two would mix their checkpoints
            plan = preflight(cfg)  # before the MLflow run opens: a refused run leaves none behind
        except BaseException as exc:
            if tracker is not None:  # a sweep trial's own run
                tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        if tracker is None:
            tracker = NullTracker()
            if cfg.tracking.enabled:  # an unreachable server fails here, before any worker starts
                tracker = Tracker.start(
                    cfg.tracking,
                    cfg.train.run_name,
                    params=cfg.to_dict(),
                    tags=run_tags(cfg, plan.manifest),
                )
        name = cfg.train.run_name
        tracker.log_params({f"weights.{key}": found for key, found in plan.weights.items()})
        for orphan in tracker.end_orphans(name, plan.cfg.train.storage_path):  # we hold the run's lock
            log.warning("MLflow run %s of %r was left RUNNING by a driver that died: marked KILLED", orphan, name)
        log_data_input(tracker, plan.cfg, plan.manifest)
        try:  # from here on, whatever stops the run ends its MLflow run too (never left RUNNING)
            ensure_ray()
            configure_data_context()  # the train stream's order is fixed for a seed: a config reproduces its run
            trainer = build_trainer(plan, mlflow_run_id=tracker.run_id, callbacks=callbacks)
            result = fit_stopping_on_ctrl_c(trainer)
            if result.error:  # fit() raises in Ray 2.60; kept in case a version returns the error instead
                raise TrainingFailed(f"training run {name} failed: {error_summary(result.error)}")
        except TrainingFailedError as exc:
            tracker.end("FAILED")
            raise TrainingFailed(f"training run {name} failed: {error_summary(exc)}") from exc
        except KeyboardInterrupt:
            tracker.end("KILLED")
            raise TrainingInterrupted(
                f"run {name} stopped; its last checkpoint is kept: the same command resumes it"
            ) from None
        except BaseException:
            tracker.end("FAILED")
            raise
        # Training is done and its checkpoints are registered: nothing below may fail the run. A
        # tracking outage is collected by the tracker and reported once (`result.tracking_outage`).
        # The run lock is held until the MLflow run has ended: a RUNNING run whose folder nobody
        # holds was left by a dead driver, which the next command on the folder ends as KILLED.
        try:
            log_earlier_epochs(tracker, result.return_value or [])
            log_run_artifacts(tracker, cfg, plan.manifest, result, score_test)
        except Exception as exc:  # e.g. the best checkpoint cannot be fetched from storage just now
            log.warning("the run's artifacts were not logged to MLflow: %s", error_summary(exc))
            tracker.not_logged.append("run artifacts")
        finally:  # even a Ctrl-C here: the training itself finished
            tracker.end("FINISHED")
    result.mlflow_run_id, result.mlflow_link = tracker.run_id, tracker.ui_link()
    result.tracking_outage = tracker.outage()
    return result


def build_trainer(plan: RunPlan, mlflow_run_id: str | None = None, callbacks: Sequence[Any] = ()):
    """The TorchTrainer of a checked run (does not start training). `callbacks`: Ray Train
    UserCallbacks, e.g. the one a sweep trial uses to pass each epoch's metrics on to Ray Tune."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

    from rsray.data.stream import train_dataset
    from rsray.train.loop import selection_metric
    from rsray.train.records import EpochLogger
    from rsray.train.worker import train_loop_per_worker

    cfg, tc = plan.cfg, plan.cfg.train
    store = storage.resolve(tc.storage_path)
    run_config = RunConfig(
        name=tc.run_name,
        storage_path=store.path,
        storage_filesystem=store.fs if storage.is_s3(tc.storage_path) else None,
        failure_config=FailureConfig(max_failures=tc.max_failures, controller_failure_limit=WORKER_GROUP_START_RETRIES),
        checkpoint_config=CheckpointConfig(
            num_to_keep=tc.keep_checkpoints,
            checkpoint_score_attribute=selection_metric(plan.model),
            checkpoint_score_order="max",
        ),
        callbacks=([EpochLogger(cfg.tracking, mlflow_run_id)] if mlflow_run_id else []) + list(callbacks) or None,
    )
    return interruptible_trainer_class()(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "manifest": plan.manifest,
            "mlflow_run_id": mlflow_run_id,
            "weights": plan.weights,
        },
        scaling_config=ScalingConfig(
            num_workers=tuple(tc.num_workers) if tc.elastic else tc.num_workers,
            elastic_resize_monitor_interval_s=tc.elastic_resize_s,
            use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker, **tc.worker_resources},
            placement_strategy=tc.placement.upper(),
        ),
        run_config=run_config,
        datasets={"train": train_dataset(cfg, plan.manifest, first_epoch=plan.start_epoch)},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def fit_stopping_on_ctrl_c(trainer):
    """`trainer.fit()`; the first Ctrl-C raises KeyboardInterrupt here, and `stop_ray_work` ends
    this driver's Ray work, which stops the controller and the workers it owns. The caller marks
    the run KILLED. The trainer is `interruptible_trainer_class()`'s, so Ray Train leaves Python's
    SIGINT handler in place (in a sweep, trials run off the main thread, where it installs none)."""
    try:
        return trainer.fit()
    except KeyboardInterrupt:
        stop_ray_work()
        raise


@functools.cache
def interruptible_trainer_class():
    """TorchTrainer without Ray Train's own SIGINT handler.

    On the main thread Ray Train 2.60 installs a handler that asks the controller to wind down and
    returns; measured: one Ctrl-C ended `rsray train` with exit 1 and no message, the MLflow run
    FAILED. Running fit() in a helper thread instead (rsray until 2026-12-07) raced: `ray.shutdown()`
    while that thread was still inside `ray.get` let Ray's core worker end the process with exit 1
    ("The core worker has already been shutdown"; one fresh-clone test run in three hit it). With
    Python's handler a Ctrl-C interrupts fit()'s `ray.get` on the main thread and unwinds it
    before Ray is shut down. The hook is private: if a Ray release drops it, this refuses to train
    rather than lose Ctrl-C (the Ctrl-C test fails too)."""
    from ray.train.torch import TorchTrainer

    if not callable(getattr(TorchTrainer, "_register_sigint_handler", None)):
        raise RuntimeError("this Ray Train has no _register_sigint_handler: rsray cannot keep Ctrl-C its own")

    class InterruptibleTorchTrainer(TorchTrainer):
        def _register_sigint_handler(self, controller) -> None:
            """Keep Python's handler: Ctrl-C raises KeyboardInterrupt inside fit()."""

    return InterruptibleTorchTrainer


def stop_ray_work() -> None:
    """End this driver's connection to Ray: Ray stops the actors the driver owns (the Train
    controller, and with it the workers), or the whole local Ray when this process started it."""
    import ray

    ray.shutdown()
