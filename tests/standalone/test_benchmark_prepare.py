"""The benchmarks that need Ray at their `--smoke` size on the package's Ray: prepare_throughput and
checkpoint_upload (the other benchmarks' smoke runs need no Ray: tests/unit/test_benchmark_smoke.py)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_the_prepare_benchmark_runs_at_its_smoke_size(ray_cluster, tmp_path, capsys):
    from benchmarks.prepare_throughput import main

    main(["--smoke", "--workdir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "prepare benchmark: 30 images 32px -> 32px" in printed
    assert "Ray Data stage, warm" in printed and "plain single-process loop" in printed


def test_the_checkpoint_upload_benchmark_runs_both_modes_at_its_smoke_size(ray_cluster, tmp_path):
    """A process of its own joined to the package's Ray, as the other benchmarks here: its bare
    TorchTrainer runs, when they ran in this process, were followed by an rsray run that waited for
    resources forever; a driver that exits has Ray free everything it held. (Until 2026-12-07 it
    started a Ray of its own, about 25 s of CPU.)"""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.checkpoint_upload", "--smoke", "--storage", str(tmp_path / "runs")],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    assert "a 12 MiB checkpoint each epoch" in printed
    assert " sync: rank 0 writes and reports in" in printed and "async: rank 0 writes and reports in" in printed
    assert "(mean of 2)" in printed
    # what its runs held is free again for the package's next run (Ray frees an exited driver's
    # actors and placement groups; it updates its resource view within a few seconds)
    deadline = time.monotonic() + 60
    while ray_cluster.available_resources().get("CPU") != ray_cluster.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, f"CPU still held: {ray_cluster.available_resources()}"
        time.sleep(0.5)


def test_the_paper_size_rehearsal_runs_at_its_smoke_size(ray_cluster, prepared, s3_bucket, mlflow_server, tmp_path):
    """`python -m benchmarks.paper_size --smoke` on the package's Ray, moto's S3 and the MLflow
    server, training on the shared sample: its `rsray train` and `rsray evaluate` runs, the numbers
    it reads back from MLflow, S3 and the processes, and its table."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "benchmarks.paper_size", "--smoke", "--data", prepared]
    command += ["--s3", f"s3://{s3_bucket}/paper-size", "--tracking-uri", mlflow_server]
    command += ["--out", str(tmp_path / "rows.json")]
    done = subprocess.run(
        command, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    print("\n" + "\n".join(done.stdout.splitlines()[-3:]))
    assert row["model"] == "model/vsepp-tiny" and row["gallery_images"] > 0
    assert row["step_s"] > 0 and row["evaluate_s"] > 0 and row["train_command_s"] > row["step_s"]
    for process in ("worker_peak_mib", "train_driver_peak_mib", "evaluate_peak_mib"):  # torch alone is ~300 MiB
        assert 200 < row[process] < 16384, process
    assert 0 < row["model_mib"] and 0 < row["checkpoint_mib"] < 64  # the tiny VSE++ with Adam: a few MiB
    assert "| model/vsepp-tiny |" in done.stdout.splitlines()[-1]
    assert row["train_scored_test"] is False  # train.evaluate_test=false left the gallery to rsray evaluate


def test_the_corpus_benchmark_runs_at_its_smoke_size(ray_cluster, s3_bucket, tmp_path):
    """`python -m benchmarks.corpus_scale --smoke` on the package's Ray and moto's S3: a corpus of
    100 samples prepared as WebDataset shards from S3 and as a Karpathy folder, with its table."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "benchmarks.corpus_scale", "--smoke", "--s3", f"s3://{s3_bucket}/corpus-bench"]
    command += ["--workdir", str(tmp_path), "--out", str(tmp_path / "rows.json")]
    done = subprocess.run(
        command, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["path"], r["images"], r["nodes"]) for r in rows] == [
        ("webdataset on S3", 100, 1),
        ("Karpathy, local (before)", 100, 1),
    ]
    for row in rows:
        assert row["seconds"] > 0 and row["driver_mib"] > 50 and row["workers_mib"] > 0 and row["manifest_kib"] > 1
    assert "| webdataset on S3 | 100 | 1 |" in done.stdout
