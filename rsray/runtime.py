"""Start or join Ray the same way from every command, laptop or cluster.

With `RAY_ADDRESS` set (or inside `ray job submit`) we join that cluster. Otherwise we start a
local Ray with more logical CPUs than cores: on a 2-core machine, Ray Data tasks and Train
workers that each ask for a whole CPU would otherwise wait on each other forever. "Otherwise"
is `address="local"`: without it, `ray.init()` joins whatever address the last `ray start` or
`ray.cluster_utils.Cluster` left in `<tmp>/ray/ray_current_cluster`, and a file left by a killed
cluster made every command fail with Ray's "num_cpus and num_gpus must not be provided".
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("rsray.runtime")
_REAPERS: list = []  # `rsray.ray_reaper` processes of the local Rays this process started


def ensure_ray(num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; a no-op when it is already running."""
    import psutil
    import ray

    from rsray import ray_reaper
    from rsray.console import log_file, route_library_logs

    if ray.is_initialized():
        return
    route_library_logs()  # Ray's own lines (token setup, "Started a local Ray instance") into the log file
    logs = f"; Ray's and MLflow's logs: {log_file()}" if log_file() else ""
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        route_library_logs()  # and what its workers print, but rsray's own lines
        log.info("joined Ray cluster at %s%s", os.environ["RAY_ADDRESS"], logs)
        return
    cpus = num_cpus or max(4, 2 * (os.cpu_count() or 1))
    if os.path.exists(ray_address_file()):
        log.info("not joining the Ray cluster recorded in %s: set RAY_ADDRESS to join one", ray_address_file())
    children_before = {child.pid for child in psutil.Process().children()}
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"worker_process_setup_hook": "rsray.runtime.local_worker_setup"},
    )
    route_library_logs()
    # the local Ray goes down with this command, even on a SIGKILL; the reaper's pipe must stay open
    # as long as this process lives (a collected Popen would close it), so it is kept here
    _REAPERS.append(ray_reaper.watch(children_before))
    _wait_for_cpus(cpus)
    log.info("started a local Ray with %d logical CPUs%s", cpus, logs)


def ray_address_file() -> str:
    """Where `ray start` records the cluster a bare `ray.init()` would join (Ray's own helper)."""
    from ray._common.utils import get_ray_address_file

    return get_ray_address_file(None)


def quiet_ray_progress_logs() -> None:
    """Ray Train logs every `ray.train.report` at INFO with the whole metrics dict, and each epoch's
    streaming split logs Ray Data's plan again; rsray prints one line per epoch instead, so both are
    kept to warnings. Runs in Ray's worker processes: at the start of every Train worker, and in
    every process of the local Ray (`local_worker_setup`)."""
    _ray_train_report_logger().setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)


def _ray_train_report_logger() -> logging.Logger:
    """Ray Train's report logger is named after its module's file. The path is built from Ray's
    package folder rather than read from the imported module: importing ray.train takes about half
    a second, which every Ray worker process (Ray Data tasks too) would pay at start."""
    import ray

    return logging.getLogger(
        os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    )


def local_worker_setup() -> None:
    """The local Ray's `worker_process_setup_hook`. Also silences Ray Train's placement-group cleaner,
    which asks the State API every few seconds and warns that it is unavailable: a local Ray runs
    without the dashboard that serves it, so the warning is always true and says nothing."""
    from rsray.console import own_lines_in_workers

    quiet_ray_progress_logs()
    own_lines_in_workers()
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def _wait_for_cpus(expected: int, timeout_s: float = 10.0) -> None:
    """A fresh local Ray reports its CPUs a moment after init; Ray Data would otherwise warn that
    the cluster has none and might hang."""
    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < expected and time.monotonic() < deadline:
        time.sleep(0.05)


def configure_data_context() -> None:
    """Deterministic row order, so re-running the prepare stage writes identical shards; Ray Data's
    progress bars on a terminal only (elsewhere its progress goes to the log file as lines)."""
    import sys

    from ray.data import DataContext

    from rsray.console import route_library_logs

    route_library_logs()  # importing ray.data gave its logger a console handler of its own
    context = DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = sys.stderr.isatty()
