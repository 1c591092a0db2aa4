"""Integration fixtures, shared by every module of this package (tests/integration is a package, so
`scope="package"` ends with its last module): one Ray instance (with more logical CPUs than cores,
so Ray Data and Train don't starve each other), one prepared sample and one run trained on S3."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from pathlib import Path

import pytest

from rsray.config import load_config
from rsray.console import setup_logging
from rsray.train.run import train
from tests.conftest import local_test_ray, prepare_tiny_sample


@pytest.fixture(scope="package")
def ray_cluster(s3_endpoint, mlflow_server):
    """A real local Ray (separate worker processes) for every integration module; it stops when
    the last one ends, so the unit tests run without Ray as they would alone. It starts after the S3 and
    MLflow fixtures have put the test credentials in os.environ, so the raylet and every worker inherit them."""
    with local_test_ray() as ray:
        yield ray


@pytest.fixture(scope="package")
def prepared(ray_cluster, tmp_path_factory):
    """The tiny sample (120 images at 64 px) prepared by the real Ray Data stage: the train,
    sweep and failure modules all train on it. Returns the prepared folder."""
    return prepare_tiny_sample(tmp_path_factory)


EPOCHS = 2
RUNS_PREFIX = "on-s3/runs"
REGISTERED, ALIAS = "vsepp-test", "vsepp-rsray_sample"  # alias: <model>-<data.name>
WORD_DROPOUT = 0.2


@pytest.fixture(scope="package")
def prepared_on_s3(prepared, s3_endpoint, s3_bucket) -> str:
    """The session's prepared sample uploaded to S3 as a user would (boto3)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for file in Path(prepared).rglob("*"):
        if file.is_file():
            client.upload_file(str(file), s3_bucket, f"on-s3/data/{file.relative_to(prepared).as_posix()}")
    return f"s3://{s3_bucket}/on-s3/data"


class _Lines(logging.Handler):
    """Every log line of the driver while the shared run trains, as rsray formats them."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="package")
def trained(prepared_on_s3, s3_bucket, mlflow_server):
    """The shared run (test_train reads it; test_storage_faults repeats it through S3 faults and
    compares), tracked on the basic-auth MLflow server with the login from the environment, as a
    cluster job is. Returns (cfg, result)
    and sets `result.log_lines` and `result.summary` (what `rsray train` prints) and `result.command_log`
    (the command's log file, `rsray.console`)."""
    from pipelines.train import print_summary

    cfg = load_config(
        "train/cpu-tiny",
        [
            f"train.data={prepared_on_s3}",
            f"train.storage_path=s3://{s3_bucket}/{RUNS_PREFIX}",
            f"train.epochs={EPOCHS}",
            "train.run_name=vsepp-tiny-test",
            "train.decode_workers=1",  # each worker forks a decode process
            # dropout draws from torch's global RNG: test_storage_faults' stopped-and-resumed run only
            # matches this one if the worker seeds every epoch from (seed, rank, epoch) on resume too
            f"model.word_dropout={WORD_DROPOUT}",
            f"tracking.uri={mlflow_server}",  # the login comes from MLFLOW_TRACKING_USERNAME/_PASSWORD
            "tracking.experiment=train-test",
            f"tracking.register_as={REGISTERED}",
        ],
    )
    started = time.perf_counter()
    command_log = setup_logging(stage="train")  # as `rsray train` does: the libraries' lines go to this file
    lines = _Lines()
    logging.getLogger().addHandler(lines)
    try:
        result = train(cfg)
    finally:
        logging.getLogger().removeHandler(lines)
    print(f"2 workers x {EPOCHS} epochs: {time.perf_counter() - started:.1f}s")
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        print_summary(cfg, result)
    result.log_lines, result.summary, result.command_log = lines.lines, summary.getvalue(), command_log
    return cfg, result
