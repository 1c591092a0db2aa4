"""Start or join Ray the same way from every command, laptop or cluster.

With `RAY_ADDRESS` set (or inside `ray job submit`) we join that cluster. Otherwise we start a
local Ray with more logical CPUs than cores: on a 2-core machine, Ray Data tasks and Train
workers that each ask for a whole CPU would otherwise wait on each other forever.
"""
from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("rsray.runtime")


def ensure_ray(num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; a no-op when it is already running."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        log.info("joined Ray cluster at %s", os.environ["RAY_ADDRESS"])
        return
    cpus = num_cpus or max(4, 2 * (os.cpu_count() or 1))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    _wait_for_cpus(cpus)
    log.info("started a local Ray with %d logical CPUs", cpus)


def _wait_for_cpus(expected: int, timeout_s: float = 10.0) -> None:
    """A fresh local Ray reports its CPUs a moment after init; Ray Data would otherwise warn that
    the cluster has none and might hang."""
    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < expected and time.monotonic() < deadline:
        time.sleep(0.05)


def configure_data_context() -> None:
    """Deterministic row order, so re-running the prepare stage writes identical shards."""
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True
