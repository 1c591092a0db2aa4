"""`rsray demo`: the whole pipeline on the embedded sample, as far as it exists today.

Today that is the data stage: draw the sample, prepare Parquet shards with Ray Data, and print
the statistics. Training, evaluation and MLflow tracking join here as they land.
"""
from __future__ import annotations

import sys

from rsray.cli import config_from_args, run_cli, setup_logging, stage_parser


def run(cfg) -> int:
    from pipelines import prepare, sample
    from pipelines.data import manifest_statistics
    from rsray.data.stats import format_statistics

    sample.run(cfg)
    result = prepare.run(cfg)
    print(format_statistics(manifest_statistics(result.output, cfg.prepare.s3_endpoint)))
    print("\nThe data stage is done. Training (Ray Train), evaluation and MLflow tracking are not "
          "built yet; when they land, `make demo` runs them here too.")
    return 0


def main(argv=None) -> int:
    parser = stage_parser("rsray demo", "Run the pipeline on the embedded sample dataset: generate it, "
                          "prepare shards with Ray Data, and (once built) train, evaluate and record in MLflow.")
    ns = parser.parse_intermixed_args(argv)
    setup_logging()
    return run_cli(lambda: run(config_from_args(ns.args)))


if __name__ == "__main__":
    sys.exit(main())
