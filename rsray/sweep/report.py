"""A sweep's outcome: one summary per trial from Tune's results, the best trial, and the parent
run's record (summary table, figure, best config, the best checkpoint's test numbers)."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rsray import storage
from rsray.config import Config
from rsray.sweep.figures import metric_vs_params
from rsray.sweep.spec import EPOCHS_DONE, TRIALS_FOLDER, Sweep, join_uri, trial_config
from rsray.sweep.summary import TrialSummary

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    """What a sweep produced: every trial, the best one and where its outputs went."""

    name: str
    folder: str
    metric: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    best_config: str = ""
    best_checkpoint: str = ""
    test: dict[str, Any] = field(default_factory=dict)
    parent_run_id: str | None = None
    mlflow_link: str = ""
    resumed: bool = False


def summarize(grid, sweep: Sweep) -> list[TrialSummary]:
    """One row per trial from Tune's results, in trial order."""
    keys = [p.key for p in sweep.params]
    rows = []
    for result in grid:
        trial_id = Path(str(result.path)).name
        frame = result.metrics_dataframe
        values: list[float] = []
        epochs: list[int] = []
        if frame is not None and sweep.metric in frame:
            values = [float(v) for v in frame[sweep.metric]]
            epochs = [int(e) for e in frame[EPOCHS_DONE]] if EPOCHS_DONE in frame else list(range(1, len(values) + 1))
        finite = [(v, e) for v, e in zip(values, epochs, strict=True) if math.isfinite(v)]
        best, best_epoch = max(finite, default=(float("nan"), 0))
        done = max(epochs, default=0)
        if result.error is not None:
            status = "error"
        elif sweep.settings.kind == "train" and done < _trial_epochs(sweep, result.config):
            status = "early_stopped"
        else:
            status = "finished"
        rows.append(
            TrialSummary(
                trial_id,
                {k: (result.config or {}).get(k) for k in keys},
                status,
                done,
                best,
                best_epoch,
                values[-1] if values else float("nan"),
                error=_one_line(result.error) if result.error is not None else "",
            )
        )
    return sorted(rows, key=lambda r: r.trial_id)


def _trial_epochs(sweep: Sweep, params: dict[str, Any] | None) -> int:
    return int((params or {}).get("train.epochs", sweep.base.train.epochs))


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def best_trial(trials: Sequence[TrialSummary]) -> TrialSummary | None:
    """The trial with the highest metric at any epoch (ties: the earlier trial)."""
    scored = [t for t in trials if math.isfinite(t.best)]
    return max(scored, key=lambda t: t.best, default=None)


def record_outcome(sweep: Sweep, base: Config, report: SweepReport, parent) -> None:
    """The parent run's record: summary table, figure, best trial and config, test numbers."""
    keys = [p.key for p in sweep.params]
    parent.log_text(summary_csv(report.trials, keys, sweep.metric), "trials.csv")
    if report.trials:
        parent.log_figure(
            metric_vs_params(report.trials, sweep.params, sweep.metric, report.best), "figures/mR_vs_params.png"
        )
    best = report.best
    if best is None:
        log.warning("no trial of sweep %s reported %s", sweep.name, sweep.metric)
        return
    parent.log_params({"best": {"trial_id": best.trial_id, **best.params}})
    parent.log_metrics(
        {
            f"best/{sweep.metric}": best.best,
            **({"best/epoch": best.best_epoch} if sweep.settings.kind == "train" else {}),
        },
        step=0,
    )
    parent.set_tags({"best_trial_id": best.trial_id, "best_run_id": best.run_id})
    if sweep.settings.kind == "smr":
        _finish_smr(sweep, report, parent)
    else:
        _finish_train(sweep, base, report, parent)


def _finish_train(sweep: Sweep, base: Config, report: SweepReport, parent) -> None:
    import ray.train

    best = report.best
    cfg = trial_config(base, best.params)  # as the trial trained it (same stage checkpoints), not its run folder
    cfg.train.run_name = ""
    cfg.train.storage_path = sweep.base.train.storage_path
    report.best_config = sweep.settings.best_config or _default_best_config(sweep)
    Path(report.best_config).parent.mkdir(parents=True, exist_ok=True)
    cfg.save(report.best_config)
    parent.log_artifact(report.best_config)
    run = storage.resolve(join_uri(sweep.folder, TRIALS_FOLDER, best.trial_id))
    result = ray.train.Result.from_path(run.path, storage_filesystem=run.fs)
    checkpoint = result.get_best_checkpoint(sweep.metric, "max")
    if checkpoint is None:
        return
    report.best_checkpoint = f"s3://{checkpoint.path}" if storage.is_s3(sweep.folder) else checkpoint.path
    parent.set_tags({"best_checkpoint": report.best_checkpoint})
    if sweep.settings.evaluate_test:
        from rsray.eval.checkpoint import evaluate_checkpoint

        result = evaluate_checkpoint(report.best_checkpoint, split="test")
        report.test = {"metrics": result["metrics"], "smr_metrics": result["smr_metrics"], "epoch": result["epoch"]}
        parent.log_metrics(result["metrics"], step=0, prefix="best/test/")
        parent.log_metrics(result["smr_metrics"], step=0, prefix="best/test_smr/")
        parent.log_dict(report.test, "best_test.json")


def _finish_smr(sweep: Sweep, report: SweepReport, parent) -> None:
    from rsray.eval.rerank import SMRConfig

    smr = SMRConfig(**{key.split(".")[1]: value for key, value in report.best.params.items()})
    report.best_checkpoint = sweep.settings.checkpoint
    report.best_config = sweep.settings.best_config or _default_best_config(sweep, "best_smr.yaml")
    command = f"rsray evaluate {sweep.settings.checkpoint} --smr-k {smr.k} --smr-w {smr.w} --smr-beta {smr.beta}"
    Path(report.best_config).parent.mkdir(parents=True, exist_ok=True)
    Path(report.best_config).write_text(
        yaml.safe_dump(
            {"smr": asdict(smr), "checkpoint": sweep.settings.checkpoint, "evaluate": command}, sort_keys=False
        )
    )
    parent.log_artifact(report.best_config)
    if sweep.settings.evaluate_test:
        from rsray.eval.checkpoint import evaluate_checkpoint

        result = evaluate_checkpoint(sweep.settings.checkpoint, split="test", smr=smr)
        report.test = {"metrics": result["metrics"], "smr_metrics": result["smr_metrics"], "epoch": result["epoch"]}
        parent.log_metrics(result["metrics"], step=0, prefix="best/test/")
        parent.log_metrics(result["smr_metrics"], step=0, prefix="best/test_smr/")
        parent.log_dict(report.test, "best_test.json")


def _default_best_config(sweep: Sweep, name: str = "best_config.yaml") -> str:
    """In the sweep folder when it is local; next to the command (cwd) when the folder is on S3,
    since `rsray train` reads a local file."""
    if storage.is_s3(sweep.folder):
        return str(Path.cwd() / f"{sweep.name}-{name}")
    return str(Path(sweep.folder) / name)


def summary_csv(trials: Sequence[TrialSummary], keys: Sequence[str], metric: str) -> str:
    """The summary table: one row per trial, swept values, status and metric."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "trial_id",
            *keys,
            "status",
            EPOCHS_DONE,
            f"best {metric}",
            "best_epoch",
            f"last {metric}",
            "mlflow_run_id",
            "error",
        ]
    )
    for t in trials:
        writer.writerow(
            [
                t.trial_id,
                *(t.params.get(k) for k in keys),
                t.status,
                t.epochs_done,
                _fmt(t.best),
                t.best_epoch,
                _fmt(t.last),
                t.run_id,
                t.error,
            ]
        )
    return out.getvalue()


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else ""
