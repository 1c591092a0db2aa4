"""rsray.locks: of commands started in the same instant exactly one holds a lock, on a local disk
(real processes) and on S3 (moto's server, conditional PUT); a live holder refuses the others."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading

import pytest

from rsray import storage
from rsray.locks import HeldElsewhere, HolderLock

CONTENDERS = 8


def _contend(path: str, start, done, results) -> None:
    """One command: wait for the others, try the lock, hold it until every contender has tried."""
    lock = HolderLock(storage.resolve(path))
    start.wait()
    try:
        lock.__enter__()
    except HeldElsewhere:
        results.put("refused")
        return
    results.put("held")
    done.wait(30)
    lock.__exit__(None, None, None)


def test_of_processes_started_together_exactly_one_holds_a_local_lock(tmp_path):
    context = multiprocessing.get_context("fork")
    start, done, results = context.Barrier(CONTENDERS), context.Event(), context.Queue()
    path = str(tmp_path / "run" / "rsray-run.json")
    processes = [context.Process(target=_contend, args=(path, start, done, results)) for _ in range(CONTENDERS)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    done.set()
    for process in processes:
        process.join(timeout=30)
    assert sorted(outcomes) == ["held"] + ["refused"] * (CONTENDERS - 1)
    assert not (tmp_path / "run" / "rsray-run.json").exists()  # the holder removed it on the way out


def test_create_new_on_s3_is_a_conditional_put(s3_bucket):
    """If-None-Match: * on moto's server: of threads racing for one key exactly one creates it."""
    loc = storage.resolve(f"s3://{s3_bucket}/locks/race.json")
    start, created = threading.Barrier(CONTENDERS), []

    def contend(number: int) -> None:
        start.wait()
        created.append(storage.create_new(loc, f'{{"n": {number}}}'.encode()))

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(CONTENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(created) == [False] * (CONTENDERS - 1) + [True]
    assert storage.create_new(loc, b"{}") is False


def test_a_live_s3_holder_refuses_another_process_and_a_killed_one_is_taken_over(s3_bucket):
    uri = f"s3://{s3_bucket}/locks/held.json"
    loc = storage.resolve(uri)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from rsray import storage; from rsray.locks import HolderLock\n"
            f"with HolderLock(storage.resolve({uri!r})):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(HeldElsewhere) as held:
            HolderLock(loc).__enter__()
        assert held.value.uri == uri and held.value.who().startswith(f"pid {holder.pid} on ")
    finally:
        holder.kill()
        holder.wait()
    with HolderLock(loc):  # its process is gone: the lock is taken over
        assert storage.exists(loc)
    assert not storage.exists(loc)
