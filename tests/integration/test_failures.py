"""What rsray does when something around a run goes wrong, tried for real: the MLflow server dies
mid-run, shards change after prepare, a checkpoint is not what it claims, S3 is not there. The
rule under test: finished work is never thrown away, bad input stops before any worker starts,
and every failure is one line naming what and where (never a traceback), with a documented exit
code: 0 done (warnings allowed), 1 the work failed, 2 bad input or config, 3 storage, 130 stopped.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rsray.cli import main
from rsray.config import load_config
from rsray.data.prepare import read_manifest
from rsray.data.verify import ShardMismatch
from tests.conftest import MlflowServer

pytestmark = pytest.mark.integration


def rsray_process(args: list[str], ray_cluster, log: Path, **env: str) -> subprocess.Popen:
    """`python -m pipelines.<stage> ...` joined to the tests' Ray, output to `log`."""
    environment = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, **env}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", *args], env=environment, stdout=out, stderr=subprocess.STDOUT)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- tracking outage


def test_a_tracking_outage_mid_run_never_fails_the_finished_training(prepared, ray_cluster, tmp_path):
    """The MLflow server is SIGKILLed once epoch 0 is logged: training goes on to its last epoch,
    `rsray train` prints its summary and best checkpoint, says once what was not logged, exits 0."""
    from mlflow import MlflowClient

    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow", str(tmp_path / "artifacts"))
    log = tmp_path / "train.log"
    try:
        proc = rsray_process(
            [
                "pipelines.train",
                "train/cpu-tiny",
                f"train.data={prepared}",
                "train.epochs=3",
                f"train.storage_path={tmp_path / 'runs'}",
                "train.run_name=outage",
                f"tracking.uri={server.uri}",
                "tracking.experiment=outage",
                "tracking.retries=1",
                "tracking.system_metrics=false",
            ],
            ray_cluster,
            log,
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        )
        client, deadline = MlflowClient(server.uri), time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"training ended before the outage:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"epoch 0 never logged:\n{log.read_text()[-3000:]}"
            experiment = client.get_experiment_by_name("outage")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs and "epoch" in runs[0].data.metrics:
                break
            time.sleep(0.5)
        server.kill()
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        server.stop()
    output = log.read_text()
    assert "epoch 2 of 0..2" in output and "best checkpoint (val/mR): " in output
    warnings = [line for line in output.splitlines() if line.startswith("rsray: warning: MLflow")]
    assert len(warnings) == 1, output[-3000:]
    assert f"MLflow at {server.uri} failed; not logged: " in warnings[0] and "stays RUNNING" in warnings[0]
    assert "Traceback" not in output


# ----------------------------------------------------------------------------- data changed after prepare


@pytest.fixture
def copy_of(prepared, tmp_path):
    """A fresh copy of the prepared sample to damage."""

    def make(name: str) -> Path:
        return Path(shutil.copytree(prepared, tmp_path / name))

    return make


def _shard(folder: Path, split: str) -> Path:
    return folder / read_manifest(str(folder))["splits"][split]["files"][0]["path"]


def test_changed_shards_are_refused_before_any_worker_starts_and_the_mlflow_run_is_failed(
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
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("refused").experiment_id])
    assert run.info.status == "FAILED"
    assert not (tmp_path / "runs" / "refused").exists()  # no Ray Train run was started


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
