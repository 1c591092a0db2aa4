"""What every `rsray` command shares: the `[config] [key=value ...]` arguments, logging, and the
one-line error and exit code that end a command a user can fix (`run_cli`).

The commands themselves live in `pipelines/` (installed as `rsray.pipelines`), each a thin
`main(argv)`; `pipelines/cli.py` is the `rsray` entry point that dispatches to them. This module
sits below them and imports none of them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from rsray.config import Config, ConfigError, load_config
from rsray.ray_errors import underlying_error

EXIT_CODES = """exit codes: 0 done, 1 the work failed, 2 bad input or config, 3 storage (S3, a full disk, a shard
missing or changed; also inside a Ray worker), 130 interrupted; errors are one line."""
EPILOG = (
    """config: a YAML file or a shipped preset (e.g. presets/cpu-tiny; `conf/` in the source), then
key=value overrides such as data.root=/data/rsitmd prepare.image_size=256. Run `rsray STAGE --help`.
"""
    + EXIT_CODES
)


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps a one-paragraph description to the terminal as argparse does, and keeps the lines of a
    text written in lines (the epilogs: config syntax, exit codes) as they are."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def command_parser(prog: str, description: str, epilog: str = EXIT_CODES) -> argparse.ArgumentParser:
    """An `rsray` command's argument parser: its description, an epilog (the exit codes by default)
    and `-v`."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=_HelpFormatter)
    add_verbose_flag(parser)
    return parser


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A command's parser with the shared `[config] [key=value ...]` positional arguments."""
    parser = command_parser(prog, description, EPILOG)
    parser.add_argument(
        "args",
        nargs="*",
        metavar="[config.yaml] [key=value ...]",
        help="optional config file, then overrides (dotted keys)",
    )
    return parser


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray's, Ray Data's and MLflow's own log lines on the console too (they always go to "
        "the command's log file, named on the console: $RSRAY_LOG_DIR or ~/.cache/rsray/logs)",
    )


def config_from_args(args: Sequence[str], default: str | None = "presets/sample") -> Config:
    """First positional argument without '=' is the config file; the rest are overrides."""
    args = list(args)
    path = args.pop(0) if args and "=" not in args[0] else default
    return load_config(path, args)


def setup_logging(verbose: bool = False, stage: str = "rsray") -> None:
    """rsray's lines on stderr, every library's in the command's log file (`rsray.console`)."""
    from rsray.console import setup_logging as route

    route(verbose, stage)


def describe_os_error(exc: OSError) -> str:
    """`<path>: no space left on device ([Errno 28])` for an error that names its file; else its
    message's last line (pyarrow's own messages name the path and the errno)."""
    if exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror[0].lower()}{exc.strerror[1:]} ([Errno {exc.errno}])"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def print_error(exc: BaseException | str, prefix: str = "error: ") -> None:
    """The one-line error every command ends with, credentials redacted."""
    from rsray.redact import redact

    print(f"rsray: {prefix}{' '.join(redact(exc).split())}", file=sys.stderr)


def run_cli(fn: Callable[[], int | None]) -> int:
    """Run a stage, turning errors a user can fix into one line and a non-zero exit code, the same
    whether the error was raised on the driver or inside a Ray worker (`underlying_error`)."""

    def storage_errors_unwrapped() -> int | None:
        try:
            return fn()
        except Exception as exc:
            inner = underlying_error(exc)
            if inner is exc or not isinstance(inner, OSError):
                raise
            import logging

            logging.getLogger("traceback").info("the error that ended this command", exc_info=exc)
            raise inner from None  # a worker's storage error ends as the driver's would

    return _dispatch(storage_errors_unwrapped)


def _dispatch(fn: Callable[[], int | None]) -> int:
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
    except OSError as exc:  # storage: S3 unreachable or refused, a full disk
        from rsray.storage import explain_unreachable

        print_error(explain_unreachable(exc) or describe_os_error(exc))
        return 3
    except KeyboardInterrupt as exc:
        print_error(f"interrupted{': ' if str(exc) else ''}{exc}", prefix="")
        return 130
    except Exception as exc:  # anything else still ends in one line; the log file has the traceback
        if os.environ.get("RSRAY_TRACEBACK"):
            raise
        import logging

        from rsray.console import log_file

        logging.getLogger("traceback").info("the error that ended this command", exc_info=exc)
        where = f"the traceback is in {log_file()}" if log_file() else "RSRAY_TRACEBACK=1 shows the traceback"
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        print_error(f"{type(exc).__name__}: {lines[-1] if lines else ''} ({where})")
        return 1
