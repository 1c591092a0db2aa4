"""rsray.locks: of commands started in the same instant exactly one holds a lock, on a local disk
(real processes) and on S3 (moto's server, conditional PUT); a live holder refuses the others."""

from __future__ import annotations

import json
import multiprocessing
import socket
import subprocess
import sys
import threading

import pytest

from rsray import storage
from rsray.locks import HeldElsewhere, HolderLock

CONTENDERS = 8
TAKEOVER_ROUNDS = 6


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


def _race(path: str) -> list[str]:
    """CONTENDERS processes try the lock at `path` at once; their outcomes, sorted."""
    context = multiprocessing.get_context("fork")
    start, done, results = context.Barrier(CONTENDERS), context.Event(), context.Queue()
    processes = [context.Process(target=_contend, args=(path, start, done, results)) for _ in range(CONTENDERS)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    done.set()
    for process in processes:
        process.join(timeout=30)
    return sorted(outcomes)


def test_of_processes_started_together_exactly_one_holds_a_local_lock(tmp_path):
    assert _race(str(tmp_path / "run" / "rsray-run.json")) == ["held"] + ["refused"] * (CONTENDERS - 1)
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


def _stale_record() -> bytes:
    """The lock of a command that died on this host: a pid that exists no more, an old heartbeat."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 0, "heartbeat": 0}).encode()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_processes_taking_over_one_stale_lock_together_exactly_one_holds_it(where, tmp_path, request):
    """The takeover is conditional (If-Match on S3, a compare under a folder flock locally): a
    command that deleted the stale file unconditionally could delete the first taker's lock. The
    race is run a few times: an unconditional delete lost it in about half of single rounds."""
    bucket = request.getfixturevalue("s3_bucket") if where == "s3" else None
    for round_number in range(TAKEOVER_ROUNDS):
        local = tmp_path / f"run{round_number}" / "lock.json"
        path = f"s3://{bucket}/locks/stale-{round_number}.json" if bucket else str(local)
        assert storage.create_new(storage.resolve(path), _stale_record())
        assert _race(path) == ["held"] + ["refused"] * (CONTENDERS - 1), f"round {round_number}"


def test_a_heartbeat_rewrites_the_lock_whole(tmp_path):
    """A reader never sees a half-written lock (it would judge the holder gone): a staged file is
    renamed over the old one, so the file's inode changes and no staged file stays behind."""
    loc = storage.resolve(str(tmp_path / "lock.json"))
    storage.write_bytes(loc, b'{"pid": 1}')
    before = (tmp_path / "lock.json").stat().st_ino
    storage.write_bytes(loc, b'{"pid": 2}')
    assert (tmp_path / "lock.json").stat().st_ino != before
    assert storage.read_bytes(loc) == b'{"pid": 2}'
    assert [p.name for p in tmp_path.iterdir()] == ["lock.json"]
