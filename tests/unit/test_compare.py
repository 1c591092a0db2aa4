"""The comparison table's formats and its mean ± std, on groups written here."""

from __future__ import annotations

import csv
import io

import pytest

from rsray.compare import COLUMNS, Group, figures, table


def group(name: str, *mrs: float) -> Group:
    """A group whose every column holds `mrs` plus the column's index (so columns differ)."""
    values = {key: [mr + i for mr in mrs] for i, (key, _) in enumerate(COLUMNS)}
    return Group(name, [f"{name}-{i}" for i in range(len(mrs))], values)


GROUPS = [group("swan", 30.0), group("prior_clip", 40.0, 42.0, 44.0)]


def test_markdown_shows_mean_and_sample_std_where_there_are_repeats():
    lines = table(GROUPS, "md").splitlines()
    assert lines[0] == "| model | runs | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | mR | mR+SMR |"
    assert lines[2] == "| swan | 1 | 30.00 | 31.00 | 32.00 | 33.00 | 34.00 | 35.00 | 36.00 | 37.00 |"
    # 40, 42, 44: mean 42, sample std 2
    assert lines[3].startswith("| prior_clip | 3 | 42.00 ± 2.00 | 43.00 ± 2.00 |")
    assert lines[3].endswith("| 49.00 ± 2.00 |")


def test_csv_has_a_mean_and_a_std_column_per_number():
    rows = list(csv.reader(io.StringIO(table(GROUPS, "csv"))))
    assert rows[0][:5] == ["group", "runs", "i2t R@1", "i2t R@1 std", "i2t R@5"]
    assert rows[2][:4] == ["prior_clip", "3", "42.0000", "2.0000"]
    assert rows[1][-2:] == ["37.0000", "0.0000"] and len(rows[1]) == 2 + 2 * len(COLUMNS)


def test_latex_is_a_booktabs_tabular_with_escaped_names():
    tex = table(GROUPS, "latex")
    assert tex.startswith("\\begin{tabular}{lrrrrrrrrr}\n\\toprule\nModel & Runs & i2t R@1")
    assert "prior\\_clip & 3 & 42.00 $\\pm$ 2.00 & " in tex and tex.rstrip().endswith("\\end{tabular}")
    with pytest.raises(ValueError, match="--format must be one of md, csv, latex"):
        table(GROUPS, "html")


def test_a_missing_number_is_a_dash_and_figures_are_drawn():
    partial = Group("vsepp", ["r"], {"test/mR": [25.0]})
    assert table([partial], "md").splitlines()[2] == "| vsepp | 1 | - | - | - | - | - | - | 25.00 | - |"
    drawn = figures(GROUPS)
    assert set(drawn) == {"compare_mR.png", "compare_recall.png"}
    bars = drawn["compare_mR.png"].axes[0]
    heights = sorted(round(patch.get_height(), 6) for patch in bars.patches)
    assert heights == [36.0, 37.0, 48.0, 49.0]  # mR and mR+SMR of each group


def test_a_model_with_an_itm_stage_gets_a_row_per_stage_from_a_real_store(tmp_path):
    """CMPAGL's three rows (ITC, +ITM, +ITM+SMR) from what its run logged, after its own row; a
    study's parent is not a repeat. Against a real MLflow store (SQLite)."""
    from mlflow import MlflowClient

    from rsray.compare import collect

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("stages")

    def run(model: str, metrics: dict[str, float], kind: str = "") -> None:
        created = client.create_run(experiment, tags={"model": model, **({"rsray.kind": kind} if kind else {})})
        for key, value in metrics.items():
            client.log_metric(created.info.run_id, key, value)
        client.set_terminated(created.info.run_id)

    itc = {key: 10.0 + i for i, (key, _) in enumerate(COLUMNS)}
    itm = {key.replace("test/", "test_itm/"): 20.0 + i for i, (key, _) in enumerate(COLUMNS[:-1])}
    itm_smr = {key.replace("test/", "test_itm_smr/"): 30.0 + i for i, (key, _) in enumerate(COLUMNS[:-1])}
    run("vsepp", {key: 1.0 for key, _ in COLUMNS})
    run("cmpagl", {**itc, **itm, **itm_smr})
    run("cmpagl", {key: 99.0 for key, _ in COLUMNS}, kind="study")  # a study parent: left out
    rows = table(collect(client, "stages"), "md").splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == ["| vsepp", "| cmpagl", "| cmpagl +ITM", "| cmpagl +ITM+SMR"]
    assert rows[1].endswith("| 16.00 | 17.00 |")  # ITC's mR and mR+SMR
    assert rows[2].endswith("| 26.00 | 36.00 |")  # +ITM's mR, and +ITM+SMR's mR in the SMR column
    assert rows[3].startswith("| cmpagl +ITM+SMR | 1 | 30.00 |") and rows[3].endswith("| 36.00 | - |")


def test_runs_on_different_data_never_share_a_row(tmp_path):
    """Three VSE++ runs on three prepared outputs (two share the manifest's name): three rows named
    by dataset (and digest where names clash), never one mean; runs on one dataset keep one row.
    Runs without the digest tag (sweep trials, older runs) are told apart by their dataset input."""
    from mlflow import MlflowClient
    from mlflow.entities import Dataset, DatasetInput

    from rsray.compare import collect

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("datasets")

    def run(dataset: str, digest: str, mR: float, tagged: bool = True) -> None:
        tags = {"model": "vsepp", "dataset": "rsray_sample"}  # what runs used to say, whatever they read
        if tagged:
            tags.update(dataset=dataset, dataset_digest=digest)
        created = client.create_run(experiment, tags=tags)
        if not tagged:
            source = Dataset(dataset, digest, "local", '{"uri": "/data"}')
            client.log_inputs(created.info.run_id, datasets=[DatasetInput(source)])
        client.log_metric(created.info.run_id, "test/mR", mR)
        client.set_terminated(created.info.run_id)

    run("rsray_sample", "aaaaaaaa11", 50.0)
    run("rsray_sample", "bbbbbbbb22", 60.0, tagged=False)
    run("ucm_like", "cccccccc33", 70.0)
    rows = {g.name: g.values["test/mR"] for g in collect(client, "datasets")}
    assert rows == {
        "vsepp on rsray_sample (aaaaaaaa)": [50.0],
        "vsepp on rsray_sample (bbbbbbbb)": [60.0],
        "vsepp on ucm_like": [70.0],
    }
    same = client.create_experiment("one-dataset")
    for value in (50.0, 52.0):
        created = client.create_run(same, tags={"model": "vsepp", "dataset": "d", "dataset_digest": "x"})
        client.log_metric(created.info.run_id, "test/mR", value)
        client.set_terminated(created.info.run_id)
    ((group),) = collect(client, "one-dataset")
    assert group.name == "vsepp" and group.values["test/mR"] == [50.0, 52.0]


def test_published_rows_follow_the_runs_of_their_model_and_dataset_with_the_difference_in_mr(tmp_path):
    """SWAN runs on RSITMD (two seeds) and RSICD, CMPAGL with its ITM stage and VSE++ on RSITMD: two
    dataset groups; each SWAN row is followed by the paper's row for its dataset, with its mean mR
    minus the paper's; CMPAGL and VSE++ have no published row, so no row and no difference."""
    from mlflow import MlflowClient

    from rsray.compare import collect
    from rsray.published import PUBLISHED

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("papers")

    def run(model: str, dataset: str, mr: float, **extra: float) -> None:
        tags = {"model": model, "dataset": dataset, "dataset_digest": f"{dataset}-digest"}
        created = client.create_run(experiment, tags=tags)
        for key, value in {"test/mR": mr, "test/i2t_R1": mr / 2, **extra}.items():
            client.log_metric(created.info.run_id, key, value)
        client.set_terminated(created.info.run_id)

    run("swan", "rsitmd", 30.0)
    run("cmpagl", "rsitmd", 40.0, **{"test_itm/mR": 41.0})
    run("swan", "rsitmd", 32.0)
    run("vsepp", "rsitmd", 20.0)
    run("swan", "rsicd", 21.0)
    groups = collect(client, "papers")
    assert [g.name for g in groups] == [
        "swan on rsitmd",
        "SWAN, ICMR 2023 (published) on rsitmd",
        "cmpagl on rsitmd",
        "cmpagl on rsitmd +ITM",
        "vsepp on rsitmd",
        "swan on rsicd",
        "SWAN, ICMR 2023 (published) on rsicd",
    ]
    paper = {row.dataset: row for row in PUBLISHED if row.model == "swan"}
    assert groups[1].values == {k: [v] for k, v in paper["rsitmd"].metrics.items()} and groups[1].run_ids == []
    assert groups[0].delta_mr() == pytest.approx(31.0 - 34.11) and groups[5].delta_mr() == pytest.approx(21.0 - 20.61)
    lines = table(groups, "md").splitlines()
    assert lines[0].endswith("| mR | mR+SMR | Δ mR |")
    assert lines[2] == "| swan on rsitmd | 2 | 15.50 ± 0.71 | - | - | - | - | - | 31.00 ± 1.41 | - | -3.11 |"
    paper_line = "| SWAN, ICMR 2023 (published) on rsitmd | paper | 13.35 | 32.15 | 46.90 | 11.24 | 40.40 | 60.60 |"
    assert lines[3] == paper_line + " 34.11 | - | - |"
    assert lines[4].endswith("| 40.00 | - | - |") and lines[7].endswith("| 21.00 | - | +0.39 |")
    rows = list(csv.reader(io.StringIO(table(groups, "csv"))))
    assert rows[0][-2:] == ["delta mR", "published in"] and rows[2][-1] == "SWAN, ICMR 2023"
    assert rows[1][-2:] == ["-3.1100", ""]
    assert collect(client, "papers", published=False)[1].name == "cmpagl on rsitmd"
    assert "+ITM" not in [g.name for g in collect(client, "papers", group_by="dataset")][0]


def test_each_published_row_s_mr_is_the_mean_of_its_six_recalls():
    """A typo in a copied number shows: a paper's mR is the mean of its six R@K (to its rounding)."""
    import statistics

    from rsray.published import PUBLISHED, RECALLS

    full = [row for row in PUBLISHED if len(row.metrics) == 7]
    assert len(full) == 4
    for row in full:
        recalls = [row.metrics[f"test/{name}"] for name in RECALLS]
        assert row.metrics["test/mR"] == pytest.approx(statistics.fmean(recalls), abs=0.006), row
