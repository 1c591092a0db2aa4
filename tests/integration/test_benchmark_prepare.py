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


def test_the_checkpoint_upload_benchmark_runs_both_modes_at_its_smoke_size(ray_cluster, tmp_path, capsys):
    from benchmarks.checkpoint_upload import main

    main(["--smoke", "--storage", str(tmp_path / "runs")])
    printed = capsys.readouterr().out
    assert "a 12 MiB checkpoint each epoch" in printed
    assert " sync: rank 0 writes and reports in" in printed and "async: rank 0 writes and reports in" in printed
    assert "(mean of 2)" in printed
