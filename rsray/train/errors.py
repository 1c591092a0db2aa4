"""How a training run ends when it does not finish: one-line errors the commands print as they are."""

from __future__ import annotations

import os
import re

# Ray's memory monitor report (ray.exceptions.OutOfMemoryError, 2.60), as it reaches the driver
# inside Ray Train's WorkerGroupError: its last line only points at Ray's docs
_NODE_MEMORY = re.compile(
    r"Memory on the node \(IP: (?P<ip>[^,]+), ID: \w+\) was (?P<used>[\d.]+GB) used / (?P<limit>[\d.]+GB) limit"
)
_MEMORY_USER = re.compile(r"^[^\t\n]*?(?P<pid>\d+)\t(?P<gb>[\d.]+)\t(?P<command>[^\n]+)$", re.MULTILINE)


class TrainingFailed(RuntimeError):
    """The Ray Train run ended in error (after its allowed restarts); the message is one line."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training run; the message says what was kept."""


def error_summary(exc: BaseException) -> str:
    """One line for an error that may carry a worker's traceback: its last non-empty line, or for
    Ray's out-of-memory report, how full the node was and its largest processes."""
    text = str(exc)
    if oom := out_of_memory(text):
        return oom
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def out_of_memory(text: str) -> str | None:
    """Ray's memory monitor's report as one line, or None when `text` is not one."""
    node = _NODE_MEMORY.search(text)
    if node is None:
        return None
    largest: dict[str, str] = {}
    for user in _MEMORY_USER.finditer(text):
        largest.setdefault(user["pid"], f"{_short_command(user['command'])} {float(user['gb']):.1f} GB")
    listed = f"; largest: {', '.join(list(largest.values())[:3])}" if largest else ""
    return (
        f"out of memory: Ray stopped the run's workers with node {node['ip']} at {node['used']} used of "
        f"{node['limit']}{listed}; use fewer workers per node (train.num_workers, train.cpus_per_worker), "
        "a smaller train.batch_size, or nodes with more memory"
    )


def _short_command(command: str) -> str:
    """`ray::RayTrainWorker` as it is; `/venv/bin/python -m moto.server -H ...` as `python -m moto.server`."""
    words = command.split()
    if not words:
        return command
    return " ".join([os.path.basename(words[0]), *words[1:3]]) if "/" in words[0] else words[0]
