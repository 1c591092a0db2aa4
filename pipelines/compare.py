"""`rsray compare`: the paper-style table of an experiment's runs, from MLflow's records."""

from __future__ import annotations

import sys

from rsray.cli import config_from_args, run_cli, setup_logging, stage_parser


def run(cfg, ns) -> int:
    from rsray.compare import FORMATS, collect, figures, table
    from rsray.tracking import Tracker, mlflow_client

    client = mlflow_client(cfg.tracking.uri)
    groups = collect(client, cfg.tracking.experiment, ns.runs or (), ns.group_by, published=not ns.no_published)
    print(table(groups, ns.format), end="")
    if ns.output:
        with open(ns.output, "w") as out:
            out.write(table(groups, ns.format))
        print(f"written to {ns.output}")
    if ns.no_log:
        return 0
    runs = [run_id for g in groups for run_id in g.run_ids]
    tracker = Tracker.start(
        cfg.tracking,
        "compare",
        params={"runs": ",".join(runs), "group_by": ns.group_by},
        tags={"rsray.kind": "compare"},
    )
    for fmt, suffix in zip(FORMATS, ("md", "csv", "tex"), strict=True):
        tracker.log_text(table(groups, fmt), f"compare/table.{suffix}")
    for name, figure in figures(groups).items():
        tracker.log_figure(figure, f"figures/{name}")
    tracker.end("FINISHED")
    print(
        f"logged to MLflow: run {tracker.run_id} (compare/table.md|csv|tex, figures/compare_*.png): {tracker.ui_link()}"
    )
    return 0


def build_parser():
    """`rsray compare`'s arguments (the demo parses its own compare through it too)."""
    parser = stage_parser(
        "rsray compare",
        "Print the paper-style table of an experiment's finished runs from MLflow: one row per "
        "model (or per the --group-by tag), the test split's i2t/t2i R@1/5/10, mR and mR with SMR "
        "as logged when training ended (or by rsray evaluate), mean ± std where a row holds repeated "
        "runs. Where a paper published numbers for a row's model on its dataset (data.name rsicd or "
        "rsitmd: SWAN, PIR, CLIP fine-tunes), those rows follow it and a last column gives the "
        "difference in mR. The table (md, csv, tex) and two figures (mR with error bars, R@K curves) are logged "
        "as a 'compare' run in the same experiment. tracking.uri and tracking.experiment come from "
        "the config and overrides.",
    )
    parser.add_argument("--runs", nargs="+", metavar="RUN_ID", help="only these runs (default: every finished run)")
    parser.add_argument("--format", default="md", choices=["md", "csv", "latex"], help="printed format (default md)")
    parser.add_argument(
        "--group-by", default="model", metavar="TAG", help="the run tag that makes a row (default model)"
    )
    parser.add_argument("--output", "-o", metavar="FILE", help="also write the printed table here")
    parser.add_argument("--no-published", action="store_true", help="leave out the papers' published rows")
    parser.add_argument("--no-log", action="store_true", help="print only; log no compare run to MLflow")
    return parser


def main(argv=None) -> int:
    ns = build_parser().parse_intermixed_args(argv)
    setup_logging(ns.verbose, "compare")
    return run_cli(lambda: run(config_from_args(ns.args), ns))


if __name__ == "__main__":
    sys.exit(main())
