"""How a training run ends when it does not finish: one-line errors the commands print as they are."""

from __future__ import annotations


class TrainingFailed(RuntimeError):
    """The Ray Train run ended in error (after its allowed restarts); the message is one line."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training run; the message says what was kept."""


def error_summary(exc: BaseException) -> str:
    """One line for an error that may carry a worker's traceback: its last non-empty line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
