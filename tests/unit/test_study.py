"""rsray.study: members over folds and seeds, the parent's mean and sample spread, the report line,
and a study run again reusing what finished (against a real MLflow store in a SQLite file; the
training itself is replaced here by a function that logs given numbers: the Ray path is in
tests/standalone/test_study.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from rsray.config import ConfigError, load_config
from rsray.study import StudyReport, aggregate, members, parent_metrics, run_study


def test_members_are_folds_times_seeds_each_with_its_own_data_and_run_name():
    cfg = load_config("model/vsepp-tiny", ["study.seeds=[3,4]", "study.folds=2", "prepare.output=/d/out/"])
    found = members(cfg)
    assert [m.key for m in found] == ["fold0-seed3", "fold0-seed4", "fold1-seed3", "fold1-seed4"]
    last = found[-1].cfg
    assert (last.train.seed, last.data.validation.mode, last.data.validation.folds, last.data.validation.fold) == (
        4,
        "folds",
        2,
        1,
    )
    assert last.prepare.output == last.train.data == "/d/out-fold1of2"
    assert last.train.run_name == "vsepp-rsray_sample-study-fold1-seed4"
    assert cfg.train.seed == 0 and cfg.prepare.output == "/d/out/"  # the study's own config is untouched
    plain = members(load_config("model/vsepp-tiny", ["study.seeds=[7]", "train.data=/prepared", "study.name=s"]))
    assert [(m.key, m.cfg.train.data, m.cfg.train.run_name) for m in plain] == [("seed7", "/prepared", "s-seed7")]


@pytest.mark.parametrize("override", ["study.seeds=[]", "study.seeds=[1,1]", "study.folds=1"])
def test_a_study_without_a_spread_to_measure_is_refused_by_key(override):
    with pytest.raises(ConfigError, match=f"{override.split('=')[0]}:"):
        load_config("model/vsepp-tiny", [override])


def test_the_parent_holds_the_mean_and_the_sample_standard_deviation():
    values = aggregate(
        [
            {"test/mR": 30.0, "test_smr/mR": 31.0, "val/mR": 9.0, "test/i2t_R1": 1.0},
            {"test/mR": 33.0, "test_smr/mR": 35.0, "val/mR": 9.0},
        ]
    )
    assert values == {"test/mR": [30.0, 33.0], "test_smr/mR": [31.0, 35.0]}  # only what every member has
    out = parent_metrics(values)
    assert out["test/mR"] == 31.5 and out["test_smr/mR"] == 33.0
    assert out["test_std/mR"] == pytest.approx(math.sqrt(((30 - 31.5) ** 2 + (33 - 31.5) ** 2) / (2 - 1)))
    assert out["test_smr_std/mR"] == pytest.approx(math.sqrt(8.0))
    assert parent_metrics({"test/mR": [5.0]})["test_std/mR"] == 0.0


def test_the_report_says_mean_spread_and_what_was_repeated():
    cfg = load_config("model/vsepp-tiny", ["study.seeds=[0]", "study.folds=3"])
    report = StudyReport("s", members(cfg), {"test/mR": [33.5, 34.1, 34.7], "test_smr/mR": [35.0, 35.0, 35.0]})
    assert "mR 34.10 ± 0.60 (3 folds)" in report.lines()
    assert report.lines()[-1] == "mR with SMR 35.00 ± 0.00 (3 folds)"
    seeds = StudyReport("s", members(load_config("model/vsepp-tiny", ["study.seeds=[0,1]", "study.folds=3"])))
    assert seeds.spread() == "3 folds x 2 seeds"
    assert StudyReport("s", members(load_config("model/vsepp-tiny", ["study.seeds=[0,1]"]))).spread() == "2 seeds"


def test_a_study_run_again_reuses_finished_members_and_opens_no_second_parent(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        "model/vsepp-tiny",
        [
            "study.seeds=[0,1]",
            "study.folds=2",
            f"tracking.uri={uri}",
            "tracking.experiment=study-unit",
            "tracking.system_metrics=false",
            f"prepare.output={tmp_path / 'p'}",
        ],
    )
    trained, prepared = [], []

    def train(member_cfg, tracker):
        trained.append(member_cfg.train.run_name)
        mR = 30.0 + member_cfg.train.seed + 2 * member_cfg.data.validation.fold
        tracker.log_metrics({"mR": mR}, step=1, prefix="test/")
        tracker.log_metrics({"mR": mR + 1}, step=1, prefix="test_smr/")
        tracker.end("FINISHED")
        return SimpleNamespace(test_report={"metrics": {"mR": mR}, "smr_metrics": {"mR": mR + 1}})

    first = run_study(cfg, train_fn=train, prepare_fn=lambda c: prepared.append(c.train.data))
    assert len(trained) == 4 and prepared == [str(tmp_path / "p-fold0of2")] * 2 + [str(tmp_path / "p-fold1of2")] * 2
    assert first.metrics["test/mR"] == [30.0, 31.0, 32.0, 33.0]
    client = MlflowClient(uri)
    parent = client.get_run(first.parent_run_id)
    assert parent.data.metrics["test/mR"] == 31.5 and parent.data.tags["rsray.study_spread"] == "2 folds x 2 seeds"
    runs = client.search_runs([parent.info.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(trained)

    again = run_study(cfg, train_fn=train, prepare_fn=lambda c: prepared.append(c.train.data))
    assert len(trained) == 4 and again.parent_run_id == first.parent_run_id  # nothing trained twice
    assert again.reused == ["fold0-seed0", "fold0-seed1", "fold1-seed0", "fold1-seed1"]
    assert again.metrics == first.metrics
    assert len(client.search_runs([parent.info.experiment_id])) == len(runs)


def test_a_study_needs_tracking():
    with pytest.raises(ConfigError, match="tracking.enabled"):
        run_study(load_config("model/vsepp-tiny", ["tracking.enabled=false"]))


def test_seeds_given_before_overrides_leave_the_overrides_alone(monkeypatch, tmp_path, capsys):
    """`rsray study CONFIG --seeds 0 1 key=value`: argparse's nargs="+" takes key=value too; the
    command gives it back as an override; a word that is not a seed is refused in one line."""
    import pipelines.study as study

    monkeypatch.setenv("RSRAY_LOG_DIR", str(tmp_path))
    seen = []
    monkeypatch.setattr(study, "run", lambda cfg: seen.append(cfg) or 0)
    assert study.main(["train/cpu-tiny", "--seeds", "0", "1", "train.epochs=1", "study.name=s"]) == 0
    (cfg,) = seen
    assert list(cfg.study.seeds) == [0, 1] and cfg.train.epochs == 1 and cfg.study.name == "s"
    with pytest.raises(SystemExit) as exit_:
        study.main(["train/cpu-tiny", "--seeds", "0", "one"])
    assert exit_.value.code == 2 and "argument --seeds: 'one' is not a seed (an integer)" in capsys.readouterr().err
