"""What rsray does when something around a run goes wrong, tried for real: the MLflow server dies
mid-run, shards change after prepare, a checkpoint is not what it claims, S3 is not there. The
rule under test: finished work is never thrown away, bad input stops before any worker starts,
and every failure is one line naming what and where (never a traceback), with a documented exit
code: 0 done (warnings allowed), 1 the work failed, 2 bad input or config, 3 storage, 130 stopped.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipelines.cli import main
from rsray.config import ConfigError, load_config
from rsray.data.manifest import read_manifest
from rsray.data.verify import ShardMismatch
from tests.conftest import MlflowServer, still_running

pytestmark = pytest.mark.integration


def _sigint_as_in_a_terminal() -> None:
    """A test suite started in the background (`make test &`) inherits SIGINT ignored, and Python
    then never turns a Ctrl-C into KeyboardInterrupt: give the child what a terminal gives it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def rsray_process(args: list[str], ray_cluster, log: Path, **env: str) -> subprocess.Popen:
    """`python -m pipelines.<stage> ...` joined to the tests' Ray, output to `log`."""
    environment = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, **env}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_sigint_as_in_a_terminal,
        )


def wait_for_epoch_0(uri: str, experiment: str, proc: subprocess.Popen, log: Path):
    """The MLflow run of `rsray train` running in `proc`, once it has logged epoch 0."""
    from mlflow import MlflowClient

    client, deadline, found = MlflowClient(uri), time.monotonic() + 300, None
    while True:
        assert proc.poll() is None, f"training ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"epoch 0 never logged:\n{log.read_text()[-3000:]}"
        found = found or client.get_experiment_by_name(experiment)  # then one request a poll
        runs = client.search_runs([found.experiment_id]) if found else []
        if runs and "epoch" in runs[0].data.metrics:
            return runs[0]
        time.sleep(0.5)


def own_lines(output: str) -> str:
    """The lines rsray's own process wrote: Ray forwards its actors' logs prefixed `(Name pid=N)`,
    and under load Ray's internal PlacementGroupCleaner thread can log a traceback of its own."""
    return "\n".join(line for line in output.splitlines() if not re.search(r"\(\w+ pid=\d+\)", line))


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- tracking outage, run names

RUN = "outage"


def run_args(prepared: str, runs: Path, *extra: str) -> list[str]:
    return ["train/cpu-tiny", f"train.data={prepared}", f"train.storage_path={runs}", f"train.run_name={RUN}", *extra]


@pytest.fixture(scope="module")
def outage(prepared, ray_cluster, tmp_path_factory):
    """`rsray train` (3 epochs) tracked on its own MLflow server. As soon as it holds its run lock, a
    second run with the same name is started in this process (it must be refused while the first
    lives: checked then, because a tiny run can be done before a later check); once epoch 0 is
    logged the server is SIGKILLed, and the first run goes on without it."""
    from rsray.train.run import train
    from rsray.train.run_folder import LOCK_FILE

    folder = tmp_path_factory.mktemp("outage")
    (folder / "mlflow").mkdir()
    server = MlflowServer(folder / "mlflow", str(folder / "artifacts"))
    log, runs = folder / "train.log", folder / "runs"
    extra = [
        f"tracking.uri={server.uri}",
        "tracking.experiment=outage",
        "tracking.retries=1",
        "tracking.system_metrics=false",
    ]
    try:
        proc = rsray_process(
            ["rsray.pipelines.train", *run_args(prepared, runs, "train.epochs=3", *extra)],
            ray_cluster,
            log,
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        )
        deadline = time.monotonic() + 300
        while not (runs / RUN / LOCK_FILE).exists():
            assert proc.poll() is None and time.monotonic() < deadline, f"no run lock:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        with pytest.raises(ConfigError) as second:
            train(load_config(run_args(prepared, runs)[0], run_args(prepared, runs, "tracking.enabled=false")[1:]))
        wait_for_epoch_0(server.uri, "outage", proc, log)
        server.kill()
        code = proc.wait(timeout=300)
    finally:
        server.stop()
    return SimpleNamespace(code=code, output=log.read_text(), uri=server.uri, runs=runs, second=second.value)


def test_a_tracking_outage_mid_run_never_fails_the_finished_training(outage):
    """Training goes on to its last epoch, `rsray train` prints its summary and best checkpoint,
    says once what was not logged, and exits 0."""
    assert outage.code == 0, outage.output[-3000:]
    assert "epoch 2 of 0..2" in outage.output and "best checkpoint (val/mR): " in outage.output
    warnings = [line for line in outage.output.splitlines() if line.startswith("rsray: warning: MLflow")]
    assert len(warnings) == 1, outage.output[-3000:]
    assert f"MLflow at {outage.uri} failed; not logged: " in warnings[0] and "stays RUNNING" in warnings[0]
    assert "Traceback" not in own_lines(outage.output)


def test_a_run_name_in_use_by_a_live_run_is_refused(outage):
    message = str(outage.second)
    assert message.startswith("command line: train.run_name: 'outage' is in use by a live run (pid ")
    assert "\n" not in message
    snapshot = json.loads((outage.runs / RUN / "checkpoint_manager_snapshot.json").read_text())
    kept = [(c["checkpoint_dir_name"], c["metrics"]["epoch"]) for c in snapshot["checkpoint_results"]]
    assert [epoch for _, epoch in kept] == [1, 2]  # the live run's own, as keep_checkpoints=2 leaves them
    assert all((outage.runs / RUN / name / "state.pt").exists() for name, _ in kept)
    assert not (outage.runs / RUN / "rsray-run.json").exists()  # released when that run ended


def test_a_rerun_that_would_ignore_a_changed_setting_is_refused_and_an_unchanged_one_resumes(outage, prepared, caplog):
    from rsray.train.run import train

    args = run_args(prepared, outage.runs, "tracking.enabled=false", "train.epochs=4")
    with pytest.raises(
        ConfigError, match=r"model\.lr: run 'outage' would resume from epoch 2 of .*model\.lr: 0\.001 there, 0\.01 now"
    ):
        train(load_config(args[0], [*args[1:], "model.lr=0.01"]))
    with caplog.at_level(logging.INFO, logger="rsray.train"):
        result = train(load_config(args[0], args[1:]))
    assert f"resuming run {RUN} from epoch 2 (" in caplog.text
    assert [int(m["epoch"]) for m in result.return_value] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- data changed after prepare


@pytest.fixture
def copy_of(prepared, tmp_path):
    """A fresh copy of the prepared sample to damage."""

    def make(name: str) -> Path:
        return Path(shutil.copytree(prepared, tmp_path / name))

    return make


def _shard(folder: Path, split: str) -> Path:
    return folder / read_manifest(str(folder))["splits"][split]["files"][0]["path"]


def test_changed_shards_are_refused_before_an_mlflow_run_or_a_worker_starts(
    copy_of, ray_cluster, mlflow_server, tmp_path
):
    from mlflow import MlflowClient

    from rsray.train.run import train

    truncated = copy_of("truncated")
    shard = _shard(truncated, "train")
    shard.write_bytes(shard.read_bytes()[:-100])
    cfg = load_config(
        "train/cpu-tiny",
        [
            f"train.data={truncated}",
            f"train.storage_path={tmp_path / 'runs'}",
            "train.run_name=refused",
            f"tracking.uri={mlflow_server}",
            "tracking.experiment=refused",
        ],
    )
    started = time.monotonic()
    with pytest.raises(ShardMismatch, match=rf"{shard}: \d+ bytes, the manifest says \d+ \(truncated"):
        train(cfg)
    assert time.monotonic() - started < 30  # refused up front, not by a worker
    experiment = MlflowClient(mlflow_server).get_experiment_by_name("refused")
    assert experiment is None  # refused before the MLflow run opens: nothing is left RUNNING
    assert not list((tmp_path / "runs" / "refused").glob("checkpoint*"))  # no Ray Train run was started


def test_rsray_data_verify_names_the_file_that_changed(copy_of, prepared, capsys):
    assert main(["data", "verify", prepared]) == 0
    assert "sizes and sha256 as in the manifest" in capsys.readouterr().out

    flipped = copy_of("flipped")
    shard = _shard(flipped, "val")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    assert main(["data", "verify", str(flipped)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"rsray: error: {shard}: sha256 ")

    missing = copy_of("missing")
    _shard(missing, "test").unlink()
    assert main(["data", "verify", str(missing)]) == 3
    assert "but missing (run prepare again)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- checkpoints and storage


class NotWeights:
    """Anything `torch.save` pickles that is not a tensor or plain data."""


def test_a_checkpoint_holding_code_is_refused_in_one_line(tmp_path, capsys):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    load_config("train/cpu-tiny").save(folder / "config.yaml")
    torch.save({"model": {}, "payload": NotWeights()}, folder / "state.pt")
    assert main(["evaluate", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "state.pt: refused for safety" in err
    assert "weights_only=False" not in err and "Traceback" not in err

    buffer = io.BytesIO()
    torch.save({"model": {}}, buffer)
    (folder / "state.pt").write_bytes(buffer.getvalue()[:200])
    assert main(["evaluate", str(folder)]) == 2
    assert "state.pt: not a readable checkpoint (truncated" in capsys.readouterr().err


def test_storage_errors_are_one_line_naming_the_uri(s3_bucket, capsys):
    assert main(["data", "verify", "s3://no-such-bucket-here/prepared"]) == 2
    assert last_line(capsys.readouterr().err).startswith(
        "rsray: error: s3://no-such-bucket-here/prepared/manifest.json"
    )
    assert main(["evaluate", f"s3://{s3_bucket}/no/checkpoint"]) == 2
    assert f"s3://{s3_bucket}/no/checkpoint/state.pt: not found" in capsys.readouterr().err
    code = main(["data", "verify", f"s3://{s3_bucket}/x", "prepare.s3_endpoint=http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 3 and err.count("\n") == 1 and "rsray-test" in err, err


# ----------------------------------------------------------------------------- stopping and hanging


def _still_training(pids: set[int]) -> set[int]:
    """Those of `pids` that are still Ray Train worker processes."""
    import psutil

    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).cmdline()[0].startswith("ray::RayTrainWorker"):
                alive.add(pid)
        except (psutil.Error, IndexError):  # gone
            pass
    return alive


def test_the_first_ctrl_c_stops_the_workers_and_marks_the_run_killed(prepared, ray_cluster, tmp_path, mlflow_server):
    from mlflow import MlflowClient

    log = tmp_path / "train.log"
    proc = rsray_process(
        [
            "rsray.pipelines.train",
            *run_args(prepared, tmp_path / "runs", "train.epochs=50"),
            f"tracking.uri={mlflow_server}",
            "tracking.experiment=ctrl-c",
            "tracking.system_metrics=false",
        ],
        ray_cluster,
        log,
    )
    client = MlflowClient(mlflow_server)
    run = wait_for_epoch_0(mlflow_server, "ctrl-c", proc, log)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    try:
        code = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"one Ctrl-C did not stop `rsray train` in 90 s:\n{log.read_text()[-3000:]}")
    output = log.read_text()
    print(f"stopped {time.monotonic() - started:.1f} s after Ctrl-C")
    assert code == 130, output[-3000:]
    assert last_line(output).startswith("rsray: interrupted"), output[-3000:]
    assert "Traceback" not in own_lines(output)
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    (command_log,) = Path(os.environ["RSRAY_LOG_DIR"]).glob(f"train-*-{proc.pid}.log")  # what Ray's workers printed
    workers = {int(pid) for pid in re.findall(r"\(RayTrainWorker pid=(\d+)\)", command_log.read_text())}
    assert workers, command_log.read_text()[-3000:]
    deadline = time.monotonic() + 30
    while _still_training(workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _still_training(workers)


def test_a_sigkilled_driver_takes_its_local_ray_down_and_evaluate_ends_its_run_as_killed(
    prepared, tmp_path, mlflow_server, capsys
):
    """`rsray train` with a local Ray of its own (no RAY_ADDRESS), SIGKILLed once epoch 0 is logged:
    every process of that Ray stops within seconds (without rsray's reaper the dashboard and
    runtime-env agents lived on, re-parented to init, and the workers trained on for a moment), and
    `rsray evaluate` of its checkpoint, finding the run RUNNING with no live driver holding its
    folder, marks it KILLED."""
    import psutil
    import timm
    from mlflow import MlflowClient

    from rsray.weights import sha256_of

    log, runs, weights = tmp_path / "train.log", tmp_path / "runs", tmp_path / "test_resnet.pth"
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    tracked = [f"tracking.uri={mlflow_server}", "tracking.experiment=sigkill", "tracking.system_metrics=false"]
    torch.save(timm.create_model("test_resnet").state_dict(), weights)  # its record is checked in MLflow too
    tracked.append(f"model.backbone_checkpoint={weights}#sha256={sha256_of(weights)}")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rsray.pipelines.train", *run_args(prepared, runs, "train.epochs=50", *tracked)],
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        run = wait_for_epoch_0(mlflow_server, "sigkill", proc, log)
        local_ray = {child.pid for child in psutil.Process(proc.pid).children(recursive=True)}
        assert len(local_ray) > 5, log.read_text()[-3000:]  # GCS, raylet, agents, the Train workers, ...
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 15
    while still_running(local_ray) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid: " ".join(psutil.Process(pid).cmdline())[:80] for pid in still_running(local_ray)}
    assert not left, f"still running after the driver's SIGKILL: {left}"

    snapshot = json.loads((runs / RUN / "checkpoint_manager_snapshot.json").read_text())
    checkpoint = runs / RUN / snapshot["checkpoint_results"][-1]["checkpoint_dir_name"]
    client = MlflowClient(mlflow_server)
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # its driver never ended it
    params = client.get_run(run.info.run_id).data.params
    assert params["weights.model.backbone_checkpoint"] == f"{weights}; sha256 {sha256_of(weights)}"
    assert main(["evaluate", str(checkpoint), "--split", "val"]) == 0
    assert "it was left RUNNING by a driver that died: marked KILLED" in capsys.readouterr().out
    assert client.get_run(run.info.run_id).info.status == "KILLED"


def test_more_workers_than_the_cluster_can_place_is_one_line_after_the_wait(prepared, ray_cluster, tmp_path, capsys):
    """Ray Train would retry starting the worker group forever; rsray waits train.resource_wait_s
    for an autoscaler and then says what does not fit."""
    started = time.monotonic()
    code = main(
        [
            "train",
            *run_args(prepared, tmp_path / "runs", "train.num_workers=99"),
            "train.resource_wait_s=2",
            "tracking.enabled=false",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - started < 60
    assert last_line(err).startswith(
        "rsray: error: command line: train.num_workers: 99 workers of {'CPU': 0.5} cannot be placed: "
        "the cluster's 1 node(s) hold 8 of them at most"
    ), err
    assert "waited 2 s (train.resource_wait_s) for more nodes" in last_line(err)


# ----------------------------------------------------------------------------- errors from inside Ray


FULL = "rsray: error: /full/out/part-00000.parquet: no space left on device ([Errno 28])"


def _disk_full(*_args):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device", "/full/out/part-00000.parquet")


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs, mounted for the test (skipped where it cannot be mounted): writes past 1 MiB
    fail with ENOSPC from the kernel, in whichever process makes them."""
    mounted = []

    def mount(name: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_real_full_disk_ends_prepare_and_train_in_one_line_with_exit_3(prepared, ray_cluster, full_disk, capsys):
    """On a real full filesystem: `rsray prepare` whose Ray Data tasks write the shards, and `rsray
    train` whose worker writes the checkpoint, each end in one line naming the path, exit 3, with no
    traceback on the console (a 4,384-character line holding a Ray worker traceback before)."""
    root = read_manifest(prepared)["config"]["data"]["root"]
    shards = full_disk("shards")
    code = main(
        ["prepare", "presets/cpu-tiny", f"data.root={root}", f"prepare.output={shards}", "prepare.image_size=256"]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 3, lines[-5:]
    assert re.fullmatch(rf"rsray: error: {shards}/\S+: no space left on device \(\[Errno 28\]\)", lines[-1]), lines[-1]
    assert not any("Traceback" in line or "\x1b[" in line for line in lines), lines[-5:]

    runs = full_disk("runs")  # the run lock fits, a 4.6 MB checkpoint does not
    staged_before = set(Path(tempfile.gettempdir()).glob("rsray-ckpt-*"))
    # max_failures=0: Ray Train would restart the group twice (epoch 0 again each time) into the same full disk
    train_args = run_args(prepared, runs, "train.epochs=1", "train.max_failures=0", "tracking.enabled=false")
    code = main(["train", *train_args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 3, lines[-5:]
    assert re.fullmatch(rf"rsray: error: {runs}/\S+: no space left on device \(\[Errno 28\]\)", lines[-1]), lines[-1]
    assert not any("Traceback" in line or "\x1b[" in line for line in lines), lines[-5:]
    # the worker's local copy of the checkpoint that could not be uploaded is gone too (left in /tmp before)
    assert set(Path(tempfile.gettempdir()).glob("rsray-ckpt-*")) <= staged_before


def test_a_full_disk_inside_a_ray_task_a_data_job_or_a_train_worker_is_the_drivers_one_line(ray_cluster, capsys):
    """The same cause, the same line and exit code (3, storage) wherever it was raised: a Ray task,
    a Ray Data map task (wrapped in UserCodeException), or a Train worker (WorkerGroupError, then
    rsray's TrainingFailed); the traceback goes to the log file, not the console."""
    import ray
    from ray.train.v2.api.exceptions import WorkerGroupError

    from rsray.cli import run_cli
    from rsray.train.errors import TrainingFailed

    def train_failure():
        try:
            ray.get(ray.remote(_disk_full).remote())
        except Exception as worker_error:
            group = WorkerGroupError("Training failed due to worker errors", {0: worker_error})
            raise TrainingFailed("training run x failed: ...") from group

    failing = {
        "task": lambda: ray.get(ray.remote(_disk_full).remote()),
        "data": lambda: ray.data.range(8).map_batches(_disk_full).materialize(),
        "train": train_failure,
        "driver": _disk_full,
    }
    for where, fn in failing.items():
        assert run_cli(fn) == 3, where
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1] == FULL, (where, lines[-3:])
        assert not any("Traceback" in line or "\x1b[" in line for line in lines), where
