"""The `rsray` command: one entry point that dispatches to the stage functions in `pipelines/`.

`rsray prepare conf.yaml key=value` and `python -m pipelines.prepare conf.yaml key=value` run the
same code. Every stage takes an optional config file (a path, or a name under conf/ such as
`presets/cpu-tiny`) followed by `key=value` overrides. Errors a user can fix are printed as one
line and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from rsray.config import Config, ConfigError, load_config

# subcommand -> (module with main(argv), one-line summary)
STAGES: dict[str, tuple[str, str]] = {
    "sample": ("pipelines.sample", "draw the embedded sample dataset (aerial-like scenes + captions)"),
    "prepare": ("pipelines.prepare", "validate, resize and tokenize a dataset into Parquet shards (Ray Data)"),
    "data": ("pipelines.data", "dataset tools: `rsray data inspect TARGET [--json]`"),
    "train": ("pipelines.train", "train a model on Ray Train (DDP workers), checkpoint every epoch"),
    "sweep": ("pipelines.sweep", "sweep hyperparameters: Ray Tune over Ray Train runs, ASHA, MLflow parent/child runs"),
    "study": ("pipelines.study", "one config over several seeds and/or validation folds: child runs, mean ± std"),
    "evaluate": ("pipelines.evaluate", "score a checkpoint on the test split, with and without SMR"),
    "compare": ("pipelines.compare", "the paper-style table of an experiment's runs (md, csv, LaTeX) from MLflow"),
    "demo": ("pipelines.demo", "run the whole pipeline on the embedded sample"),
    "metrics": ("pipelines.metrics", "R@K, mR, ranks, SR@K (and SMR) from a saved similarity matrix (.npy)"),
}

EPILOG = """config: a YAML file or a name under conf/ (e.g. presets/cpu-tiny), then key=value
overrides such as data.root=/data/rsitmd prepare.image_size=256. Run `rsray STAGE --help`.
exit codes: 0 done, 1 the work failed, 2 bad input or config, 3 storage (S3, a shard missing or
changed), 130 interrupted; errors are one line."""


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the shared `[config] [key=value ...]` positional arguments."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "args",
        nargs="*",
        metavar="[config.yaml] [key=value ...]",
        help="optional config file, then overrides (dotted keys)",
    )
    return parser


def config_from_args(args: Sequence[str], default: str | None = "presets/sample") -> Config:
    """First positional argument without '=' is the config file; the rest are overrides."""
    args = list(args)
    path = args.pop(0) if args and "=" not in args[0] else default
    return load_config(path, args)


def setup_logging(verbose: bool = False) -> None:
    """`rsray: message` lines on stderr, credentials inside URIs redacted whoever logs them."""
    from rsray.redact import RedactingFilter

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="rsray: %(message)s", stream=sys.stderr, force=True
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())


def print_error(exc: BaseException | str, prefix: str = "error: ") -> None:
    """The one-line error every command ends with, credentials redacted."""
    from rsray.redact import redact

    print(f"rsray: {prefix}{' '.join(redact(exc).split())}", file=sys.stderr)


def run_cli(fn: Callable[[], int | None]) -> int:
    """Run a stage, turning errors a user can fix into one line and a non-zero exit code."""
    from rsray.data.formats import AnnotationError
    from rsray.data.prepare import TooManyRejections
    from rsray.data.verify import ShardMismatch

    try:
        return fn() or 0
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except ShardMismatch as exc:  # a shard missing or changed since prepare: storage, not input
        print_error(exc)
        return 3
    except (ConfigError, AnnotationError, FileNotFoundError, ValueError) as exc:
        print_error(exc)
        return 2
    except TooManyRejections as exc:
        print_error(exc)
        return 1
    except OSError as exc:  # storage: S3 unreachable or refused
        from rsray.storage import explain_unreachable

        print_error(explain_unreachable(exc) or exc)
        return 3
    except KeyboardInterrupt as exc:
        print_error(f"interrupted{': ' if str(exc) else ''}{exc}", prefix="")
        return 130
    except Exception as exc:  # anything else still ends in one line; RSRAY_TRACEBACK=1 shows where
        if os.environ.get("RSRAY_TRACEBACK"):
            raise
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        print_error(f"{type(exc).__name__}: {lines[-1] if lines else ''} (RSRAY_TRACEBACK=1 shows the traceback)")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        lines = [f"  {name:<9} {summary}" for name, (_, summary) in STAGES.items()]
        print(
            "usage: rsray STAGE [config.yaml] [key=value ...]\n\n"
            "rsray trains and compares remote-sensing image-text retrieval models on Ray.\n\n"
            "stages:\n" + "\n".join(lines) + "\n\n" + EPILOG
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(STAGES[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
