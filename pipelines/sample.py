"""`rsray sample`: draw the embedded sample dataset into `data.root` (Karpathy layout)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rsray.cli import config_from_args, run_cli, setup_logging, stage_parser

log = logging.getLogger("rsray.sample")


def run(cfg) -> Path:
    from rsray.data.synthetic import generate_sample

    path = generate_sample(
        cfg.data.root, n_images=cfg.sample.images, image_size=cfg.sample.image_size, seed=cfg.sample.seed
    )
    log.info(
        "sample dataset (%d images, %d px, seed %d) at %s",
        cfg.sample.images,
        cfg.sample.image_size,
        cfg.sample.seed,
        path,
    )
    return path


def main(argv=None) -> int:
    parser = stage_parser(
        "rsray sample",
        "Draw the embedded sample dataset: aerial-like scenes with "
        "5 captions each, written as images + Karpathy JSON into data.root.",
    )
    ns = parser.parse_intermixed_args(argv)
    setup_logging(ns.verbose, "sample")
    return run_cli(lambda: run(config_from_args(ns.args)) and 0)


if __name__ == "__main__":
    sys.exit(main())
