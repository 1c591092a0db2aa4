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


def test_the_checkpoint_upload_benchmark_runs_both_modes_at_its_smoke_size(tmp_path):
    """In a Ray of its own (a subprocess without RAY_ADDRESS): its bare TorchTrainer runs, left in
    the package's shared Ray, were followed by an rsray run that waited for resources forever."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
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
