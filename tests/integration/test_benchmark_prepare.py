"""benchmarks/prepare_throughput at its `--smoke` size on the package's Ray (the other benchmarks'
smoke runs need no Ray: tests/unit/test_benchmark_smoke.py)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_the_prepare_benchmark_runs_at_its_smoke_size(ray_cluster, tmp_path, capsys):
    from benchmarks.prepare_throughput import main

    main(["--smoke", "--workdir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "prepare benchmark: 30 images 32px -> 32px" in printed
    assert "Ray Data stage, warm" in printed and "plain single-process loop" in printed
