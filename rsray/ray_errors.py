"""Errors that Ray carried from a task, actor or Train worker to the driver, unwrapped: a full
disk inside a worker is then the same OSError, one line and exit code, as on the driver
(`rsray.cli.run_cli`), and a write that failed without naming its file names the folder it was
writing (`errors_name`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator


def underlying_error(exc: BaseException) -> BaseException:
    """The error a Ray task, actor or Train worker raised, out of the wrappers that carried it to
    the driver (Ray's RayTaskError `.cause`, Ray Data's UserCodeException, Ray Train's worker and
    controller failures, rsray's TrainingFailed): a full disk inside a worker is then the same
    OSError, one line and exit code, as on the driver. `exc` itself when it wraps nothing."""
    seen: set[int] = set()
    outer = exc  # a RayTaskError's message also holds its cause's traceback
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)  # RayTaskError (also the class Ray mixes into the cause's)
        if not isinstance(inner, BaseException):
            failures = getattr(exc, "worker_failures", None)  # Ray Train's WorkerGroupError
            inner = next(iter(failures.values()), None) if isinstance(failures, dict) else None
        if not isinstance(inner, BaseException):
            inner = getattr(exc, "controller_failure", None)  # Ray Train's ControllerError
        if not isinstance(inner, BaseException) and type(exc).__name__ in _WRAPPERS:
            inner = exc.__cause__ or _os_error_in_message(exc) or _os_error_in_message(outer)
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


_OS_ERROR_LINE = re.compile(r"^(?:\w+\.)*\w*(?:OSError|IOError|Error): \[Errno (\d+)\] (.+?)(?:: '(.+)')?$")


def _os_error_in_message(exc: BaseException) -> OSError | None:
    """Ray Data's UserCodeException reaches the driver without its __cause__ (not pickled), but its
    message holds the cause's last line, `OSError: [Errno 28] No space left on device: '/x'`:
    rebuilt into that OSError (the errno picks the subclass); None for any other cause."""
    for line in reversed(str(exc).splitlines()):
        match = _OS_ERROR_LINE.match(line.strip())
        if match:
            number, reason, filename = match.groups()
            return OSError(int(number), reason, filename) if filename else OSError(int(number), reason)
    return None


# Errors that only carry another one (their __cause__) to the driver.
_WRAPPERS = ("UserCodeException", "TrainingFailed", "TrainingFailedError", "WorkerGroupError", "ControllerError")


@contextlib.contextmanager
def errors_name(uri: str) -> Iterator[None]:
    """An OSError with an errno raised inside (on the driver or, carried by Ray, in a task or a
    worker) whose file is not named, as pyarrow's own write errors are not ("Error writing bytes to
    file. Detail: [errno 28] ..."), becomes `OSError(errno, <its standard reason>, uri)`: the line
    the user sees names where the writing went."""
    try:
        yield
    except Exception as exc:
        inner = underlying_error(exc)
        if not isinstance(inner, OSError) or not inner.errno or _names_a_path(inner.filename):
            raise
        raise OSError(inner.errno, os.strerror(inner.errno), uri) from exc


def _names_a_path(filename: object) -> bool:
    """A real path or URI (Ray Data's retry wrapper leaves its own sentence in `filename`)."""
    return isinstance(filename, str) and (filename.startswith("/") or "://" in filename)
