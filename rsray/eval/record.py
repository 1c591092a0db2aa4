"""An evaluation's numbers where people look: the MLflow run of the checkpoint it scored.

`{split}/*` and `{split}_smr/*` metrics (R@1/5/10 both ways, mR, median and mean rank, SR@K where
scenes exist) at the checkpoint's epoch as the step, the per-query ranks as
`{split}/ranks.json`, and the retrieval figures as `figures/{split}_*.png`. Evaluating on data
the checkpoint was not trained on goes to a child run of the checkpoint's run instead, so its
numbers never mix with the training data's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RANKS_NOTE = "0-based ranks of the first match: i2t per image (image_ids order), t2i per caption"


def log_evaluation(
    tracker: Any,
    report: dict[str, Any],
    figures: dict[str, Any] | None = None,
    model_id: str | None = None,
    dataset: tuple[str, str] | None = None,
) -> None:
    """Log `report` (`rsray.eval.checkpoint.evaluate_checkpoint`'s) into `tracker`'s run; with
    `model_id` and `dataset` (name, digest) the numbers are linked to the logged model and data."""
    split, step = report["split"], report["epoch"]
    links = {"model_id": model_id, "dataset": dataset}
    tracker.log_metrics(report["metrics"], step, prefix=f"{split}/", **links)
    tracker.log_metrics(report["smr_metrics"], step, prefix=f"{split}_smr/", **links)
    for stage, numbers in (report.get("stages") or {}).items():  # e.g. test_itm/*, test_itm_smr/*
        tracker.log_metrics(
            {**numbers["metrics"], "seconds": numbers["seconds"], "k": numbers["k"]},
            step,
            prefix=f"{split}_{stage}/",
            **links,
        )
        if "smr_metrics" in numbers:
            tracker.log_metrics(numbers["smr_metrics"], step, prefix=f"{split}_{stage}_smr/", **links)
    ranks = {"note": RANKS_NOTE, "epoch": step, "data": report["data"], "smr": report["smr"]}
    ranks.update(ranks=report["ranks"], image_ids=report["image_ids"])
    tracker.log_dict(ranks, f"{split}/ranks.json")
    for name, figure in (figures or {}).items():
        tracker.log_figure(figure, f"figures/{split}_{name}")


def log_to_checkpoint_run(cfg: Any, report: dict[str, Any], figures: dict[str, Any] | None = None) -> str:
    """`report` into the MLflow run the checkpoint was logged to (`cfg` is the checkpoint's
    config), or into a child of that run when the data is not the data it trained on. Returns one
    line for the user; a tracking problem is that line, never an error (the numbers were printed)."""
    from rsray.redact import redact
    from rsray.tracking import Tracker, TrackingUnavailable, check_reachable

    run_id = report.get("mlflow_run_id")
    if not cfg.tracking.enabled or not run_id:
        return "not logged to MLflow: the checkpoint's run was not tracked"
    try:
        if report["data"] == cfg.train.data:
            check_reachable(cfg.tracking.uri)  # one quick request: a dead server is a warning at once
            tracker = Tracker.attach(cfg.tracking, run_id)
        else:
            tracker = Tracker.start(
                cfg.tracking,
                f"{cfg.train.run_name}-on-{Path(report['data'].rstrip('/')).name}",
                params={"checkpoint": report["checkpoint"], "data": report["data"], "split": report["split"]},
                tags={"rsray.evaluates": run_id},
                parent_run_id=run_id,
            )
        log_evaluation(tracker, report, figures)
        tracker.end("FINISHED")
        attached = tracker.run_id == run_id
        ended = attached and left_by_a_dead_driver(cfg, report["checkpoint"]) and tracker.end_if_running()
    except TrackingUnavailable as exc:
        return f"warning: not logged to MLflow: {redact(exc)}"
    if tracker.not_logged:
        return f"warning: MLflow did not take: {', '.join(tracker.not_logged)}"
    where = "its run" if tracker.run_id == run_id else f"run {tracker.run_id}, a child of"
    line = f"logged to MLflow: {where} {run_id} ({report['split']}/*, {report['split']}_smr/*)"
    return line + ("; it was left RUNNING by a driver that died: marked KILLED" if ended else "")


def left_by_a_dead_driver(cfg: Any, checkpoint: str) -> bool:
    """Whether `checkpoint` sits in its run's folder (`train.run_name`, beside Ray Train's snapshot)
    and no live driver holds that folder's run lock: a driver holds it until it has ended its MLflow
    run, so a run still RUNNING then was left by one that died. A checkpoint elsewhere (copied out,
    inside a logged model) says nothing about its run's driver."""
    from rsray import storage
    from rsray.checkpoint import RUN_LOCK_FILE, SNAPSHOT_FILE
    from rsray.locks import live_holder

    if "://" in checkpoint and not storage.is_s3(checkpoint):  # models:/, runs:/: not a run folder
        return False
    folder_uri = checkpoint.rstrip("/").rsplit("/", 1)[0]
    folder = storage.resolve(folder_uri)
    if folder_uri.rsplit("/", 1)[-1] != cfg.train.run_name or not storage.exists(folder.join(SNAPSHOT_FILE)):
        return False
    return live_holder(folder.join(RUN_LOCK_FILE)) is None
