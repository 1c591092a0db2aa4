"""`rsray train`: train one model on Ray Train (DDP workers), checkpointing every epoch."""

from __future__ import annotations

import sys

from rsray.cli import config_from_args, print_error, run_cli, setup_logging, stage_parser
from rsray.ray_errors import underlying_error


def run(cfg):
    from rsray.tracking import TrackingUnavailable
    from rsray.train.run import TrainingFailed, train

    try:
        result = train(cfg)
    except (TrainingFailed, TrackingUnavailable) as exc:
        if isinstance(underlying_error(exc), OSError):
            raise  # storage (a full disk in a worker): run_cli's one line and exit code 3
        print_error(exc)
        return 1
    print_summary(cfg, result)
    if getattr(result, "tracking_outage", None):  # training succeeded: a tracking outage is a warning, exit 0
        print_error(result.tracking_outage, prefix="warning: ")
    return 0


def print_summary(cfg, result) -> None:
    """Every epoch's line, the run folder, the best checkpoint and the MLflow link (no credentials)."""
    from rsray.models import model_config
    from rsray.tracking import ui_command
    from rsray.train.loop import selection_metric
    from rsray.train.records import best_checkpoint, checkpoint_uri, epoch_line

    history = result.return_value or ([m for _, m in result.best_checkpoints or []])
    for m in history:
        print(epoch_line(m, cfg.train.epochs))
    best = best_checkpoint(result, cfg)
    print(f"run folder: {result.path}")
    print(f"best checkpoint ({selection_metric(model_config(cfg))}): {checkpoint_uri(best) if best else 'none'}")
    test = getattr(result, "test_report", None)
    if test:  # logged into the MLflow run as test/* and test_smr/*
        m, smr = test["metrics"], test["smr_metrics"]
        print(
            f"test split: i2t R@1 {m['i2t_R1']:.1f}, t2i R@1 {m['t2i_R1']:.1f}, mR {m['mR']:.2f}; "
            f"with SMR mR {smr['mR']:.2f}"
        )
    if getattr(result, "model_id", None):  # the pyfunc that embeds captions and images
        registered = getattr(result, "registered_model", None)
        print(f"MLflow model: models:/{result.model_id}" + (f", registered as {registered}" if registered else ""))
    if getattr(result, "mlflow_link", ""):
        print(
            f"MLflow run {result.mlflow_run_id}: {result.mlflow_link}"
            + (
                f"   (start the UI with: {ui_command(cfg.tracking.uri)})"
                if cfg.tracking.uri.startswith("sqlite")
                else ""
            )
        )


def main(argv=None) -> int:
    parser = stage_parser(
        "rsray train",
        "Train the configured model on the prepared output train.data with "
        "Ray Train: train.num_workers DDP workers read equal shards of the train split, "
        "rank 0 scores the whole validation split each epoch, and every epoch's "
        "checkpoint goes to train.storage_path/train.run_name (the best by val mR, or by "
        "the model's own selection metric, are kept). "
        "Models that start from an earlier stage train it first in the same command when "
        "its checkpoint key says `train`: e.g. model/priorclip with "
        "model.instruction_checkpoint=train trains model.instruction_stage (model/scene_prior, "
        "its own run <run_name>-scene_prior, best by val accuracy) and then PriorCLIP from "
        "that checkpoint; model/priorclip_open does the same for clip_checkpoint (stage 1, "
        "model/clip). Before an MLflow run opens or a worker starts it checks every shard against "
        "the manifest (train.verify_checksums), that no live run uses train.run_name, that a rerun "
        "of a run name would not resume with a changed setting, and that the cluster can place the "
        "workers (waiting train.resource_wait_s for an autoscaler). A tracking outage mid-run is a "
        "warning, not a failure; the first Ctrl-C stops the run (the same command resumes it).",
    )
    ns = parser.parse_intermixed_args(argv)
    setup_logging(ns.verbose, "train")
    return run_cli(lambda: run(config_from_args(ns.args, default="train/cpu-tiny")))


if __name__ == "__main__":
    sys.exit(main())
