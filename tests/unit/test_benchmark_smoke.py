"""Every benchmark at its `--smoke` size, so none can rot unseen (a renamed field once broke
`make bench-dove` for weeks). The sizes are tiny: these check that each benchmark runs end to end
and prints its numbers, not the numbers. prepare_throughput needs Ray: tests/integration."""

from __future__ import annotations

import importlib

import pytest

SMOKES = {
    "bf16_scores": "InfoNCE, scale 100",
    "cmpagl_eval": "+ITM+SMR k=2",
    "dove_eval": "streamed R@K equal the full matrix's",
    "eval_throughput": "streaming",
    "gpu_check": "checks OK",
    "train_throughput": "bare PyTorch loop:",
}


@pytest.mark.parametrize("name", sorted(SMOKES))
def test_the_benchmark_runs_at_its_smoke_size(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a benchmark writes stays in the test's folder
    module = importlib.import_module(f"benchmarks.{name}")
    code = module.main(["--smoke", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code in (None, 0), printed[-2000:]  # gpu_check: 1 when a check failed
    assert SMOKES[name] in printed, printed[-2000:]
    assert "nan" not in printed.lower().replace("nan_", ""), printed[-2000:]
