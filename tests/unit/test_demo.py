"""`rsray demo`'s pieces that run without Ray: its default data and the chance row of its table."""

from __future__ import annotations

from math import comb

import pytest

from pipelines.demo import DEMO_RUNS, chance_metrics
from rsray.config import load_config
from rsray.models import model_config


def test_chance_level_is_what_random_scores_give():
    """t2i R@K of random scores is K / n; i2t R@K is the chance that one of an image's 5 captions is
    among K drawn from 5n. The mean over 400 images lands within a few points of both."""
    n = 400
    m = chance_metrics(n, seed=0)
    for k in (1, 5, 10):
        assert m[f"t2i_R{k}"] == pytest.approx(100 * k / n, abs=1.0)
        i2t = 100 * (1 - comb(5 * n - 5, k) / comb(5 * n, k))
        assert m[f"i2t_R{k}"] == pytest.approx(i2t, abs=2.0)
    assert m == chance_metrics(n, seed=0)  # seeded: the table prints the same row every time


def test_the_demo_data_is_as_large_as_every_tiny_model_reads():
    """The demo prepares images at the size the tiny presets crop: smaller would upsample every
    image, larger only costs decoding (the demo's ten minutes)."""
    demo = load_config("presets/demo")
    assert demo.prepare.image_size == demo.sample.image_size
    for name, _ in DEMO_RUNS:
        augment = model_config(load_config(f"model/{name}-tiny")).augment
        assert augment.crop <= demo.prepare.image_size, name
        assert augment.eval_resize <= demo.prepare.image_size, name


def test_the_demos_table_is_rsray_compare_on_its_runs(tmp_path, capsys):
    """The demo's last step through `rsray compare`'s own parser and run, on a real MLflow store:
    the table of its runs, and a compare run logged beside them (the step once broke when compare
    gained an option the demo's hand-made options lacked)."""
    from mlflow import MlflowClient

    from pipelines.demo import compare_runs
    from rsray.compare import COLUMNS

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("presets/demo", [f"tracking.uri={uri}", "tracking.experiment=demo-test"])
    client = MlflowClient(uri)
    experiment = client.create_experiment("demo-test")
    run = client.create_run(experiment, tags={"model": "vsepp", "dataset": "rsray_sample"})
    for i, (key, _) in enumerate(COLUMNS):
        client.log_metric(run.info.run_id, key, 10.0 + i)
    client.set_terminated(run.info.run_id)
    assert compare_runs(cfg, [run.info.run_id]) == 0
    assert "| vsepp | 1 | 10.00 | 11.00 |" in capsys.readouterr().out
    kinds = [r.data.tags.get("rsray.kind") for r in client.search_runs([experiment])]
    assert sorted(kinds, key=str) == [None, "compare"]
