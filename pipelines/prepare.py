"""`rsray prepare`: a dataset -> validated, resized, tokenized Parquet shards + manifest.json."""

from __future__ import annotations

import logging
import sys

from rsray.cli import config_from_args, run_cli, setup_logging, stage_parser

log = logging.getLogger("rsray.prepare")


def run(cfg, force: bool = False):
    from rsray.data.prepare import prepare

    result = prepare(cfg, force=force)
    counts = result.manifest["counts"]
    splits = ", ".join(f"{name} {info['images']}" for name, info in result.manifest["splits"].items())
    print(
        f"prepared {result.output}: {counts['written']} images ({splits}), "
        f"{counts['rejected']} rejected, {result.seconds:.1f}s" + (" (already up to date)" if result.skipped else "")
    )
    return result


def main(argv=None) -> int:
    parser = stage_parser(
        "rsray prepare",
        "Read a dataset's annotations and images, reject bad records "
        "with a reason, resize and re-encode images once, tokenize captions, and write "
        "Parquet shards per split plus manifest.json to prepare.output (a folder or "
        "s3://bucket/prefix). Re-running on unchanged input does nothing.",
    )
    parser.add_argument("--force", action="store_true", help="rewrite even if the output is up to date")
    ns = parser.parse_intermixed_args(argv)
    setup_logging(ns.verbose, "prepare")
    return run_cli(lambda: run(config_from_args(ns.args), force=ns.force) and 0)


if __name__ == "__main__":
    sys.exit(main())
