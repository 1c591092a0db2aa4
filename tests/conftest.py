"""Fixtures shared by unit and integration tests: real services started on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.credentials import ADMIN, PASSWORD, RAY_TOKEN, S3_SECRET_KEY, USER

# Every Ray cluster the tests start requires a token, as cluster/ sets Ray up: the session's own
# (`RAY_TOKEN`, from the environment, which Ray reads first), never ~/.ray/auth_token. Set before
# anything imports Ray: a process reads RAY_AUTH_MODE once, when Ray's config first loads.
os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN})
# One OpenMP thread for torch in the test processes and every process they start (Ray keeps a value
# that is set; its Train workers here get 1 anyway, from their fractional CPUs). The suite keeps both
# cores busy, and a team of two threads spins while its other thread waits for a core: measured,
# test_learning[swan] beside one busy process took 48.8 s (59 s of CPU) with torch's default two
# threads and 24.4 s (24 s of CPU) with one; alone, 21 s (32 s of CPU) against 24 s. Set before
# anything imports torch, which reads it once; a value the user set stays.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Each command's log file (rsray.console) goes to one folder of this session, which the secret scan reads.
if "RSRAY_LOG_DIR" not in os.environ:
    os.environ["RSRAY_LOG_DIR"] = _SESSION_LOGS = tempfile.mkdtemp(prefix="rsray-test-logs-")
else:
    _SESSION_LOGS = None


def pytest_sessionfinish(session, exitstatus):
    """The session's log folder is removed when every test passed and kept to read when one failed."""
    if exitstatus == 0 and _SESSION_LOGS and not hasattr(session.config, "workerinput"):
        shutil.rmtree(_SESSION_LOGS, ignore_errors=True)


START_MLFLOW = Path(__file__).resolve().parents[1] / "cluster" / "mlflow" / "start-mlflow.sh"
SHARED_DATASETS = Path(
    os.environ.get("RSRAY_SHARED_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets")
)


# The packages that start a Ray of their own, for all their modules (package-scoped fixtures): with
# `-n 2` (make test) the first two are one scope, run on one xdist worker at normal priority; the
# third is another, run on the other worker beside them at a lower priority. Everything else is
# scheduled test by test.
RAY_SCOPE, BESIDE_SCOPE = "integration and multinode", "standalone"
SCOPE_OF_PACKAGE = {"integration": RAY_SCOPE, "multinode": RAY_SCOPE, "standalone": BESIDE_SCOPE}


def xdist_scope(nodeid: str) -> str:
    """The unit xdist gives out whole: a package with its own Ray, or else the test alone."""
    parts = nodeid.split("/")
    return SCOPE_OF_PACKAGE.get(parts[1], nodeid) if len(parts) > 2 else nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two pytest-xdist workers (`-n 2`). tests/integration and tests/multinode go,
    whole and one after the other, to one worker (one scope, given out first: collection order, not
    xdist's reordering by size), so each package-scoped Ray, sample and trained runs are made once
    and those two clusters never run at once. The other worker takes tests/standalone (its own
    Ray and sample) and then the unit tests, at a lower priority (`pytest_runtest_setup`): at the
    same priority two Ray packages starved each other (24 min 51 s against about 19 in one process).
    This is xdist's own extension point: its LoadScopeScheduling with the scope split the way its
    loadfile and loadgroup modes do it. (`--dist loadgroup` marks do not work with pytest 9.2:
    xdist 3.8 renames items through an attribute pytest no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class RayPackagesWhole(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    config.option.loadscopereorder = False  # the critical path first, whatever its size

    return RayPackagesWhole(config, log)


# How much the xdist worker without tests/integration and tests/multinode yields the CPU (os.nice):
# those packages are the critical path and leave about a quarter of the two cores idle while they
# wait on timers and processes starting; the unit tests beside them at the same priority slowed them
# more than they saved (pytest 19:35 with two workers against 18:24 in one process). At niceness 10,
# measured from fresh clones: 19:38 against 22:30 in one process, the Ray packages' tests as fast
# as alone. Every process it starts (tests/standalone's Ray included) inherits the niceness. Ray
# itself starts its worker processes 15 above their raylet (its `worker_niceness`): the first
# worker's Ray workers run at 15, the second's at 19, the second worker's own test process at 10.
# At 19 instead pytest took 16:56 against 16:35 at 10 (fresh clones): within the noise.
NO_RAY_WORKER_NICENESS = 10


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """An xdist worker whose first test is not in the critical scope never gets it (it is given out
    first, whole: `pytest_xdist_make_scheduler`), so it lowers its priority for good."""
    config = item.config
    if not hasattr(config, "workerinput") or hasattr(config, "_rsray_priority_set"):
        return
    config._rsray_priority_set = True
    if xdist_scope(item.nodeid) != RAY_SCOPE:
        os.nice(NO_RAY_WORKER_NICENESS)


# Ray Train's settings for the tests' tiny runs (about 30 in the suite), passed by Ray Train from the
# driver to its controller and workers:
QUICK_TRAIN = {
    # the controller looks at its workers every 2 s by default, so each run waits up to 2 s to be
    # seen finished; 0.5 s saves most of that
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # the watcher of cloud preemption notices is an actor of its own, one more process per run that
    # imports Ray Train (about 2.5 s of CPU here); no test node is ever preempted
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


@contextlib.contextmanager
def local_test_ray(**env: str):
    """A real local Ray (separate worker processes) for one test package, with more logical CPUs
    than cores so Ray Data and Train don't starve each other, and QUICK_TRAIN and `env` in
    os.environ while it runs (Ray Train passes RAY_TRAIN_* on to its controllers and workers)."""
    import ray

    with quick_train_polling(), environment(env):
        ray.init(
            address="local",
            num_cpus=4,
            object_store_memory=300 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
        )
        try:
            yield ray
        finally:
            ray.shutdown()


@contextlib.contextmanager
def quick_train_polling():
    """os.environ with QUICK_TRAIN while Ray runs; a value the user set stays."""
    ours = [key for key in QUICK_TRAIN if key not in os.environ]
    os.environ.update({key: QUICK_TRAIN[key] for key in ours})
    try:
        yield
    finally:
        for key in ours:
            os.environ.pop(key, None)


def prepare_tiny_sample(tmp_path_factory) -> str:
    """The tiny sample (120 images at 64 px) drawn and prepared by the real Ray Data stage on the
    Ray this process is connected to. Returns the prepared folder."""
    from rsray.config import load_config
    from rsray.data.prepare import prepare
    from rsray.data.synthetic import generate_sample

    root = tmp_path_factory.mktemp("sample")
    generate_sample(root, n_images=120, image_size=64, seed=0, progress=False)
    output = tmp_path_factory.mktemp("prepared") / "sample"
    prepare(load_config("presets/cpu-tiny", [f"data.root={root}", f"prepare.output={output}"]))
    return str(output)


def still_running(pids) -> set[int]:
    """Those of `pids` that still run: a zombie has stopped (its parent, or init, reaps it)."""
    import psutil

    running = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.add(pid)
        except psutil.NoSuchProcess:
            continue
    return running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready, proc: subprocess.Popen, what: str, timeout: float) -> None:
    """Poll `ready()` until it is true; fail early if the server process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        if ready():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout}s")


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    def listening() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_until(listening, proc, f"127.0.0.1:{port}", timeout)


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """os.environ with `values` set (every child process inherits them), restored afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server as a separate process on 127.0.0.1, its writes atomic as S3's are
    (tests/s3_server.py); credentials set for every child."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = Path(__file__).with_name("s3_server.py")
    proc = subprocess.Popen([sys.executable, str(server), str(port)], stdout=log, stderr=subprocess.STDOUT)
    wait_for_port(port, proc)
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
    }
    with environment(env):
        yield endpoint
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint):
    """A fresh bucket on the moto server, created with boto3 as a user would."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="rsray-test")
    return "rsray-test"


TINY_WORDPIECES = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "a",
    "the",
    "is",
    "there",
    "plane",
    "##s",
    "air",
    "##port",
    "at",
    "near",
    "two",
    "red",
    "green",
    "sea",
    "beach",
    "river",
    "tree",
    "road",
    "park",
    "##ing",
    "lot",
    "many",
    "building",
    ".",
    ",",
]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A real BERT WordPiece tokenizer with a 30-piece vocabulary, saved like a hub checkpoint."""
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.txt").write_text("\n".join(TINY_WORDPIECES) + "\n")
    # transformers 5 takes the vocab.txt path as `vocab` (it ignores `vocab_file`)
    BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(folder / "tok")
    return folder / "tok"


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Until `url` answers 200 (a server can listen before its app is ready)."""
    import urllib.error
    import urllib.request

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    wait_until(healthy, proc, url, timeout)


class MlflowServer:
    """A real `mlflow server` process on 127.0.0.1: runs in a SQLite file in `folder`, artifacts at
    `artifacts` (a folder or s3://...). `uri` is its tracking URI; `kill()` is an outage.

    With `admin` (user, password) it is started by cluster/mlflow/start-mlflow.sh, the MLflow
    image's entrypoint: MLflow's basic-auth app with every secret from the environment, and
    nothing served without a login."""

    def __init__(self, folder: Path, artifacts: str, env: dict | None = None, admin: tuple[str, str] | None = None):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = open(folder / "mlflow-server.log", "w")
        # No MLflow job runner (rsray uses none of its jobs): its eight processes cost about 16 s
        # of CPU and 1.9 GB per server here. start-mlflow.sh turns it off by itself.
        command = [sys.executable, "-m", "mlflow", "server"]
        env = {**(env or os.environ), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if admin:
            command = ["sh", str(START_MLFLOW)]
            env = {**env, **_basic_auth_environment(folder, *admin)}
            del env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]
        command += ["--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", artifacts]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            command + ["--workers", "1"], stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=folder
        )
        try:
            wait_for_http(f"{self.uri}/health", self.proc)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"mlflow server did not start; log:\n{self.log_text()[-3000:]}") from exc

    def log_text(self) -> str:
        return (self.folder / "mlflow-server.log").read_text()

    def commands(self) -> list[str]:
        """The command line of the server and of every process it started."""
        lines = []
        for pid in [self.proc.pid] + _descendants(self.proc.pid):
            with contextlib.suppress(FileNotFoundError):
                lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        return lines

    def kill(self) -> None:
        """SIGKILL the server and every process it started (gunicorn/uvicorn workers)."""
        import signal

        for pid in _descendants(self.proc.pid) + [self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def _basic_auth_environment(folder: Path, user: str, password: str) -> dict[str, str]:
    """What start-mlflow.sh needs, as a Kubernetes Secret would provide it; `mlflow` is this
    environment's."""
    import secrets

    return {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_AUTH_ADMIN_USERNAME": user,
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_AUTH_DB_URI": f"sqlite:///{folder}/auth.db",
        "TMPDIR": str(folder),  # the script's auth settings file goes with the server's folder, not /tmp
    }


def create_mlflow_user(uri: str, admin: tuple[str, str], user: str, password: str) -> None:
    """An ordinary account on a basic-auth server, made through its REST API by the admin."""
    import requests

    reply = requests.post(
        f"{uri}/api/2.0/mlflow/users/create", json={"username": user, "password": password}, auth=admin, timeout=30
    )
    reply.raise_for_status()


def _descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [int(c) for c in children.read_text().split()] if children.exists() else []
    return [d for c in found for d in _descendants(c)] + found


@pytest.fixture(scope="session")
def mlflow_server_process(tmp_path_factory, s3_endpoint, s3_bucket) -> MlflowServer:
    """The session's MLflow server (see `mlflow_server`), as its process."""
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), f"s3://{s3_bucket}/mlflow", env, admin=ADMIN)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_process):
    """A real `mlflow server` on 127.0.0.1 with MLflow's basic-auth app: runs in a SQLite file,
    artifacts proxied to s3://<bucket>/mlflow on the moto server. rsray and the tests log in as an
    ordinary user through MLflow's own variables (MLFLOW_TRACKING_USERNAME / _PASSWORD), set here
    for this process and every child (start Ray after this fixture). Yields the tracking URI
    (http://127.0.0.1:PORT)."""
    create_mlflow_user(mlflow_server_process.uri, ADMIN, USER, PASSWORD)
    with environment({"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD}):
        yield mlflow_server_process.uri


def _in_one_thread(rank: int, worker, *args) -> None:
    import torch

    torch.set_num_threads(1)  # as a DataLoader worker does: a forked child must not reuse the parent's OpenMP team
    worker(rank, *args)


def run_forked(worker, args: tuple, nprocs: int = 2) -> None:
    """`worker(rank, port, *args)` in `nprocs` processes, `port` a free one for their process
    group, waited for; an exception in one fails the test. Forked, not spawned: each inherits the
    imported torch, timm and rsray instead of importing them again (about 3 s of CPU a process
    here; six such tests)."""
    import torch.multiprocessing as mp

    mp.start_processes(_in_one_thread, args=(worker, free_port(), *args), nprocs=nprocs, join=True, start_method="fork")
