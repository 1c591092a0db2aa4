"""Sweep files: search-space parsing, one-line errors naming file and key, concurrency from
cluster resources, resume refusal, and the summary records (no Ray started)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from rsray.config import CONF_DIR, ConfigError
from rsray.sweep import (
    TAG_EARLY,
    TAG_ROLE,
    TAG_SWEEP,
    TAG_TRIAL,
    Param,
    TrialSummary,
    best_trial,
    load_sweep,
    resolved_algorithm,
    resolved_scheduler,
    trial_config,
)
from rsray.sweep.driver import claim_folder
from rsray.sweep.figures import metric_vs_params
from rsray.sweep.reconcile import reconcile_child_runs
from rsray.sweep.report import summary_csv
from rsray.sweep.search import make_scheduler, make_search_algorithm, max_concurrent_trials, recorded_results
from rsray.sweep.spec import optuna_installed

TINY = CONF_DIR / "train" / "cpu-tiny.yaml"


def write_sweep(tmp_path: Path, sweep_section: str, extra: str = "", name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"defaults: [{TINY}]\ntrain: {{epochs: 4}}\n{extra}sweep:\n{sweep_section}")
    return path


@pytest.mark.parametrize("path", sorted((CONF_DIR / "sweep").glob("*.yaml")), ids=lambda p: p.stem)
def test_ready_sweeps_load(path):
    overrides = ["sweep.checkpoint=some/checkpoint"] if "smr" in path.stem else []
    if path.stem in ("swan-margin", "dove-lambda_g"):  # their frozen ResNet-50 needs weights: given as a user would
        overrides.append("model.backbone_checkpoint=/mnt/weights/resnet50.pth")
    try:
        sweep = load_sweep(path, overrides)
    except ConfigError as exc:
        if "unknown model" in str(exc) or "config file not found" in str(exc):
            pytest.skip(f"its model is not in this checkout yet: {exc}")
        raise
    assert sweep.params and sweep.name == path.stem
    assert sweep.metric.endswith("/mR")
    assert resolved_scheduler(sweep) == ("fifo" if sweep.settings.kind == "smr" else "asha")


def test_every_kind_becomes_its_tune_domain(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

    sweep = load_sweep(
        write_sweep(
            tmp_path,
            """  space:
    model.margin: {grid: [0.1, 0.2]}
    model.max_violation: {choice: [true, false]}
    model.word_dropout: {uniform: [0, 0.5]}
    model.lr: {loguniform: [1e-5, 1e-3]}
    model.decay_every: {randint: [5, 10]}
""",
        )
    )
    params = {p.key: p for p in sweep.params}
    assert [p.kind for p in sweep.params] == ["grid", "choice", "uniform", "loguniform", "randint"]
    assert params["model.margin"].domain() == {"grid_search": [0.1, 0.2]}
    assert isinstance(params["model.max_violation"].domain(), Categorical)
    lr = params["model.lr"].domain()
    assert isinstance(lr, Float) and isinstance(lr.get_sampler(), LogUniform)
    assert (lr.lower, lr.upper) == (1e-5, 1e-3)  # `1e-5` is a number here (YAML 1.2), not text
    decay = params["model.decay_every"].domain()
    assert isinstance(decay, Integer) and (decay.lower, decay.upper) == (5, 11)  # [5, 10] both included
    assert params["model.word_dropout"].values == [0.0, 0.5]
    assert resolved_algorithm(sweep) == "random"  # a grid key rules Optuna out; it is crossed with random draws


def test_nested_keys_and_command_line_overrides(tmp_path):
    path = write_sweep(
        tmp_path,
        """  space:
    model: {margin: {grid: [0.1, 0.2]}}
    model.lr: {uniform: [0.001, 0.002]}
""",
    )
    sweep = load_sweep(
        path,
        ["train.epochs=6", "sweep.search.num_samples=3", "sweep.space.model.lr={grid: [1e-4]}", "sweep.name=other"],
    )
    assert {p.key: (p.kind, p.values) for p in sweep.params} == {
        "model.margin": ("grid", [0.1, 0.2]),
        "model.lr": ("grid", [1e-4]),
    }
    assert sweep.base.train.epochs == 6 and sweep.max_epochs == 6
    assert sweep.settings.search.num_samples == 3 and sweep.name == "other"
    assert sweep.folder.endswith("/data/runs/sweeps/other") and Path(sweep.folder).is_absolute()
    assert resolved_algorithm(sweep) == "grid"
    only_cli = load_sweep(
        write_sweep(tmp_path, "  name: cli\n", name="cli.yaml"), ["sweep.space.model.margin.choice=[0.1, 0.3]"]
    )
    assert [(p.key, p.kind, p.values) for p in only_cli.params] == [("model.margin", "choice", [0.1, 0.3])]


SPACE_ERRORS = [
    ("model.lr: {gird: [1]}", "sweep.space.model.lr", "unknown kind gird"),
    ("model.lr: {uniform: [1]}", "sweep.space.model.lr", "expected [low, high], got 1 values"),
    ("model.lr: {uniform: [2, 1]}", "sweep.space.model.lr", "low must be below high"),
    ("model.lr: {loguniform: [0, 1]}", "sweep.space.model.lr", "low must be positive"),
    ("model.lr: {uniform: [a, 1]}", "sweep.space.model.lr", "bounds must be numbers"),
    ("model.decay_every: {randint: [1.5, 3]}", "sweep.space.model.decay_every", "bounds must be integers"),
    ("model.lr: {grid: []}", "sweep.space.model.lr", "expected a non-empty list"),
    ("model.lr: {grid: [1], choice: [2]}", "sweep.space.model.lr", "exactly one of"),
    ("model.lr: 0.1", "sweep.space.model.lr", "expected {grid|choice|uniform|loguniform|randint: [...]}"),
    ("model.lr: {grid: [fast]}", "sweep.space.model.lr", "'fast': expected float, got str 'fast'"),
    ("model.margn: {grid: [0.1]}", "sweep.space.model.margn", "unknown key"),
    ("train.epochs: {grid: [0]}", "sweep.space.train.epochs", "0: must be positive, got 0"),
    ("train.storage_path: {grid: [a]}", "sweep.space.train.storage_path", "set by the sweep"),
    ("solver.lr: {grid: [1]}", "sweep.space.solver.lr", "not a config key"),
]


@pytest.mark.parametrize("space, key, problem", SPACE_ERRORS, ids=[e[2] for e in SPACE_ERRORS])
def test_bad_space_is_one_line_naming_file_and_key(tmp_path, space, key, problem):
    path = write_sweep(tmp_path, f"  space:\n    {space}\n")
    with pytest.raises(ConfigError) as error:
        load_sweep(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: "), message
    assert problem in message


SETTING_ERRORS = [
    ("  search: {algorithm: bayes}\n", [], "sweep.search.algorithm", "must be auto, random, grid or optuna"),
    ("  search: {algorithm: grid}\n", [], "sweep.search.algorithm", "sweep.space.model.lr is uniform"),
    ("  scheduler: {grace_period: 5}\n", [], "sweep.scheduler.grace_period", "exceed the longest trial (4 epochs)"),
    ("  scheduler: {reduction_factor: 1}\n", [], "sweep.scheduler.reduction_factor", "must be > 1"),
    ("  kind: smr\n  checkpoint: c\n", [], "sweep.space.model.lr", "an smr sweep varies only"),
    ("  colour: red\n", [], "sweep.colour", "unknown key"),
    ("  trial_max_failures: -2\n", [], "sweep.trial_max_failures", "must be >= -1 (-1: restart forever), got -2"),
]


@pytest.mark.parametrize("extra, overrides, key, problem", SETTING_ERRORS, ids=[e[3] for e in SETTING_ERRORS])
def test_bad_settings_are_one_line_naming_file_and_key(tmp_path, extra, overrides, key, problem):
    path = write_sweep(tmp_path, "  space:\n    model.lr: {uniform: [0.001, 0.002]}\n" + extra)
    with pytest.raises(ConfigError) as error:
        load_sweep(path, overrides)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: {key}: "), message
    assert problem in message


def test_errors_from_the_command_line_name_it(tmp_path):
    path = write_sweep(tmp_path, "  space:\n    model.lr: {uniform: [0.001, 0.002]}\n")
    with pytest.raises(ConfigError, match=r"^command line: sweep.search.num_samples: must be positive, got 0$"):
        load_sweep(path, ["sweep.search.num_samples=0"])
    with pytest.raises(ConfigError, match=r"^command line: sweep.space.model.lr: uniform: low must be below high"):
        load_sweep(path, ["sweep.space.model.lr={uniform: [1, 0.5]}"])
    with pytest.raises(ConfigError, match=r"^command line: train.epochs: expected int"):
        load_sweep(path, ["train.epochs=many"])


def test_file_problems_are_one_line(tmp_path):
    no_section = tmp_path / "plain.yaml"
    no_section.write_text(f"defaults: [{TINY}]\n")
    with pytest.raises(ConfigError, match=r"plain.yaml: sweep: missing"):
        load_sweep(no_section)
    with pytest.raises(ConfigError, match=r"nowhere: sweep file not found"):
        load_sweep(tmp_path / "nowhere")
    empty = write_sweep(tmp_path, "  name: x\n", name="empty.yaml")
    with pytest.raises(ConfigError, match=r"empty.yaml: sweep.space: is empty"):
        load_sweep(empty)


def test_optuna_asked_for_but_missing_says_how_to_get_it(tmp_path, monkeypatch):
    path = write_sweep(tmp_path, "  space:\n    model.lr: {uniform: [0.001, 0.002]}\n  search: {algorithm: optuna}\n")
    monkeypatch.setattr("rsray.sweep.spec.optuna_installed", lambda: False)  # an install without rsray's dependencies
    with pytest.raises(ConfigError, match=r"sweep.search.algorithm: optuna is not installed \(pip install optuna\)"):
        load_sweep(path)


def test_optuna_refuses_grid_keys(tmp_path):
    path = write_sweep(tmp_path, "  space:\n    model.lr: {grid: [0.001, 0.002]}\n  search: {algorithm: optuna}\n")
    with pytest.raises(ConfigError, match=r"write sweep.space.model.lr as choice, not grid"):
        load_sweep(path)


def test_optuna_draws_every_kind_within_its_range_and_learns_from_results(tmp_path):
    """Tune's OptunaSearch, as `rsray sweep` builds it, takes our space of every non-grid kind and
    suggests values inside it; the same seed gives the same suggestions."""
    path = write_sweep(
        tmp_path,
        """  space:
    model.max_violation: {choice: [true, false]}
    model.margin: {uniform: [0.1, 0.4]}
    model.lr: {loguniform: [1e-5, 1e-3]}
    model.decay_every: {randint: [5, 10]}
  search: {num_samples: 6, seed: 3}
""",
    )
    sweep = load_sweep(path)
    assert optuna_installed() and resolved_algorithm(sweep) == "optuna"  # auto, with no grid key

    def suggestions() -> list[dict]:
        searcher = make_search_algorithm(sweep, concurrency=1)
        assert searcher.set_search_properties(sweep.metric, "max", {p.key: p.domain() for p in sweep.params})
        drawn = []
        for n in range(6):
            config = searcher.suggest(f"trial_{n}")
            drawn.append(config)
            searcher.on_trial_complete(f"trial_{n}", {sweep.metric: float(config["model.margin"])})
        return drawn

    drawn = suggestions()
    for config in drawn:
        assert config["model.max_violation"] in (True, False)
        assert 0.1 <= config["model.margin"] <= 0.4 and 1e-5 <= config["model.lr"] <= 1e-3
        assert config["model.decay_every"] in range(5, 11)  # both ends included
    assert len({c["model.margin"] for c in drawn}) == 6
    assert suggestions() == drawn


def test_smr_sweep_checks_values_and_needs_a_checkpoint(tmp_path):
    space = "  kind: smr\n  space:\n    smr.k: {grid: [10, 0]}\n"
    path = tmp_path / "smr.yaml"
    path.write_text("sweep:\n" + space)
    with pytest.raises(ConfigError, match=r"smr.yaml: sweep.checkpoint: an smr sweep needs the checkpoint"):
        load_sweep(path)
    with pytest.raises(ConfigError, match=r"smr.yaml: sweep.space.smr.k: 0: must be a positive integer"):
        load_sweep(path, ["sweep.checkpoint=c"])
    with pytest.raises(ConfigError, match=r"sweep.scheduler.name: an smr sweep scores each trial once"):
        load_sweep(path, ["sweep.checkpoint=c", "sweep.space.smr.k={grid: [10]}", "sweep.scheduler.name=asha"])
    sweep = load_sweep(path, ["sweep.checkpoint=c", "sweep.space.smr.k={grid: [10]}"])
    assert sweep.metric == "val/mR" and resolved_scheduler(sweep) == "fifo"


def _sweep(tmp_path, space: str, overrides=()):
    return load_sweep(write_sweep(tmp_path, f"  space:\n{space}"), list(overrides))


def test_concurrency_follows_cpus_workers_and_gpus(tmp_path):
    one_worker = _sweep(tmp_path, "    model.lr: {grid: [0.001]}\n", ["train.num_workers=1"])
    # each trial: its driver (0.25 CPU) + 1 worker x 0.5 CPU; 1 CPU stays free for Ray Data
    assert max_concurrent_trials(one_worker, {"CPU": 4}) == 4
    assert max_concurrent_trials(one_worker, {"CPU": 1}) == 1  # never below one
    swept_workers = _sweep(tmp_path, "    train.num_workers: {grid: [1, 2]}\n")
    assert max_concurrent_trials(swept_workers, {"CPU": 4}) == 2  # sized for the 2-worker trials
    gpus = _sweep(
        tmp_path,
        "    model.lr: {grid: [0.001]}\n",
        ["train.use_gpu=true", "train.num_workers=4", "train.cpus_per_worker=2"],
    )
    assert max_concurrent_trials(gpus, {"CPU": 128, "GPU": 8}) == 2  # GPUs limit, not CPUs
    fixed = _sweep(tmp_path, "    model.lr: {grid: [0.001]}\n", ["sweep.max_concurrent_trials=3"])
    assert max_concurrent_trials(fixed, {"CPU": 64}) == 3


def test_trial_config_sets_dotted_keys_and_accepts_numpy_values(tmp_path):
    sweep = _sweep(tmp_path, "    model.decay_every: {randint: [2, 4]}\n")
    cfg = trial_config(
        sweep.base, {"model.decay_every": np.int64(3), "model.margin": np.float64(0.3), "train.epochs": 7}
    )
    assert cfg.model["decay_every"] == 3 and type(cfg.model["decay_every"]) is int
    assert cfg.model["margin"] == 0.3 and cfg.train.epochs == 7
    assert sweep.base.train.epochs == 4  # the base is not changed


def test_a_folder_holding_a_different_sweep_is_refused(tmp_path):
    from rsray import storage

    first = _sweep(tmp_path, "    model.margin: {grid: [0.1, 0.2]}\n", [f"sweep.storage_path={tmp_path / 'sw'}"])
    folder = storage.resolve(first.folder)
    sweep_id, resumed = claim_folder(first, folder)
    assert not resumed and (Path(first.folder) / "rsray_sweep.json").is_file()
    assert claim_folder(first, folder) == (sweep_id, True)  # the same sweep again: resumed, same id
    changed = _sweep(tmp_path, "    model.margin: {grid: [0.1, 0.3]}\n", [f"sweep.storage_path={tmp_path / 'sw'}"])
    with pytest.raises(ConfigError, match=r"sweep.name: .* holds a different sweep \(changed: space\)"):
        claim_folder(changed, folder)


def _trials():
    return [
        TrialSummary("a_00000", {"model.lr": 1e-3, "model.text_pool": "mean"}, "finished", 4, 60.0, 3, 58.0),
        TrialSummary("a_00001", {"model.lr": 1e-5, "model.text_pool": "last"}, "early_stopped", 2, 40.0, 2, 40.0),
        TrialSummary(
            "a_00002",
            {"model.lr": 1e-4, "model.text_pool": "last"},
            "error",
            0,
            float("nan"),
            0,
            float("nan"),
            error="boom",
        ),
    ]


def test_best_trial_and_summary_table():
    trials = _trials()
    assert best_trial(trials).trial_id == "a_00000"
    assert best_trial([trials[2]]) is None
    lines = summary_csv(trials, ["model.lr", "model.text_pool"], "val/mR").strip().splitlines()
    assert lines[0].startswith("trial_id,model.lr,model.text_pool,status,epochs_done,best val/mR")
    assert lines[2].startswith("a_00001,1e-05,last,early_stopped,2,40.0000,2") and lines[3].endswith("boom")


def test_figure_has_one_panel_per_swept_key():
    trials = _trials()
    params = [Param("model.lr", "loguniform", [1e-5, 1e-3]), Param("model.text_pool", "choice", ["mean", "last"])]
    fig = metric_vs_params(trials, params, "val/mR", best_trial(trials))
    lr, pool = fig.axes
    assert lr.get_xscale() == "log" and lr.get_xlabel() == "model.lr"
    assert [t.get_text() for t in pool.get_xticklabels()] == ["mean", "last"]
    assert {t.get_text() for t in lr.get_legend().get_texts()} == {"finished", "stopped early (ASHA)", "best"}
    assert not math.isnan(lr.get_ylim()[0])


def test_runs_are_found_again_by_their_tags_instead_of_opened_twice(tmp_path):
    """What a resumed sweep relies on (rsray.tracking.Tracker.start_or_resume), on a local store."""
    from mlflow import MlflowClient

    from rsray.config import TrackingConfig
    from rsray.tracking import Tracker, find_runs

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="resume", retries=0, system_metrics=False)
    parent = Tracker.start_or_resume(cfg, "sweep", {"sweep_id": "s1", "sweep_role": "parent"}, params={"a": 1})
    child = Tracker.start_or_resume(cfg, "trial-0", {"sweep_id": "s1", "trial_id": "t0"}, parent_run_id=parent.run_id)
    assert not parent.resumed and not child.resumed
    child.log_metrics({"val/mR": 1.0}, step=0)
    # the driver died: nothing was ended; the same trial starts again
    again = Tracker.start_or_resume(cfg, "trial-0", {"sweep_id": "s1", "trial_id": "t0"}, parent_run_id=parent.run_id)
    assert again.resumed and again.run_id == child.run_id
    assert again.metric_history("val/mR") == [(0, 1.0)]
    again.end("FINISHED")
    other = Tracker.start_or_resume(cfg, "trial-1", {"sweep_id": "s1", "trial_id": "t1"})
    assert other.run_id != child.run_id
    client = MlflowClient(cfg.uri)
    assert client.get_run(child.run_id).info.status == "FINISHED"
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    client.delete_run(other.run_id)
    assert sorted(r.info.run_id for r in find_runs(cfg, {"sweep_id": "s1"})) == sorted([parent.run_id, child.run_id])
    assert find_runs(cfg, {"sweep_id": "it's 'quoted'"}) == []


def test_child_runs_end_with_their_trials_status(tmp_path):
    """A run left RUNNING, or marked FAILED by a trial interrupted after it had finished training,
    ends as its trial did; an errored trial's run is FAILED."""
    from mlflow import MlflowClient

    from rsray.config import load_config

    base = load_config(TINY, [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=s"])
    client = MlflowClient(base.tracking.uri)
    experiment = client.create_experiment("s")
    runs = {}
    for trial_id, status in [("a", "RUNNING"), ("b", "FAILED"), ("c", "RUNNING")]:
        run = client.create_run(experiment, tags={TAG_SWEEP: "sw", TAG_ROLE: "trial", TAG_TRIAL: trial_id})
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
        runs[trial_id] = run.info.run_id
    trials = [
        TrialSummary("a", {}, "early_stopped", 1, 0.5, 0, 0.5),
        TrialSummary("b", {}, "finished", 2, 0.6, 1, 0.6),
        TrialSummary("c", {}, "error", 0, math.nan, -1, math.nan),
    ]
    reconcile_child_runs(base, "sw", trials)
    ended = {t: client.get_run(run_id) for t, run_id in runs.items()}
    assert {t: r.info.status for t, r in ended.items()} == {"a": "FINISHED", "b": "FINISHED", "c": "FAILED"}
    assert ended["a"].data.tags[TAG_EARLY] == "true" and ended["b"].data.tags[TAG_EARLY] == "false"


def _restored_trial(tmp_path: Path, trial_id: str, results: list[dict]):
    """A Tune trial as a resumed sweep re-adds it: its results recorded in result.json, the last in its metadata."""
    import json as json_module

    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="sweep", trial_dir_name=trial_id)
    trial = Trial("trainable", trial_id=trial_id, storage=storage, stub=True)
    if results:
        folder = tmp_path / "sweep" / trial_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text("".join(json_module.dumps(r) + "\n" for r in results))
        trial.run_metadata.last_result = dict(results[-1])
    return trial


def test_a_resumed_asha_compares_new_results_with_trials_from_before_the_interruption(tmp_path):
    sweep = load_sweep(
        write_sweep(
            tmp_path,
            """  space:
    model.margin: {grid: [0.1, 0.2]}
  scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
""",
        )
    )
    scheduler = make_scheduler(sweep)
    scheduler.set_search_properties(sweep.metric, "max")
    done = [{"epochs_done": n, sweep.metric: 50.0 + n} for n in (1, 2, 3)]
    finished = _restored_trial(tmp_path, "t_00000", done)
    assert recorded_results(finished) == done
    scheduler.on_trial_add(None, finished)

    fresh = _restored_trial(tmp_path, "t_00001", [])
    assert recorded_results(fresh) == []
    scheduler.on_trial_add(None, fresh)
    # 40 after one epoch is below the restored trial's 51 at that rung: stopped. With empty rungs
    # (Tune's own ASHA after a resume) the first trial to reach a rung always continues.
    assert scheduler.on_trial_result(None, fresh, {"epochs_done": 1, sweep.metric: 40.0}) == "STOP"


def test_trial_actors_get_no_aws_keys_in_their_runtime_env(monkeypatch):
    """Ray Tune would copy them into each trial's runtime_env, which Ray logs whole."""
    from ray.tune.execution import class_cache

    from rsray.sweep.driver import keep_credentials_out_of_trial_runtime_envs

    tunes_own = class_cache.ENV_VARS_TO_PROPAGATE | {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # before any sweep
    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", tunes_own)  # restored after
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-secret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "an-id")

    class Trial:
        pass

    before = class_cache._ActorClassCache().get(Trial)._default_options["runtime_env"]["env_vars"]
    assert before["AWS_SECRET_ACCESS_KEY"] == "a-secret"  # what Ray Tune does on its own
    keep_credentials_out_of_trial_runtime_envs()
    after = class_cache._ActorClassCache().get(Trial)._default_options["runtime_env"]["env_vars"]
    assert not any(name.startswith("AWS_") for name in after) and after["PL_DISABLE_FORK"] == "1"
