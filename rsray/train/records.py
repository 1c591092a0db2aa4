"""What a training run records in MLflow: each epoch as Ray registers its checkpoint (`EpochLogger`,
in the Ray Train controller), the prepared data as the run's dataset input, epochs an earlier run
of the same name trained, and after training the config, curves, best checkpoint, figures, the
logged model and the test split's numbers. Tracking never fails a run: after training, every
failure here is a warning and a line in `tracker.not_logged`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray.train import UserCallback

from rsray.config import Config
from rsray.data.manifest import Manifest
from rsray.train.errors import error_summary

log = logging.getLogger("rsray.train")


def epoch_line(metrics: dict[str, float], epochs: int | None = None) -> str:
    """One readable line for an epoch's metrics (rank 0 logs it live; `rsray train` prints all at the end)."""
    terms = ", ".join(f"{k[len('train/') :]} {v:.4f}" for k, v in metrics.items() if k.startswith("train/"))
    waiting = metrics.get("data_wait_seconds", 0.0) / max(metrics.get("train_seconds", 0.0), 1e-9)
    number = f"{int(metrics['epoch'])}" + (f" of 0..{epochs - 1}" if epochs else "")  # 0-based, as MLflow's step
    return (
        f"epoch {number}: {terms}; lr {metrics['lr']:.2e}; {metrics['pairs_per_s']:.0f} pairs/s "
        f"({waiting:.0%} of it waiting for data); "
        f"val mR {metrics.get('val/mR', float('nan')):.2f} (i2t R@1 {metrics.get('val/i2t_R1', float('nan')):.1f}, "
        f"t2i R@1 {metrics.get('val/t2i_R1', float('nan')):.1f})"
    )


class EpochLogger(UserCallback):
    """Logs each epoch's metrics (rank 0's, which include validation) to the run's MLflow run.

    It runs in the Ray Train controller, after Ray has registered the epoch's checkpoint. That
    makes the MLflow history agree with the checkpoints whatever fails: a worker killed after its
    report but before Ray registered the checkpoint retrains that epoch from the previous
    checkpoint, and the epoch is logged once, when its checkpoint counts (logging from the worker
    would log it twice, measured in the fault test). The controller survives worker-group restarts,
    so nothing is logged by a worker and nothing needs filling in afterwards."""

    def __init__(self, tracking_cfg: Any, run_id: str):
        from rsray.tracking_store import MLFLOW_HTTP_DEFAULTS

        self.tracking_cfg, self.run_id = tracking_cfg, run_id
        self._tracker = None
        # this command's MLflow HTTP settings (retries, timeout; no secret): the controller runs
        # with the cluster's environment, which a setting made for one command does not reach
        self.http_settings = {name: os.environ[name] for name in MLFLOW_HTTP_DEFAULTS if name in os.environ}

    def apply_http_settings(self) -> None:
        """In the controller: the driver's MLflow HTTP settings, before the first request."""
        os.environ.update(self.http_settings)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        from rsray.tracking import Tracker

        if checkpoint is None or not metrics:
            return
        if self._tracker is None:
            from rsray.console import own_lines_in_workers

            own_lines_in_workers()  # a tracking warning here reaches the driver's console on a cluster too
            self.apply_http_settings()
            self._tracker = Tracker.attach(self.tracking_cfg, self.run_id)
        self._tracker.log_metrics(metrics[0], step=int(metrics[0]["epoch"]))


def run_tags(cfg: Config, manifest: Manifest) -> dict[str, str]:
    """The run's `model`, `dataset` (the prepared data's own name, from its manifest) and
    `dataset_digest` tags: what `rsray compare` groups by, so a row never mixes datasets."""
    from rsray.data.verify import data_digest

    return {
        "model": cfg.model.get("name", ""),
        "dataset": manifest.get("dataset") or cfg.data.name,
        "dataset_digest": data_digest(manifest),
    }


def log_data_input(tracker, cfg: Config, manifest: Manifest) -> None:
    """The prepared data as the run's MLflow dataset input: its name, URI, a digest of its shards'
    checksums (`rsray.data.verify.data_digest`) and its split counts, so runs can be filtered by
    exactly which data they used. A tracking failure here is collected, as every other."""
    from rsray.data.verify import data_digest, dataset_profile

    if tracker.run_id is None:
        return
    name = manifest.get("dataset") or cfg.data.name
    tracker.log_dataset(name, data_digest(manifest), cfg.train.data, dataset_profile(manifest), "training")


def log_earlier_epochs(tracker, history: list[dict[str, float]]) -> None:
    """Epochs this MLflow run lacks because they were trained by an earlier run of the same name
    (Ray resumed from its checkpoints): logged from the checkpointed history, so each run's
    curves start at epoch 0. Runs after fit, when no EpochLogger is logging any more."""
    if not history:
        return
    logged = tracker.metric_history("epoch")
    if logged is None:  # the store is away: what it lacks cannot be told (listed in tracker.not_logged)
        return
    logged = {step for step, _ in logged}
    for metrics in history:
        if int(metrics["epoch"]) not in logged:
            tracker.log_metrics(metrics, step=int(metrics["epoch"]))


def log_run_artifacts(tracker, cfg: Config, manifest: Manifest, result, score_test: bool = True) -> None:
    """What a person opens in MLflow after a run: config, final metrics, curves, best checkpoint,
    top-5 retrieval grids and the embedding projection on the validation split, and the best
    checkpoint's test-split numbers, ranks and grids (`result.test_report`)."""
    from rsray.figures import loss_and_mr_curves

    if tracker.run_id is None:  # tracking disabled: nothing to draw the figures for
        return
    history = result.return_value or []
    tracker.log_dict(cfg.public_dict(), "config.yaml")
    tracker.log_dict({"final": result.metrics, "history": history}, "metrics.json")
    if history:
        tracker.log_figure(loss_and_mr_curves(history), "figures/loss_and_mr.png")
    if result.best_checkpoints:
        best = best_checkpoint(result, cfg)
        tracker.set_tags({"best_checkpoint": checkpoint_uri(best)})
        with best.as_directory() as folder:
            if copies_checkpoint(cfg):
                tracker.log_artifact(folder, "best_checkpoint")
            for name, figure in validation_figures(folder, cfg).items():
                tracker.log_figure(figure, f"figures/{name}")
            result.test_report = result.model_id = result.registered_model = None
            if score_test:
                result.model_id, result.registered_model = log_model(tracker, folder, cfg, manifest)
            if score_test and cfg.train.evaluate_test and has_test_split(manifest):
                result.test_report = log_test_evaluation(tracker, folder, cfg, manifest, result.model_id)
            elif score_test and cfg.train.evaluate_test:
                log.info("no test split in %s (a corpus has none): the best checkpoint is not scored", cfg.train.data)


def has_test_split(manifest: Manifest) -> bool:
    """Whether the prepared data has test images to score (a WebDataset corpus has none)."""
    return bool(manifest.get("splits", {}).get("test", {}).get("images"))


def log_model(tracker, checkpoint_folder: str, cfg: Config, manifest: Manifest) -> tuple[str | None, str | None]:
    """The best checkpoint as the run's MLflow model (`rsray.logged_model`), registered when
    `tracking.register_as` names a model: (model id, models:/NAME@ALIAS), None for what was not
    done. Never fails the run."""
    from rsray.logged_model import log_embedding_model

    if not cfg.tracking.log_model:
        return None, None
    try:
        return log_embedding_model(tracker, checkpoint_folder, manifest, cfg)
    except Exception as exc:
        log.warning("the run's MLflow model was not logged: %s", error_summary(exc))
        tracker.not_logged.append("model")
        return None, None


def log_test_evaluation(
    tracker, checkpoint_folder: str, cfg: Config, manifest: Manifest, model_id: str | None = None
) -> dict[str, Any] | None:
    """The best checkpoint scored on the test split, logged into the run (`rsray.eval.record`):
    the numbers a paper reports, where the runs table shows them, linked to the logged model
    (`model_id`) and the data's digest. On the driver's GPU when it has one. Training has finished
    by now, so a failure here is a warning and never fails the run."""
    from rsray.data.verify import data_digest
    from rsray.eval.checkpoint import eval_device, evaluate_loaded, load_checkpoint
    from rsray.eval.record import log_evaluation
    from rsray.figures import split_figures

    try:
        model, checkpoint_cfg, state = load_checkpoint(checkpoint_folder)
        report, scored, table = evaluate_loaded(
            model, checkpoint_cfg, state, checkpoint_folder, "test", device=eval_device("auto")
        )
        figures = split_figures(scored.scores, scored.caption_image, table, seed=cfg.train.seed)  # the grids
    except Exception as exc:
        log.warning("the test split was not evaluated: %s", error_summary(exc))
        tracker.not_logged.append("test evaluation")
        return None
    dataset = (manifest.get("dataset") or cfg.data.name, data_digest(manifest))
    log_evaluation(tracker, report, figures, model_id=model_id, dataset=dataset)
    log.info(
        "test split, best checkpoint (epoch %d): mR %.2f, with SMR %.2f",
        report["epoch"],
        report["metrics"]["mR"],
        report["smr_metrics"]["mR"],
    )
    return report


def checkpoint_uri(checkpoint) -> str:
    """A Ray Train checkpoint's folder as rsray commands take it (s3://bucket/... on S3: Ray keeps
    the path without its scheme)."""
    import pyarrow.fs as pafs

    return f"s3://{checkpoint.path}" if isinstance(checkpoint.filesystem, pafs.S3FileSystem) else checkpoint.path


def copies_checkpoint(cfg: Config) -> bool:
    """Whether the best checkpoint is copied into the run's MLflow artifacts (`tracking.log_checkpoint`)."""
    from rsray import storage

    setting = cfg.tracking.log_checkpoint
    return setting == "always" or (setting == "auto" and not storage.is_s3(cfg.train.storage_path))


def best_checkpoint(result, cfg: Config):
    """The kept checkpoint with the best value of the model's selection metric (val/mR for
    retrieval models, val/accuracy for the scene prior), or None when none was kept."""
    from rsray.models import model_config
    from rsray.train.loop import selection_metric

    if not result.best_checkpoints:
        return None
    return result.get_best_checkpoint(selection_metric(model_config(cfg)), "max")


def validation_figures(checkpoint_folder: str, cfg: Config) -> dict[str, Any]:
    """Retrieval grids and the embedding projection of the best checkpoint on the validation split.
    Training has finished by now, so a failure here is reported on stderr and never fails the run."""
    import sys

    from rsray.data.loader import read_split
    from rsray.eval.checkpoint import eval_device, load_checkpoint
    from rsray.eval.split import score_split
    from rsray.figures import split_figures
    from rsray.models import model_config

    try:
        model, checkpoint_cfg, _ = load_checkpoint(checkpoint_folder)
        table = read_split(cfg.train.data, "val", cfg.prepare.s3_endpoint)
        device = eval_device("auto")  # the driver's GPU when it has one
        scored = score_split(model.to(device), table, model_config(checkpoint_cfg).augment, device)
        return split_figures(
            scored.scores, scored.caption_image, table, scored.image_features, scored.text_features, seed=cfg.train.seed
        )
    except Exception as exc:
        print(f"rsray: warning: no retrieval figures for {checkpoint_folder}: {error_summary(exc)}", file=sys.stderr)
        return {}
