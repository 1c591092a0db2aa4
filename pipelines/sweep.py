"""`rsray sweep SWEEP.yaml [key=value ...]`: a hyperparameter sweep (Ray Tune over Ray Train
runs, ASHA on validation mR), recorded in MLflow as one parent run with one child per trial."""

from __future__ import annotations

import math
import sys

from rsray.cli import print_error, run_cli, setup_logging, stage_parser


def run(args) -> int:
    from rsray.sweep import (
        SweepInterrupted,
        load_sweep,
        resolved_algorithm,
        resolved_scheduler,
        run_sweep,
    )
    from rsray.tracking import TrackingUnavailable
    from rsray.train.run import TrainingFailed

    if not args or "=" in args[0]:
        raise ValueError("give a sweep file first, e.g. `rsray sweep sweep/swan-margin` (files are in conf/sweep/)")
    sweep = load_sweep(args[0], args[1:])
    print(
        f"sweep {sweep.name} ({sweep.settings.kind}): {', '.join(p.key + ' ' + p.describe() for p in sweep.params)}; "
        f"{resolved_algorithm(sweep)} search, {resolved_scheduler(sweep)} scheduler on {sweep.metric}; "
        f"folder {sweep.folder}"
    )
    try:
        report = run_sweep(sweep)
    except (TrainingFailed, TrackingUnavailable) as exc:
        print_error(exc)
        return 1
    except SweepInterrupted as exc:
        print_error(exc, prefix="")
        return 130
    print(format_trials(report))
    if report.best is None:
        print(f"rsray: error: no trial reported {report.metric}", file=sys.stderr)
        return 1
    at_epoch = f" at epoch {report.best.best_epoch}" if sweep.settings.kind == "train" else ""
    print(
        f"best trial {report.best.trial_id}: {report.metric} {report.best.best:.2f}{at_epoch} "
        f"({', '.join(f'{k}={_value(v)}' for k, v in report.best.params.items())})"
    )
    if report.best_checkpoint:
        print(f"best checkpoint: {report.best_checkpoint}")
    if report.test:
        m, s = report.test["metrics"], report.test["smr_metrics"]
        print(
            f"test split: mR {m['mR']:.2f} (i2t R@1 {m['i2t_R1']:.2f}, t2i R@1 {m['t2i_R1']:.2f}); "
            f"with SMR mR {s['mR']:.2f}"
        )
    if report.best_config and sweep.settings.kind == "smr":
        from rsray.eval.rerank import SMRConfig

        smr = SMRConfig(**{k.split(".")[1]: v for k, v in report.best.params.items()})
        print(
            f"best SMR setting: {report.best_config}   (rsray evaluate {report.best_checkpoint} "
            f"--smr-k {smr.k} --smr-w {smr.w} --smr-beta {smr.beta})"
        )
    elif report.best_config:
        print(f"best config: {report.best_config}   (train it with: rsray train {report.best_config})")
    if report.mlflow_link:
        print(f"MLflow parent run {report.parent_run_id}: {report.mlflow_link}")
    return 0


def format_trials(report) -> str:
    keys = list(report.trials[0].params) if report.trials else []
    header = ["trial", *keys, "status", "epochs", f"best {report.metric}"]
    rows = [
        [
            t.trial_id,
            *(_value(t.params.get(k)) for k in keys),
            t.status,
            str(t.epochs_done),
            f"{t.best:.2f}" if math.isfinite(t.best) else "-",
        ]
        for t in report.trials
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows])


def _value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv=None) -> int:
    parser = stage_parser(
        "rsray sweep",
        "Sweep hyperparameters with Ray Tune: every trial is a full Ray Train run "
        "(or, for kind smr, a re-ranking of one checkpoint's scores); ASHA stops weak trials on "
        "validation mR; MLflow records one parent run and a child run per trial. Running the same "
        "sweep again resumes it from its folder (<sweep.storage_path>/<sweep.name>). Overrides "
        "starting with sweep. change the sweep section, others the training config.",
    )
    ns = parser.parse_intermixed_args(argv)
    setup_logging(ns.verbose, "sweep")
    return run_cli(lambda: run(ns.args))


if __name__ == "__main__":
    sys.exit(main())
