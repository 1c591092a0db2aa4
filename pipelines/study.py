"""`rsray study [config] [key=value ...]`: one config trained over several seeds and/or validation
folds, with the mean and spread of every test number (rsray.study)."""

from __future__ import annotations

import sys

from rsray.cli import config_from_args, run_cli, setup_logging, stage_parser


def run(cfg) -> int:
    from rsray.study import run_study, study_name

    members = len(cfg.study.seeds) * (cfg.study.folds or 1)
    print(
        f"study {study_name(cfg)}: {cfg.model.get('name')} on {cfg.data.name}, seeds {list(cfg.study.seeds)}"
        + (f", {cfg.study.folds} validation folds" if cfg.study.folds else "")
        + f": {members} trainings"
    )
    report = run_study(cfg)
    if report.reused:
        print(f"reused finished members: {', '.join(report.reused)}")
    print("\n".join(report.lines()))
    print(f"MLflow parent run {report.parent_run_id} (test/* means, test_std/* spreads): {report.link}")
    return 0


def main(argv=None) -> int:
    parser = stage_parser(
        "rsray study",
        "Train one config over several seeds (study.seeds, default 0 1 2) and/or the protocol's "
        "validation folds (study.folds=k: each fold prepared into <prepare.output>-fold<i>of<k> and "
        "trained), each training a child run of one MLflow parent run. Every member's best "
        "checkpoint is scored on the test split; the parent logs the mean (test/*, test_smr/*) and "
        "the sample standard deviation (test_std/*, test_smr_std/*) and the report prints e.g. "
        "`mR 34.10 ± 0.60 (3 folds)`. Running the same study again reuses finished members and "
        "resumes an interrupted one. Examples: `rsray study train/cpu-tiny --seeds 0 1`, "
        "`rsray study train/cpu-tiny --folds 3 --seeds 0` (folds need the raw data: data.root).",
    )
    parser.add_argument("--seeds", nargs="+", metavar="SEED", help="same as study.seeds=[...]")
    parser.add_argument("--folds", type=int, metavar="K", help="same as study.folds=K")
    ns = parser.parse_intermixed_args(argv)
    overrides = list(ns.args)
    if ns.seeds:
        # argparse's nargs="+" also takes the key=value overrides that follow the seeds: give them back
        seeds = [value for value in ns.seeds if "=" not in value]
        overrides += [value for value in ns.seeds if "=" in value]
        bad = [value for value in seeds if not value.lstrip("-").isdigit()]
        if bad or not seeds:
            parser.error(f"argument --seeds: {bad[0] if bad else 'no seed'!r} is not a seed (an integer)")
        overrides.append(f"study.seeds=[{','.join(str(int(s)) for s in seeds)}]")
    if ns.folds is not None:
        overrides.append(f"study.folds={ns.folds}")
    setup_logging(ns.verbose, "study")
    return run_cli(lambda: run(config_from_args(overrides)))


if __name__ == "__main__":
    sys.exit(main())
