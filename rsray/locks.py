"""A lock file that names its holder: created atomically, kept fresh by a heartbeat, taken over
when its holder is gone. One per training run's folder (`rsray.train.run_folder.RunLock`) and one
per prepare output (`rsray.data.prepare`).

The file holds host, pid, start time, a heartbeat refreshed every HEARTBEAT_S seconds and, inside
a Ray job, the Ray node. It is created only if absent, as one atomic step: `O_CREAT | O_EXCL`
locally, a conditional PUT (`If-None-Match: *`) on S3, so of two commands started in the same
instant exactly one gets it. A holder is gone when its heartbeat is older than STALE_S, when its
process no longer exists (same host), when its Ray node has been declared dead by the cluster (a
lost machine: a restarted trial must not wait STALE_S), or when it names this very process (an
earlier command in it that did not end cleanly). A gone holder's file is replaced only if it is
still the file that was judged (`storage.replace_if_unchanged`: `If-Match` on its ETag on S3, a
compare under a folder `flock` locally), so of two commands taking over one stale lock at the
same moment exactly one gets it, and a heartbeat written meanwhile keeps its holder's lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from rsray import storage

log = logging.getLogger("rsray")

HEARTBEAT_S = 30.0
STALE_S = 120.0
TAKEOVER_ATTEMPTS = 3


class HeldElsewhere(Exception):
    """The lock is held by a live holder (`holder`: its record) at `uri`."""

    def __init__(self, uri: str, holder: dict):
        super().__init__(f"{uri} is held by pid {holder.get('pid')} on {holder.get('host')}")
        self.uri, self.holder = uri, holder

    def who(self) -> str:
        """'pid N on HOST' for one-line messages."""
        return f"pid {self.holder.get('pid')} on {self.holder.get('host')}"


class HolderLock:
    """A context manager holding the lock file `lock` (a storage.Location) with a heartbeat thread;
    entering raises HeldElsewhere while a live holder has it."""

    def __init__(self, lock: storage.Location, thread_name: str = "rsray-lock-heartbeat"):
        self.lock, self.thread_name = lock, thread_name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        if node := _this_ray_node():
            self.record["ray_node"] = node

    def __enter__(self) -> HolderLock:
        for _ in range(TAKEOVER_ATTEMPTS):
            if storage.create_new(self.lock, self._payload()):
                break
            seen = storage.read_seen(self.lock)
            if seen is None:
                continue  # released meanwhile: create again
            holder = _record(seen.data)
            if holder is not None and holder_alive(holder):
                raise HeldElsewhere(self.lock.uri, holder)
            log.debug("taking over %s from a holder that is gone: %s", self.lock.uri, holder)
            if storage.replace_if_unchanged(self.lock, seen, self._payload()):
                break
            # changed since it was read (another command took it over first, or a heartbeat): again
        else:
            holder = self.holder() or {}
            raise HeldElsewhere(self.lock.uri, holder)
        self._thread = threading.Thread(target=self._beat, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self.holder()
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == self.record["host"]:
            try:
                self.lock.fs.delete_file(self.lock.path)
            except OSError as exc:  # the work has ended; a stale lock is taken over by the next command
                log.warning("could not remove %s: %s", self.lock.uri, exc)

    def holder(self) -> dict | None:
        """The record in the lock file; None when there is none or it cannot be read (stale)."""
        try:
            return _record(storage.read_bytes(self.lock))
        except OSError:
            return None

    def _payload(self) -> bytes:
        return json.dumps({**self.record, "heartbeat": time.time()}).encode()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                storage.write_bytes(self.lock, self._payload())
            except OSError as exc:  # storage hiccup: the next beat tries again
                log.debug("heartbeat to %s failed: %s", self.lock.uri, exc)


def _record(data: bytes) -> dict | None:
    """A lock file's holder record; None for bytes that are not one (a stale lock)."""
    try:
        holder = json.loads(data)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def live_holder(lock: storage.Location) -> dict | None:
    """The record of the live holder of `lock`, or None when nobody alive holds it (no file, an
    unreadable one, or a holder that is gone by the rules above). Takes nothing."""
    holder = HolderLock(lock).holder()
    return holder if holder is not None and holder_alive(holder) else None


def _this_ray_node() -> str | None:
    import sys

    if "ray" not in sys.modules:  # a command without Ray (never imports it for this)
        return None
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _on_a_dead_ray_node(holder: dict) -> bool:
    """The holder ran on a node of this Ray cluster that the cluster has declared dead."""
    node = holder.get("ray_node")
    if not node:
        return False
    import ray

    if not ray.is_initialized():
        return False
    return any(n["NodeID"] == node and not n["Alive"] for n in ray.nodes())


def holder_alive(holder: dict) -> bool:
    """Whether the lock's holder still lives (the rules in the module docstring)."""
    if _on_a_dead_ray_node(holder):
        return False
    try:
        fresh = time.time() - float(holder.get("heartbeat", 0)) < STALE_S
        pid = int(holder.get("pid", -1))
    except (TypeError, ValueError):
        return False
    if not fresh or holder.get("host") != socket.gethostname():
        return fresh
    if pid == os.getpid():  # this process: an earlier command in it that did not end cleanly
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
