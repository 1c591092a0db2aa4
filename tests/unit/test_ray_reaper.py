"""The reaper that takes a local Ray down with its command: it kills the noted process tree when its
stdin closes, and never a process that merely reuses a noted pid. (The SIGKILLed `rsray train` with
its own Ray: tests/integration/test_failures.py.)"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from rsray.ray_reaper import kill_all, ray_processes
from tests.conftest import still_running


def _a_tree() -> tuple[subprocess.Popen, set[int]]:
    """A shell with two children that would sleep a minute; (the shell, all three pids)."""
    shell = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60 & wait"])
    deadline = time.monotonic() + 10
    while len(psutil.Process(shell.pid).children()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return shell, set(ray_processes([shell.pid]))


def test_the_tree_is_killed_when_the_command_ends_and_not_before():
    shell, tree = _a_tree()
    assert len(tree) == 3
    reaper = subprocess.Popen([sys.executable, "-m", "rsray.ray_reaper", str(shell.pid)], stdin=subprocess.PIPE)
    try:
        time.sleep(1.5)  # the command lives: nothing is touched
        assert still_running(tree) == tree and reaper.poll() is None
        reaper.stdin.close()  # what the kernel does when the command dies, however it dies
        assert reaper.wait(timeout=10) == 0
        deadline = time.monotonic() + 5
        while still_running(tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not still_running(tree)
    finally:
        reaper.kill()
        shell.kill()
        shell.wait()


def test_a_pid_noted_with_another_start_time_is_never_killed():
    shell, tree = _a_tree()
    try:
        noted = {pid: psutil.Process(pid).create_time() - 5.0 for pid in tree}  # as if the pids were reused
        assert kill_all(noted) == []
        assert still_running(tree) == tree
        assert sorted(kill_all(ray_processes([shell.pid]))) == sorted(tree)
    finally:
        shell.kill()
        shell.wait()
