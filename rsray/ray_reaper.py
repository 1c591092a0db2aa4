"""A local Ray goes down with the command that started it, however that command ends.

`ray.init()` starts a local Ray's processes (GCS, raylet, log monitor, and the raylet's agents and
workers) as children of the command. A clean exit stops them (`ray.shutdown` at exit). A SIGKILL or
an OOM kill does not: Ray's own reaper then stops the GCS and the raylet, but the dashboard and
runtime-env agents were seen alive 45 s later, re-parented to init, and the Train workers went on
for a moment, long enough to write a checkpoint that no run registered.

`watch(started_by)` starts one small process that holds a pipe from the command. While the command
lives it notes, once a second, every process of that Ray (the ones `ray.init` started and their
descendants, each with its start time, so a recycled pid is never touched). When the pipe closes,
which the kernel does the instant the command dies, it kills all that remain at once. Ray's
processes on other machines are not touched: a cluster stops a dead driver's work itself (Ray's
fate sharing: a job's actors die with its driver).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

POLL_S = 1.0


def ray_processes(roots: list[int]) -> dict[int, float]:
    """{pid: start time} of `roots` and all their descendants that exist now."""
    import psutil

    found: dict[int, float] = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
            for process in [root, *root.children(recursive=True)]:
                found[process.pid] = process.create_time()
        except psutil.Error:
            continue  # ended meanwhile
    return found


def kill_all(noted: dict[int, float]) -> list[int]:
    """SIGKILL every noted process that is still the same process (same start time); their pids."""
    import psutil

    killed = []
    for pid, started in noted.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started:
                process.send_signal(signal.SIGKILL)
                killed.append(pid)
        except psutil.Error:
            continue
    return killed


def watch(children_before: set[int]) -> subprocess.Popen | None:
    """Start the reaper for the Ray processes this process started since `children_before` (its
    child pids before `ray.init`). Returns the reaper (None when Ray started no child process)."""
    import psutil

    roots = [child.pid for child in psutil.Process().children() if child.pid not in children_before]
    if not roots:
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "rsray.ray_reaper", *map(str, roots)],
        stdin=subprocess.PIPE,  # never written: its end-of-file is this process's death
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C in the terminal reaches the command, not the reaper
        close_fds=True,
    )


def main(roots: list[int]) -> None:
    """Note Ray's processes each second until stdin closes, then kill what remains of them."""
    noted: dict[int, float] = {}
    while True:
        noted.update(ray_processes(roots))
        readable, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if readable and not os.read(sys.stdin.fileno(), 1):  # end of file: the command has ended
            kill_all(noted)
            return


if __name__ == "__main__":
    main([int(pid) for pid in sys.argv[1:]])
