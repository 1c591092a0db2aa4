"""A quiet console: rsray's own lines on stderr, everything else in the command's log file.

Ray, Ray Data, Ray Train and MLflow each log at INFO to the console by default (executor plans,
progress reports, token setup, "Started monitoring system metrics"); their lines, and what Ray's
workers print (forwarded to the driver), are written to a log file per command instead:
`$RSRAY_LOG_DIR` (default `~/.cache/rsray/logs`)`/<stage>-<time>-<pid>.log`. The console keeps
rsray's lines at INFO and above, the driver's libraries' errors, and the lines rsray's own loggers
print inside Ray workers (rank 0's epoch line, the Train controller's and sweep trials' warnings).
Other worker output (a library's warning inside a worker, a worker's traceback) is in the file
only; a task or actor that fails is still reported by Ray's own error listener, and a run that
fails ends in rsray's one-line error. `-v/--verbose` puts every library's lines back on the
console. Credentials are redacted on both, tracebacks included (`rsray.redact`).

Ray's forwarded worker output is re-routed through Ray's stdstream dispatcher (an internal of Ray
2.60: `ray._private.ray_logging.global_worker_stdstream_dispatcher`); where that is missing, Ray prints
it as usual.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

OWN_LOGGER = "rsray"
WORKER_PREFIX = "rsray: "  # what rsray's loggers put before each line inside a Ray worker
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "py.warnings")
_WORKER_OUTPUT = logging.getLogger("ray.worker_output")  # forwarded worker lines, into the log file
_ROUTE_HANDLER = "rsray_worker_lines"
_state: dict = {"verbose": False, "log_file": None, "console": None}


class RedactingFormatter(logging.Formatter):
    """Formats a record, traceback included, then redacts the whole text (`rsray.redact`): a
    credential inside an exception's message must not reach the console or the log file either."""

    def format(self, record: logging.LogRecord) -> str:
        from rsray.redact import redact

        return redact(super().format(record))


class BriefLibraryErrors(RedactingFormatter):
    """The console's format when not verbose: a library's error (Ray Train's controller reporting a
    worker's failure, say) as its first line only, without the traceback, which the log file keeps:
    the command's own one-line error follows it."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + "."):
            return super().format(record)
        lines = [line for line in record.getMessage().splitlines() if line.strip()]
        brief = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None})
        brief.msg, brief.args = (lines[0] if lines else "") + " (details in the log file)", None
        return super().format(brief)


class OwnLinesOnly(logging.Filter):
    """The console's rule when not verbose: rsray's records at their level, others' from ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + ".")
        return own or record.levelno >= logging.ERROR


def log_file_path(stage: str) -> Path:
    folder = Path(os.environ.get("RSRAY_LOG_DIR") or Path.home() / ".cache" / "rsray" / "logs")
    return folder / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


class CurrentStderrHandler(logging.StreamHandler):
    """A console handler writing to whatever `sys.stderr` is when a line is logged, not the stream
    it was when the command started: an in-process caller that swaps stderr and closes it later (a
    test's capture, a notebook cell) would otherwise leave a handler writing to a closed file."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):  # StreamHandler.__init__ assigns one; the property ignores it
        pass


def setup_logging(verbose: bool = False, stage: str = "rsray") -> Path | None:
    """Console and log-file handlers on the root logger (replacing any), library loggers routed
    to them, Python warnings captured. Returns the log file (None when it cannot be created: then
    the console is all there is, and it says so)."""
    from rsray.redact import RedactingFilter

    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # MLflow's loggers then reach ours
    if not verbose:  # a bar per artifact fetched (a checkpoint scored after training): noise on a console
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # rsray prints its own link
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if isinstance(handler, logging.FileHandler):  # an earlier command's log file in this process
            handler.close()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    console = CurrentStderrHandler()
    console.setFormatter((RedactingFormatter if verbose else BriefLibraryErrors)("rsray: %(message)s"))
    console.addFilter(RedactingFilter())
    if not verbose:
        console.addFilter(OwnLinesOnly())
    root.addHandler(console)
    try:
        log_file = log_file_path(stage)  # Path.home() raises RuntimeError where no home is known
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file, encoding="utf-8")
    except (OSError, RuntimeError) as exc:
        logging.getLogger("rsray").warning("no log file (%s): library logs go nowhere; -v shows them", exc)
        log_file = None
    else:
        to_file.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        to_file.addFilter(RedactingFilter())
        root.addHandler(to_file)
    logging.captureWarnings(True)
    _state.update(verbose=verbose, log_file=log_file, console=console)
    route_library_logs()
    return log_file


class Hidden(logging.Filter):
    """Drops INFO and below of the named loggers (and their children)."""

    def __init__(self, names: tuple[str, ...]):
        super().__init__()
        self.names = names

    def filter(self, record: logging.LogRecord) -> bool:
        named = any(record.name == n or record.name.startswith(n + ".") for n in self.names)
        return not named or record.levelno > logging.INFO


def hide_on_console(*names: str) -> None:
    """Keep the INFO lines of loggers `names` off the console (the log file still has them): a
    command that prints its own summary of the steps they narrate (`rsray demo`)."""
    if _state["console"] is not None and not _state["verbose"]:
        _state["console"].addFilter(Hidden(names))


def log_file() -> Path | None:
    """This command's log file (after `setup_logging`)."""
    return _state["log_file"]


def route_library_logs() -> None:
    """Send the libraries' loggers through the root's handlers: drop the console handlers they
    attach to themselves (Ray at import and `ray.init`, Ray Data at import) and let them
    propagate; their own log files are kept. Idempotent: called again after each of those."""
    if _state["log_file"] is None and not _state["verbose"]:
        return  # setup_logging never ran (a library use of rsray): leave the process's logging alone
    if not _state["verbose"] and "ray" in sys.modules:  # never imports Ray itself: that configures its logger
        _route_worker_output()
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True


def _route_worker_output() -> None:
    """Ray's driver prints what its workers write (log_to_driver); route it: every line into the
    log file, lines of rsray's loggers (they start with `WORKER_PREFIX`) onto the console."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: its own printing stays
        return
    names = [name for name, _ in getattr(dispatcher, "handlers", [])]
    if "ray_print_logs" not in names:
        return  # not connected yet (ensure_ray calls this again) or already routed
    dispatcher.remove_handler("ray_print_logs")
    if _ROUTE_HANDLER not in names:  # a later Ray session in this process: ours is still there
        dispatcher.add_handler(_ROUTE_HANDLER, print_worker_lines)


def print_worker_lines(data: dict) -> None:
    """One batch of forwarded worker output (Ray's dict: pid, actor or task name, lines)."""
    who = data.get("actor_name") or data.get("task_name") or "worker"
    for line in data.get("lines", []):
        _WORKER_OUTPUT.info("(%s pid=%s) %s", who, data.get("pid"), line)
        if line.startswith(WORKER_PREFIX):
            _print_own(line)


def _print_own(line: str) -> None:
    from rsray.redact import redact

    print(redact(line), file=sys.stderr, flush=True)


def own_lines_in_workers() -> None:
    """Inside a Ray worker: rsray's loggers print `rsray: message` on stderr (which Ray forwards to
    the driver, where `print_worker_lines` keeps them on the console) and nowhere else."""
    logger = logging.getLogger(OWN_LOGGER)
    if any(getattr(h, "name", "") == _ROUTE_HANDLER for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.name = _ROUTE_HANDLER
    handler.setFormatter(logging.Formatter(WORKER_PREFIX + "%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
