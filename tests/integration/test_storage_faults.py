"""rsray against moto's S3 server behind a proxy that fails every third request the way S3 and
networks do (503 SlowDown, a connection dropped before the answer).

- The storage layer: every write, listing and read succeeds with the bytes the server holds,
  because the AWS SDK inside pyarrow retries them (`storage.s3_attempts()`); with a single
  attempt the same faults fail, so the setting is what carries them.
- The pipeline: the shared fault-free run (conftest `trained`) repeated through the proxy. A
  prepare killed while it writes is refused by `rsray train` in one line and completed by a
  rerun; the training is stopped after epoch 0 and resumed; the rerun's shards, the training's
  numbers and `rsray evaluate`'s are the fault-free ones.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from rsray import storage
from rsray.checkpoint import load_checkpoint_state
from rsray.config import load_config
from rsray.data.manifest import read_manifest
from rsray.data.prepare import prepare
from rsray.data.verify import verify_prepared
from rsray.tracking import metric_history
from rsray.train.records import best_checkpoint
from rsray.train.run import train
from tests.faulty_proxy import FaultyProxy

pytestmark = pytest.mark.integration

FAULTY_PREFIX = "through-faults"


def _write_list_read(root: storage.Location, files: dict[str, bytes]) -> dict[str, bytes]:
    for name, data in files.items():
        storage.write_bytes(root.join(name), data)
    listed = storage.list_files(root)
    return {path.rsplit("/", 1)[1]: storage.read_bytes(storage.Location(root.fs, path, path)) for path in listed}


def test_s3_writes_listings_and_reads_are_retried_through_faults(s3_endpoint, s3_bucket, monkeypatch):
    import boto3

    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    files = {f"part-{i}.bin": os.urandom(3000 * (i + 1)) for i in range(3)}
    started = time.perf_counter()
    with FaultyProxy(s3_endpoint, every=3, fault="mixed") as proxy:
        read = _write_list_read(storage.resolve(f"s3://{s3_bucket}/faults/retried", proxy.url), files)
    print(f"{proxy.requests} requests, {proxy.faults} failed by the proxy, {time.perf_counter() - started:.1f} s")
    assert proxy.faults >= 4 and proxy.retries > 0  # the SDK numbers a 503 retry; a dropped one may restart at 1
    assert read == files
    client = boto3.client("s3", endpoint_url=s3_endpoint)  # what the server itself holds
    for name, data in files.items():
        assert client.get_object(Bucket=s3_bucket, Key=f"faults/retried/{name}")["Body"].read() == data

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with FaultyProxy(s3_endpoint, every=2, fault="drop") as proxy, pytest.raises(OSError, match="AWS Error"):
        _write_list_read(storage.resolve(f"s3://{s3_bucket}/faults/once", proxy.url), files)


def test_a_filesystem_sent_to_a_ray_worker_keeps_retrying_past_100_retries(s3_endpoint, s3_bucket, monkeypatch):
    """pyarrow's default retry strategy stops retrying after 100 retries per filesystem object, and
    pyarrow's pickling drops the strategy rsray sets: an S3 filesystem pickled as Ray does it must
    still retry every throttled request however many there have been."""
    import boto3
    import ray.cloudpickle

    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=s3_bucket, Key="faults/quota.bin", Body=b"x")
    with FaultyProxy(s3_endpoint, every=1, fault="503") as proxy:  # every first attempt: 503 SlowDown
        sent = storage.resolve(f"s3://{s3_bucket}/faults", proxy.url).fs
        received = ray.cloudpickle.loads(ray.cloudpickle.dumps(sent))
        sizes = {received.get_file_info(f"{s3_bucket}/faults/quota.bin").size for _ in range(120)}
    assert sizes == {1} and proxy.retries == proxy.faults == 120


def test_a_small_ranged_read_whose_error_overflows_its_buffer_is_retried(s3_endpoint, s3_bucket, monkeypatch):
    """A Parquet column of one row is read in a range of a few dozen bytes; a 503's XML body does not
    fit, and the SDK reports that as final (INTERNAL_FAILURE). `storage.reading` reads again."""
    import io as _io

    import boto3
    import pyarrow as pa

    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    buffer = _io.BytesIO()
    columns = {f"c{i}": [i] for i in range(4)}
    pq.write_table(pa.table(columns), buffer)
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(
        Bucket=s3_bucket, Key="faults/t.parquet", Body=buffer.getvalue()
    )
    key = f"{s3_bucket}/faults/t.parquet"
    # 503 for the first three requests: the size (HEAD) and the footer are retried by the SDK, the
    # first column's few bytes are not
    with FaultyProxy(s3_endpoint, every=1, fault="503", limit=3) as proxy:
        with pytest.raises(OSError, match="INTERNAL_FAILURE during GetObject operation: Failed to flush response"):
            _read_parquet(storage.resolve(f"s3://{key}", proxy.url).fs, key)
    with FaultyProxy(s3_endpoint, every=1, fault="503", limit=3) as proxy:
        fs = storage.resolve(f"s3://{key}", proxy.url).fs
        table = storage.reading(lambda: _read_parquet(fs, key), "read the test file")
    assert proxy.faults == 3
    assert table.to_pydict() == columns


def _read_parquet(fs, path: str):
    with fs.open_input_file(path) as handle:
        return pq.ParquetFile(handle).read()


@pytest.fixture(scope="module")
def through_faults(prepared, trained, ray_cluster, s3_endpoint, s3_bucket, mlflow_server, tmp_path_factory):
    """The shared run's pipeline again, every S3 request through the faulty proxy: `rsray prepare`
    of the same input killed while it writes shards, `rsray train` on what it left, the prepare
    rerun, training with the shared run's settings (stopped after epoch 0, then run again with
    every epoch: one run resumed, where two would each train from the start), and `rsray evaluate`
    of the best checkpoint."""
    folder = tmp_path_factory.mktemp("through-faults")
    data_root = read_manifest(prepared)["config"]["data"]["root"]  # the input the fault-free sample came from
    output_uri = f"s3://{s3_bucket}/{FAULTY_PREFIX}/prepared"
    started = time.perf_counter()
    with FaultyProxy(s3_endpoint, every=3, fault="mixed", delay=0.05) as proxy:
        overrides = [f"data.root={data_root}", f"prepare.output={output_uri}", f"prepare.s3_endpoint={proxy.url}"]
        left = _kill_prepare_while_it_writes(overrides, ray_cluster, s3_endpoint, s3_bucket, folder)
        proxy.delay = 0.0
        refused = _rsray(["train", "train/cpu-tiny", f"train.data={output_uri}", f"train.storage_path={folder}"], proxy)
        faults_before, killed_s = proxy.faults, time.perf_counter() - started
        redone = prepare(load_config("presets/cpu-tiny", overrides))
        cfg, reference = trained
        train_cfg = load_config(
            "train/cpu-tiny",
            [
                f"train.data={output_uri}",
                f"train.storage_path=s3://{s3_bucket}/{FAULTY_PREFIX}/runs",
                f"train.epochs={cfg.train.epochs}",
                f"train.run_name={cfg.train.run_name}",
                f"model.word_dropout={cfg.model['word_dropout']}",
                f"prepare.s3_endpoint={proxy.url}",
                f"tracking.uri={mlflow_server}",
                "tracking.experiment=through-faults",
                "tracking.log_model=false",
            ],
        )
        stopped = copy.deepcopy(train_cfg)
        stopped.train.epochs = 1
        stopped_history = train(stopped).return_value
        result = train(train_cfg)
        resumed_epoch = load_checkpoint_state(result.checkpoint)["epoch"]
        evaluated = _evaluate(best_checkpoint(result, train_cfg), folder / "through-faults.json")
        print(
            f"\n{proxy.requests} S3 requests, {proxy.faults} answered with a fault, {proxy.retries} retries; "
            f"{killed_s:.0f} s to the refusal, {time.perf_counter() - started:.0f} s in all"
        )
        faults = proxy.faults - faults_before
    return SimpleNamespace(
        left=left,
        refused=refused,
        prepared=redone,
        stopped_history=stopped_history,
        result=result,
        resumed_epoch=resumed_epoch,
        evaluated=evaluated,
        faults=faults,
        reference=reference,
        reference_evaluated=_evaluate(best_checkpoint(reference, cfg), folder / "fault-free.json"),
    )


def _kill_prepare_while_it_writes(overrides, ray_cluster, s3_endpoint, s3_bucket, folder) -> list[str]:
    """SIGKILL an `rsray prepare` process (joined to the test's Ray) once its first shard is staged
    on S3; wait until Ray has reclaimed its tasks. Returns the keys it left."""
    import boto3
    import ray

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    prefix = f"{FAULTY_PREFIX}/prepared/"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    log = folder / "killed-prepare.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "rsray"), "prepare", "presets/cpu-tiny", *overrides],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while not client.list_objects_v2(Bucket=s3_bucket, Prefix=f"{prefix}_staging/").get("KeyCount"):
            assert proc.poll() is None, f"prepare ended before it could be killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no shard staged after 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    deadline = time.monotonic() + 30  # the dead driver's Ray Data tasks are stopped and free their CPUs
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.2)
    listing = client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix).get("Contents", [])
    return [item["Key"][len(prefix) :] for item in listing]


def _rsray(argv: list[str], proxy: FaultyProxy) -> tuple[int, list[str]]:
    """`rsray ...` in this process with AWS_ENDPOINT_URL_S3 at the proxy; (exit code, stderr lines)."""
    from pipelines.cli import main

    err = io.StringIO()
    saved = os.environ["AWS_ENDPOINT_URL_S3"]
    os.environ["AWS_ENDPOINT_URL_S3"] = proxy.url
    try:
        with contextlib.redirect_stderr(err):
            code = main([*argv, "tracking.enabled=false"])
    finally:
        os.environ["AWS_ENDPOINT_URL_S3"] = saved
    return code, err.getvalue().strip().splitlines()


def _evaluate(checkpoint, out: Path) -> dict:
    """`rsray evaluate` of a checkpoint on S3 (its config names the endpoint it was trained through)."""
    from pipelines.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["evaluate", f"s3://{checkpoint.path}", "--split", "test", "-o", str(out), "--no-mlflow"]) == 0
    return json.loads(out.read_text())


def test_a_prepare_killed_while_writing_is_refused_by_train_with_one_line(through_faults):
    left = through_faults.left
    assert "prepare-in-progress.json" in left and any(key.startswith("_staging/") for key in left), left
    assert "manifest.json" not in left
    code, err = through_faults.refused
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("rsray: error: s3://") and "/prepared/manifest.json: no manifest: a prepare " in err[0]
    assert "did not finish" in err[0] and "run `rsray prepare` with the same config again" in err[0]


def test_the_rerun_prepare_through_faults_writes_the_fault_free_shards(through_faults, prepared, s3_endpoint):
    manifest = through_faults.prepared.manifest
    assert not through_faults.prepared.skipped
    assert manifest["splits"] == read_manifest(prepared)["splits"]  # the same files, byte for byte (sha256)
    assert manifest["counts"] == read_manifest(prepared)["counts"]
    assert verify_prepared(through_faults.prepared.output, s3_endpoint, ("train", "val", "test")).files > 0


def test_training_through_faults_reports_the_fault_free_numbers_and_checkpoints(through_faults):
    history, reference = through_faults.result.return_value, through_faults.reference.return_value
    assert through_faults.faults >= 10  # prepare, training's reads and checkpoints all met faults
    assert [int(m["epoch"]) for m in history] == [int(m["epoch"]) for m in reference]
    for ours, theirs in zip(history, reference, strict=True):
        for key in ("train/loss", "val/mR", "val/i2t_R1", "val/t2i_R1"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-6), key
    assert len(through_faults.result.best_checkpoints) == len(reference)


def test_a_run_stopped_after_epoch_0_and_resumed_trains_as_the_uninterrupted_run(through_faults, mlflow_server):
    """The shared run trained its epochs without a stop. The run through faults was stopped after
    epoch 0 (its only epoch), then run again with every epoch: Ray Train restores the run folder's
    checkpoint, the worker resumes at epoch 1, the stream reads epoch 1's block order (not epoch 0's
    again) and every rank draws epoch 1's shuffle and augmentation seeds, so epoch 1's loss and val
    mR are the uninterrupted run's (test_training_through_faults_reports_the_fault_free_numbers_and_checkpoints
    compares them too), and the MLflow run of the rerun shows the whole curve. (The tiny VSE++
    schedule is flat over these epochs, so stopping by `train.epochs=1` changes nothing else.) Both
    runs use word dropout, which draws from torch's global RNG: resuming with epoch 0's global seeds
    fails this test as resuming with epoch 0's stream seeds does (without dropout the first passed)."""
    history, reference = through_faults.result.return_value, through_faults.reference.return_value
    assert [int(m["epoch"]) for m in through_faults.stopped_history] == [0]
    assert [int(m["epoch"]) for m in history] == list(range(len(reference)))
    assert through_faults.resumed_epoch == len(reference) - 1
    for epoch, (ours, theirs) in enumerate(zip(history, reference, strict=True)):
        for key in ("train/loss", "val/mR"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-6), (epoch, key)
    print(
        f"\nepoch 1 after a stop: loss {history[1]['train/loss']:.4f}, uninterrupted {reference[1]['train/loss']:.4f}"
    )
    logged = metric_history(through_faults.result.mlflow_run_id, "val/mR", tracking_uri=mlflow_server)
    assert [step for step, _ in logged] == list(range(len(reference)))  # epoch 0 from the checkpoint, 1 trained


def test_evaluate_through_faults_ranks_as_the_fault_free_checkpoint_does(through_faults):
    ours, theirs = through_faults.evaluated, through_faults.reference_evaluated
    assert ours["metrics"] == pytest.approx(theirs["metrics"], abs=1e-6)
    assert ours["smr_metrics"] == pytest.approx(theirs["smr_metrics"], abs=1e-6)
