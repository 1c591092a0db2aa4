"""Hyperparameter sweeps: Ray Tune over full Ray Train runs, recorded in MLflow as one parent run
with one child run per trial.

    sweep = load_sweep("sweep/swan-margin", ["train.epochs=20", "sweep.search.num_samples=8"])
    report = run_sweep(sweep)      # what `rsray sweep` prints

A sweep file is a training config (the same `defaults:` chain and sections `rsray train` reads)
plus a `sweep:` section: the search space over any config key, the search algorithm, the
scheduler and where results go (`SweepSettings`). Command-line `key=value` overrides go to the
training config, or to the sweep section when the key starts with `sweep.`.

    sweep:
      space:
        model.margin: {grid: [0.1, 0.2, 0.3]}       # every value, in this order
        model.lr: {loguniform: [1.0e-5, 1.0e-3]}    # also uniform, choice: [...], randint: [lo, hi]
      search: {algorithm: auto, num_samples: 4, seed: 0}
      scheduler: {name: asha, grace_period: 2, reduction_factor: 2}

How a trial runs
----------------
Tune calls `_train_trial` once per trial inside a small actor, the trial's driver. It builds the
trial's config, opens (or, after an interruption, finds again) the trial's MLflow child run and
calls `rsray.train.run.train` on it with `_EpochsToTune`, Ray's `TuneReportCallback` (the
documented bridge: Train V2 rejects Tune callbacks) plus an `epochs_done` count that ASHA uses as
its clock. Rank 0 of the trial's Train workers logs every epoch into the child run, as in any
training run. When ASHA stops a trial, Tune ends its actor and with it the Train controller and
workers that actor owns. An evaluation-only sweep (`kind: smr`) scores one checkpoint once and
lets every trial re-rank that score matrix with its own SMR K, w and beta.

Resuming
--------
Everything lives under `<storage_path>/<name>`: Tune's experiment state, one Ray Train run per
trial (`trials/<trial id>`) and `rsray_sweep.json` (the sweep's id and spec). Started again, a
sweep restores Tune from there (`Tuner.restore`): finished trials stay finished, interrupted ones
restart and their Train runs resume from their last checkpoint. MLflow runs carry the tags
`sweep_id`, `sweep_role` and `trial_id`, so the parent and every child are found again instead of
opened twice. A trial whose Train run had already finished replays its recorded epochs to Tune
without training. Tune does not save its scheduler; ASHA's rungs are refilled from what Tune
recorded of each trial's results, so early stopping after a resume still compares every trial.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rsray import config as config_module
from rsray import storage
from rsray.config import COMMAND_LINE, Config, ConfigError

log = logging.getLogger("rsray.sweep")

SPEC_FILE = "rsray_sweep.json"  # in the sweep folder: the sweep id and the spec it was started with
TRIALS_FOLDER = "trials"  # in the sweep folder: one Ray Train run per trial, named by trial id
EPOCHS_DONE = "epochs_done"  # ASHA's clock: epochs finished (the reported `epoch` counts from 0)
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
MANAGED_KEYS = ("train.run_name", "train.storage_path", "tracking.")  # set by the sweep for each trial
SMR_KEYS = ("smr.k", "smr.w", "smr.beta")
TAG_SWEEP, TAG_ROLE, TAG_TRIAL, TAG_EARLY = "sweep_id", "sweep_role", "trial_id", "early_stopped"


# ----------------------------------------------------------------------------- the sweep section


@dataclass
class SearchSettings:
    """How trial values are drawn."""

    # auto: Optuna's TPE when optuna is installed and no key is a grid, else grid or random
    algorithm: str = "auto"  # auto | random | grid | optuna
    num_samples: int = 1  # random/optuna: trials drawn (a grid is crossed with every draw); grid: repeats
    seed: int = 0

    def check(self) -> Iterator[tuple[str, str]]:
        if self.algorithm not in ("auto", "random", "grid", "optuna"):
            yield "algorithm", f"must be auto, random, grid or optuna, got {self.algorithm!r}"
        if self.num_samples < 1:
            yield "num_samples", f"must be positive, got {self.num_samples}"


@dataclass
class SchedulerSettings:
    """Which trials stop early. ASHA compares trials on the sweep metric after `grace_period`
    epochs, then every `reduction_factor` times as many, keeping the top 1/reduction_factor."""

    name: str = "auto"  # auto (asha for training sweeps, fifo for evaluation-only ones) | asha | fifo
    grace_period: int = 1  # epochs every trial runs before it may be stopped
    reduction_factor: float = 2.0
    max_t: int = 0  # epochs of the longest trial; 0 = train.epochs

    def check(self) -> Iterator[tuple[str, str]]:
        if self.name not in ("auto", "asha", "fifo"):
            yield "name", f"must be auto, asha or fifo, got {self.name!r}"
        if self.grace_period < 1:
            yield "grace_period", f"must be positive, got {self.grace_period}"
        if self.reduction_factor <= 1:
            yield "reduction_factor", f"must be > 1, got {self.reduction_factor}"
        if self.max_t < 0:
            yield "max_t", f"must be >= 0 (0: train.epochs), got {self.max_t}"


@dataclass
class SweepSettings:
    """The `sweep:` section of a sweep file."""

    kind: str = "train"  # train: every trial is a Ray Train run | smr: re-rank one checkpoint's scores
    name: str = ""  # the sweep's folder under storage_path and its MLflow parent run; default: file name
    space: dict[str, Any] = field(default_factory=dict)  # config key -> {grid|choice|uniform|loguniform|randint: [...]}
    metric: str = ""  # reported metric to maximise; default: the model's selection metric (val/mR)
    search: SearchSettings = field(default_factory=SearchSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    storage_path: str = ""  # folder or s3://; default: <train.storage_path>/sweeps
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs/GPUs hold (see max_concurrent_trials)
    trial_cpus: float = 0.25  # the trial's driver actor (it only waits on its Train run); our choice
    reserve_cpus: float = 1.0  # CPUs left free for Ray Data's read and decode tasks; our choice
    state_save_s: float = 2.0  # Tune saves its experiment state at most this often (Ray's default: >= 10 s)
    # Ray Data hands out training batches in a fixed order in every trial (preserve_order): without
    # it two runs of one config differ by several mR points on small data, hiding the effect swept.
    deterministic_data: bool = True  # our choice
    evaluate_test: bool = True  # score the best trial's best checkpoint on the test split
    best_config: str = ""  # where the best config goes; default: <sweep folder>/best_config.yaml (local)
    checkpoint: str = ""  # kind smr: the checkpoint folder whose scores every trial re-ranks
    split: str = "val"  # kind smr: the split trials are compared on

    def check(self) -> Iterator[tuple[str, str]]:
        if self.kind not in ("train", "smr"):
            yield "kind", f"must be train or smr, got {self.kind!r}"
        if not self.space:
            yield "space", "is empty: give at least one key, e.g. model.margin: {grid: [0.1, 0.2]}"
        if self.name and not re.fullmatch(r"[\w.\-]+", self.name):
            yield "name", f"must be letters, digits, '.', '_' or '-' (it names a folder), got {self.name!r}"
        if self.max_concurrent_trials < 0:
            yield "max_concurrent_trials", f"must be >= 0 (0: fit the cluster), got {self.max_concurrent_trials}"
        if self.trial_cpus < 0 or self.reserve_cpus < 0:
            yield "trial_cpus" if self.trial_cpus < 0 else "reserve_cpus", "must be >= 0"
        if self.state_save_s <= 0:
            yield "state_save_s", f"must be positive, got {self.state_save_s}"
        if self.kind == "smr" and not self.checkpoint:
            yield "checkpoint", "an smr sweep needs the checkpoint folder to re-rank (sweep.checkpoint=...)"
        if self.split not in ("train", "val", "test"):
            yield "split", f"must be train, val or test, got {self.split!r}"


@dataclass
class Param:
    """One swept key: `kind` grid/choice with `values`, or uniform/loguniform/randint with `values`
    = [low, high] (randint: both included)."""

    key: str
    kind: str
    values: list[Any]

    def domain(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        if self.kind == "uniform":
            return tune.uniform(low, high)
        if self.kind == "loguniform":
            return tune.loguniform(low, high)
        return tune.randint(low, high + 1)  # Tune's upper bound is exclusive

    def probes(self) -> list[Any]:
        """Values that must all make a valid config: every listed value, or both bounds."""
        return list(self.values)

    def describe(self) -> str:
        return f"{self.kind}({', '.join(map(repr, self.values))})"


@dataclass
class Sweep:
    """A loaded, checked sweep: its settings, the swept keys and the training config they vary."""

    path: str
    settings: SweepSettings
    params: list[Param]
    base: Config
    origins: dict[str, str]

    @property
    def name(self) -> str:
        return self.settings.name or Path(self.path).stem

    @property
    def metric(self) -> str:
        if self.settings.metric:
            return self.settings.metric
        if self.settings.kind == "smr":
            return f"{self.settings.split}/mR"
        from rsray.models import model_config
        from rsray.train.loop import selection_metric

        return selection_metric(model_config(self.base))

    @property
    def max_epochs(self) -> int:
        return self.settings.scheduler.max_t or max(_candidates(self, "train.epochs", self.base.train.epochs))

    @property
    def folder(self) -> str:
        """The sweep's folder (local absolute path or s3:// URI)."""
        root = self.settings.storage_path or _join(self.base.train.storage_path, "sweeps")
        root = root if storage.is_s3(root) else str(Path(root).expanduser().resolve())
        return _join(root, self.name)

    def error(self, key: str, problem: str) -> ConfigError:
        """A one-line error naming `key` and the file (or command line) that set it, or its section."""
        parts = key.split(".")
        source = next(
            (self.origins[k] for k in (".".join(parts[:n]) for n in range(len(parts), 0, -1)) if k in self.origins),
            "defaults",
        )
        return ConfigError(f"{source}: {key}: {problem}")

    def spec(self) -> dict[str, Any]:
        """What must match for a sweep folder to be resumed: settings that shape the trials, and
        the training config they start from."""
        s = self.settings
        return json.loads(
            json.dumps(
                {
                    "kind": s.kind,
                    "space": {p.key: {p.kind: p.values} for p in self.params},
                    "metric": self.metric,
                    "search": asdict(s.search),
                    "scheduler": asdict(s.scheduler),
                    "checkpoint": s.checkpoint,
                    "split": s.split,
                    "config": self.base.to_dict(),
                },
                default=str,
            )
        )


def _join(root: str, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts])


# ----------------------------------------------------------------------------- loading


class _SweepYamlLoader(yaml.SafeLoader):
    """YAML 1.2 numbers: `1e-7` is a float (PyYAML follows YAML 1.1 and reads it as text). Our
    choice for sweep files and their overrides, where log-scale bounds are written this way."""


_SweepYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Read a sweep file and `key=value` overrides; check the settings and every swept value
    against the training config. Errors are one line naming the file (or command line) and key."""
    path = config_module.find_config_file(path, "sweep file")
    tree = config_module.read_yaml_mapping(path, _SweepYamlLoader)
    defaults = config_module.pop_defaults(tree, path)
    section = tree.pop("sweep", None)
    if not isinstance(section, dict):
        raise ConfigError(
            f"{path}: sweep: missing or not a mapping (a sweep file is a training config plus a `sweep:` section)"
        )

    if isinstance(section.get("space"), dict):
        section["space"] = _flatten_space(section["space"])
    config_tree: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for parent in defaults:  # the training config, merged exactly as load_config merges a file
        config_module.merge_config_file(parent, config_tree, origins, seen=(path,))
    config_module.merge_into(config_tree, tree, origins, str(path))
    sweep_tree = {"sweep": section}
    config_module.merge_into({}, sweep_tree, origins, str(path))  # records where sweep keys come from
    for item in overrides:
        key, value = config_module.parse_override(item, _SweepYamlLoader)
        space = sweep_tree["sweep"].setdefault("space", {}) if key.startswith("sweep.space.") else None
        if isinstance(space, dict):
            swept, _, kind = key[len("sweep.space.") :].rpartition(".")
            swept, value = (swept, {kind: value}) if kind in KINDS else (f"{swept}.{kind}".strip("."), value)
            space[swept] = value  # a whole key's spec replaces the file's
            origins[f"sweep.space.{swept}"] = COMMAND_LINE
            continue
        target = sweep_tree if key.split(".")[0] == "sweep" else config_tree
        config_module.merge_into(target, config_module.nest(key, value), origins, COMMAND_LINE)

    base = config_module.build_section(Config, config_tree, prefix="", origins=origins)
    base.origins = origins
    settings = config_module.build_section(SweepSettings, sweep_tree["sweep"], prefix="sweep.", origins=origins)
    sweep = Sweep(str(path), settings, [], base, origins)
    sweep.params = _parse_space(sweep, settings.space)
    _check_params(sweep)
    _check_search(sweep)
    return sweep


def _flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Space keys written nested (`model: {margin: {grid: ...}}`) as dotted keys (`model.margin`)."""
    flat: dict[str, Any] = {}
    for name, node in space.items():
        key = f"{prefix}{name}"
        if (
            isinstance(node, dict)
            and node
            and not any(k in KINDS for k in node)
            and all(isinstance(v, dict) for v in node.values())
        ):
            flat.update(_flatten_space(node, f"{key}."))
        else:
            flat[key] = node
    return flat


def _parse_space(sweep: Sweep, space: dict[str, Any]) -> list[Param]:
    """`{dotted key: {kind: [...]}}` -> checked Params."""
    params = []
    for key, node in space.items():
        where = f"sweep.space.{key}"
        if not isinstance(node, dict) or not node:
            raise sweep.error(where, f"expected {{{'|'.join(KINDS)}: [...]}}, got {config_module.value_kind(node)}")
        kinds = [k for k in node if k in KINDS]
        if not kinds:
            raise sweep.error(where, f"unknown kind {', '.join(map(str, node))}: use one of {', '.join(KINDS)}")
        if len(node) != 1:
            raise sweep.error(where, f"give exactly one of {', '.join(KINDS)}, got {', '.join(map(str, node))}")
        kind, values = kinds[0], node[kinds[0]]
        if not isinstance(values, list) or not values:
            raise sweep.error(where, f"{kind}: expected a non-empty list, got {config_module.value_kind(values)}")
        if kind in ("uniform", "loguniform", "randint"):
            values = _bounds(sweep, where, kind, values)
        params.append(Param(key, kind, values))
    return params


def _bounds(sweep: Sweep, where: str, kind: str, values: list[Any]) -> list[Any]:
    if len(values) != 2:
        raise sweep.error(where, f"{kind}: expected [low, high], got {len(values)} values")
    number = int if kind == "randint" else (int, float)
    if any(isinstance(v, bool) or not isinstance(v, number) for v in values):
        wanted = "integers" if kind == "randint" else "numbers"
        raise sweep.error(where, f"{kind}: bounds must be {wanted}, got {values}")
    low, high = values
    if not low < high:
        raise sweep.error(where, f"{kind}: low must be below high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise sweep.error(where, f"loguniform: low must be positive, got {low}")
    return [low, high] if kind == "randint" else [float(low), float(high)]


def _check_params(sweep: Sweep) -> None:
    """Every value a trial may get must make a valid config (or SMR setting)."""
    from rsray.eval.rerank import SMRConfig

    if sweep.settings.kind == "smr":
        for param in sweep.params:
            if param.key not in SMR_KEYS:
                raise sweep.error(f"sweep.space.{param.key}", f"an smr sweep varies only {', '.join(SMR_KEYS)}")
            for value in param.probes():
                smr = SMRConfig(**{param.key.split(".")[1]: value})
                for _, problem in smr.check():
                    raise sweep.error(f"sweep.space.{param.key}", f"{value!r}: {problem}")
        return
    base = sweep.base.to_dict()
    for param in sweep.params:
        where = f"sweep.space.{param.key}"
        if param.key.startswith(MANAGED_KEYS):
            raise sweep.error(where, "is set by the sweep for every trial and cannot be swept")
        section, _, rest = param.key.partition(".")
        if section not in base or not rest:
            raise sweep.error(where, f"not a config key (sections: {', '.join(sorted(base))})")
        for value in param.probes():
            try:
                trial_config(base, {param.key: value})
            except ConfigError as exc:
                problem = str(exc).split(": ", 1)[-1]  # drop the "sweep space" source
                if problem.startswith(f"{param.key}: "):
                    problem = problem[len(param.key) + 2 :]
                raise sweep.error(where, problem if "unknown key" in problem else f"{value!r}: {problem}") from None


def trial_config(base: dict[str, Any] | Config, params: dict[str, Any]) -> Config:
    """The base config with a trial's values set (dotted keys), typed and checked."""
    from rsray.config import config_from_dict
    from rsray.models import model_config

    tree = copy.deepcopy(base.to_dict() if isinstance(base, Config) else base)
    for key, value in params.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                if part in node:
                    raise ConfigError(f"sweep space: {key}: {part} is not a section")
                node[part] = {}
            node = node[part]
        node[leaf] = value.item() if hasattr(value, "item") else value  # numpy scalars from Tune
    cfg = config_from_dict(tree, source="sweep space")
    if cfg.model:
        model_config(cfg)  # the model section is typed only on demand: check it now
    return cfg


def _candidates(sweep: Sweep, key: str, default: Any) -> list[Any]:
    """Every value `key` may take in this sweep (the base value when it is not swept)."""
    for param in sweep.params:
        if param.key == key:
            return (
                list(param.values)
                if param.kind in ("grid", "choice")
                else list(range(param.values[0], param.values[1] + 1))
                if param.kind == "randint"
                else list(param.values)
            )
    return [default]


def _check_search(sweep: Sweep) -> None:
    algorithm = resolved_algorithm(sweep)
    s = sweep.settings
    if algorithm == "grid":
        for param in sweep.params:
            if param.kind != "grid":
                raise sweep.error(
                    "sweep.search.algorithm",
                    f"grid needs every key as a grid, but sweep.space.{param.key} is {param.kind}",
                )
    if algorithm == "optuna":
        if not optuna_installed():
            raise sweep.error("sweep.search.algorithm", "optuna is not installed (pip install optuna), or use random")
        for param in sweep.params:
            if param.kind == "grid":
                raise sweep.error(
                    "sweep.search.algorithm",
                    f"Optuna draws values itself: write sweep.space.{param.key} as choice, not grid",
                )
    if sweep.settings.kind == "train":
        scheduler = resolved_scheduler(sweep)
        if scheduler == "asha" and s.scheduler.grace_period > sweep.max_epochs:
            raise sweep.error(
                "sweep.scheduler.grace_period",
                f"{s.scheduler.grace_period} epochs exceed the longest trial ({sweep.max_epochs} epochs)",
            )
    elif s.scheduler.name == "asha":
        raise sweep.error(
            "sweep.scheduler.name", "an smr sweep scores each trial once: nothing to stop early (use fifo)"
        )


def optuna_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("optuna") is not None


def resolved_algorithm(sweep: Sweep) -> str:
    algorithm = sweep.settings.search.algorithm
    if algorithm != "auto":
        return algorithm
    if all(p.kind == "grid" for p in sweep.params):
        return "grid"
    if optuna_installed() and not any(p.kind == "grid" for p in sweep.params):
        return "optuna"
    return "random"


def resolved_scheduler(sweep: Sweep) -> str:
    name = sweep.settings.scheduler.name
    if name != "auto":
        return name
    return "asha" if sweep.settings.kind == "train" else "fifo"


# ----------------------------------------------------------------------------- Tune pieces


def max_concurrent_trials(sweep: Sweep, cluster: dict[str, float]) -> int:
    """Trials that fit at once: each needs its driver actor (`trial_cpus`) plus num_workers Train
    workers of `cpus_per_worker` (and one GPU each with use_gpu), counted for the largest worker
    count the space allows; `reserve_cpus` stay free for Ray Data. At least 1. An evaluation-only
    trial takes one CPU."""
    s = sweep.settings
    if s.max_concurrent_trials:
        return s.max_concurrent_trials
    cpus = float(cluster.get("CPU", 0)) - s.reserve_cpus
    if s.kind == "smr":
        return max(1, int(cpus))
    workers = max(_candidates(sweep, "train.num_workers", sweep.base.train.num_workers))
    per_worker = max(_candidates(sweep, "train.cpus_per_worker", sweep.base.train.cpus_per_worker))
    fits = int(cpus / (s.trial_cpus + workers * per_worker) + 1e-9)  # 3 / 0.75 is 4, not 3.99...
    if any(_candidates(sweep, "train.use_gpu", sweep.base.train.use_gpu)):
        fits = min(fits, int(float(cluster.get("GPU", 0)) // workers))
    return max(1, fits)


def _search_algorithm(sweep: Sweep, concurrency: int):
    """Tune's variant generator (grid and random), or Optuna's TPE; both hold at most
    `concurrency` trials in flight (Tune ignores TuneConfig's limit for a variant generator)."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if resolved_algorithm(sweep) == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=sweep.settings.search.seed), max_concurrent=concurrency)
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=sweep.settings.search.seed)


def _scheduler(sweep: Sweep):
    from ray.tune.schedulers import FIFOScheduler

    if resolved_scheduler(sweep) == "fifo":
        return FIFOScheduler()
    s = sweep.settings.scheduler
    return _asha_keeping_rungs(
        time_attr=EPOCHS_DONE, max_t=sweep.max_epochs, grace_period=s.grace_period, reduction_factor=s.reduction_factor
    )


def _asha_keeping_rungs(**asha_options):
    """ASHA that refills its rungs when a sweep resumes. Tune saves no scheduler state: it re-adds
    every restored trial to a fresh scheduler, so the trials left would be compared only with those
    that report after the resume. Here each re-added trial replays, in order, the results Tune had
    recorded for it before the interruption (`recorded_results`)."""
    from ray.tune.schedulers import ASHAScheduler

    class ASHAKeepingRungs(ASHAScheduler):
        def on_trial_add(self, tune_controller, trial):
            super().on_trial_add(tune_controller, trial)
            bracket = self._trial_info[trial.trial_id]
            replayed = [r for r in recorded_results(trial) if self._time_attr in r and self._metric in r]
            for result in replayed:
                bracket.on_result(trial, result[self._time_attr], self._metric_op * result[self._metric])
            if replayed:
                log.info("ASHA: %d earlier result(s) of trial %s back in its rungs", len(replayed), trial.trial_id)

    return ASHAKeepingRungs(**asha_options)


def recorded_results(trial) -> list[dict[str, Any]]:
    """Every result Tune recorded for a restored trial (the JSON lines of result.json in the
    trial's folder, local or s3://); [] for a trial that has not reported yet."""
    from ray.tune.result import EXPR_RESULT_FILE

    if EPOCHS_DONE not in trial.run_metadata.last_result or not trial.storage.trial_dir_name:
        return []  # not `trial.last_result`: Tune fills that with defaults before a trial reports
    try:
        with trial.storage.storage_filesystem.open_input_stream(
            f"{trial.storage.trial_fs_path}/{EXPR_RESULT_FILE}"
        ) as stream:
            text = stream.read().decode()
    except (FileNotFoundError, OSError):
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _epochs_to_tune(epochs: int):
    """A Ray Train callback passing each epoch's rank-0 metrics (and checkpoint path) on to Tune,
    plus `epochs_done`: Ray's TuneReportCallback with ASHA's clock added. The last epoch is left to
    the trial function, which reports it once the run has finished: Tune ends a trial as soon as
    it reaches the scheduler's max_t, and ending it inside `fit` would lose the run's closing work
    (artifacts, the child run's final status)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochsToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            rank0 = next((m for m in metrics if "epoch" in m and any(k.startswith("val/") for k in m)), metrics[0])
            if int(rank0["epoch"]) + 1 < epochs:
                super().after_report(run_context, [{**rank0, EPOCHS_DONE: int(rank0["epoch"]) + 1}], checkpoint)

    return EpochsToTune()


@dataclass
class TrialContext:
    """What every trial's driver needs from the sweep (sent once through the object store)."""

    sweep_id: str
    sweep_name: str
    kind: str
    base: dict[str, Any]
    trials_uri: str
    parent_run_id: str | None
    metric: str
    tags: dict[str, str]  # model and dataset, for every child run
    checkpoint: str = ""
    deterministic_data: bool = True


def _child_tracker(context: TrialContext, cfg: Config, trial_id: str, params: dict[str, Any]):
    from rsray.tracking import NullTracker, Tracker

    if not cfg.tracking.enabled:
        return NullTracker()
    number = trial_id.rsplit("_", 1)[-1]
    return Tracker.start_or_resume(
        cfg.tracking,
        f"{context.sweep_name}-{number}",
        key_tags={TAG_SWEEP: context.sweep_id, TAG_ROLE: "trial", TAG_TRIAL: trial_id},
        params=cfg.to_dict() if context.kind == "train" else params,
        tags=context.tags,
        parent_run_id=context.parent_run_id,
    )


def _train_trial(params: dict[str, Any], context: TrialContext) -> None:
    """One trial of a training sweep (runs in its Tune actor): a full Ray Train run."""
    import ray.tune
    from ray.data import DataContext

    from rsray.train.run import train

    trial_id = ray.tune.get_context().get_trial_id()
    # This actor builds the trial's Ray Dataset, so its DataContext applies. No progress bars: with
    # trials reading at once they interleave into thousands of lines, and Tune's table is the progress.
    DataContext.get_current().enable_progress_bars = False
    if context.deterministic_data:
        from rsray.runtime import configure_data_context

        configure_data_context()
    cfg = trial_config(context.base, params)
    cfg.train.run_name = trial_id
    cfg.train.storage_path = context.trials_uri
    finished = finished_train_run(_join(context.trials_uri, trial_id), cfg.train.epochs)
    if finished is not None:  # trained before the sweep was interrupted: report, do not retrain
        for metrics in finished:
            ray.tune.report(metrics)
        return
    tracker = _child_tracker(context, cfg, trial_id, params)
    tracker.log_dict(cfg.to_dict(), "config.yaml")  # early-stopped trials never reach train()'s artifacts
    result = train(cfg, tracker=tracker, callbacks=[_epochs_to_tune(cfg.train.epochs)])
    last = (result.return_value or [result.metrics])[-1]
    ray.tune.report(
        {
            **last,
            EPOCHS_DONE: int(last["epoch"]) + 1,
            "checkpoint_path": result.checkpoint.path if result.checkpoint else None,
        }
    )


def finished_train_run(uri: str, epochs: int) -> list[dict[str, Any]] | None:
    """The per-epoch metrics (as Tune received them) of a Ray Train run folder whose last
    checkpoint is its final epoch; None when the run is missing or unfinished."""
    import ray.train

    from rsray.train.run import load_checkpoint_state

    location = storage.resolve(uri)
    try:
        result = ray.train.Result.from_path(location.path, storage_filesystem=location.fs)
    except (RuntimeError, FileNotFoundError, OSError):
        return None
    if not result.metrics or int(result.metrics.get("epoch", -1)) != epochs - 1 or result.checkpoint is None:
        return None
    history = load_checkpoint_state(result.checkpoint).get("history") or []
    paths = {int(m["epoch"]): ckpt.path for ckpt, m in result.best_checkpoints or []}
    replay = []
    for metrics in history:
        epoch = int(metrics["epoch"])
        row = {**metrics, EPOCHS_DONE: epoch + 1}
        if epoch in paths:
            row["checkpoint_path"] = paths[epoch]
        replay.append(row)
    return replay


def _smr_trial(params: dict[str, Any], context: TrialContext, scored) -> None:
    """One trial of an evaluation-only sweep: the shared score matrix re-ranked with this trial's
    SMR settings and measured; nothing is trained."""
    import ray.tune

    from rsray.config import config_from_dict
    from rsray.eval.metrics import retrieval_metrics
    from rsray.eval.rerank import SMRConfig, smr_rerank

    trial_id = ray.tune.get_context().get_trial_id()
    smr = SMRConfig(**{key.split(".")[1]: value for key, value in params.items()})
    metrics = retrieval_metrics(
        smr_rerank(scored.scores, k=smr.k, w=smr.w, beta=smr.beta), scored.caption_image, scored.scenes
    )
    split = context.metric.split("/")[0]
    reported = {f"{split}/{k}": float(v) for k, v in metrics.items()}
    cfg = config_from_dict(context.base)
    tracker = _child_tracker(context, cfg, trial_id, {**params, "checkpoint": context.checkpoint})
    if not (tracker.resumed and tracker.metric_history(context.metric)):  # logged before an interruption
        tracker.log_metrics(reported, step=0)
    tracker.end("FINISHED")
    ray.tune.report({**reported, EPOCHS_DONE: 1})


# ----------------------------------------------------------------------------- the driver


@dataclass
class TrialSummary:
    """One row of the sweep's summary table."""

    trial_id: str
    params: dict[str, Any]
    status: str  # finished | early_stopped | error
    epochs_done: int
    best: float  # the sweep metric at the trial's best epoch (nan if it never reported)
    best_epoch: int
    last: float
    error: str = ""
    run_id: str = ""

    @property
    def early_stopped(self) -> bool:
        return self.status == "early_stopped"


@dataclass
class SweepReport:
    """What a sweep produced: every trial, the best one and where its outputs went."""

    name: str
    folder: str
    metric: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    best_config: str = ""
    best_checkpoint: str = ""
    test: dict[str, Any] = field(default_factory=dict)
    parent_run_id: str | None = None
    mlflow_link: str = ""
    resumed: bool = False


def run_sweep(sweep: Sweep) -> SweepReport:
    """Start (or resume) the sweep, wait for every trial, then record and return the outcome."""
    import ray
    from ray import tune

    from rsray.runtime import ensure_ray
    from rsray.tracking import NullTracker, Tracker

    ensure_ray()
    folder = storage.resolve(sweep.folder)
    sweep_id, resumed = _claim_folder(sweep, folder)
    base = _prepared_base(sweep)
    s = sweep.settings
    concurrency = max_concurrent_trials(sweep, ray.cluster_resources())
    scored, trained = _smr_scores(sweep) if s.kind == "smr" else (None, base)  # `trained`: whose model this is
    run_tags = {"model": trained.model.get("name", ""), "dataset": trained.data.name, "sweep": sweep.name}

    parent = NullTracker()
    if base.tracking.enabled:
        parent = Tracker.start_or_resume(
            base.tracking,
            sweep.name,
            key_tags={TAG_SWEEP: sweep_id, TAG_ROLE: "parent"},
            params=_parent_params(sweep),
            tags={**run_tags, "sweep_folder": sweep.folder},
        )
        parent.set_tags({"max_concurrent_trials": concurrency})
        parent.log_dict(sweep.spec(), "sweep.json")
        parent.log_text(Path(sweep.path).read_text(), f"sweep_file/{Path(sweep.path).name}")
    context = TrialContext(
        sweep_id,
        sweep.name,
        s.kind,
        base.to_dict(),
        _join(sweep.folder, TRIALS_FOLDER),
        parent.run_id,
        sweep.metric,
        run_tags,
        s.checkpoint,
        s.deterministic_data,
    )
    trainable = _trainable(sweep, context, scored)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(s.state_save_s))
    fs = folder.fs if storage.is_s3(sweep.folder) else None
    try:
        if tune.Tuner.can_restore(folder.path, storage_filesystem=fs):
            log.info("resuming sweep %s from %s", sweep.name, sweep.folder)
            tuner = tune.Tuner.restore(
                folder.path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
            )
            resumed = True
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={p.key: p.domain() for p in sweep.params},
                tune_config=tune.TuneConfig(
                    metric=sweep.metric,
                    mode="max",
                    search_alg=_search_algorithm(sweep, concurrency),
                    scheduler=_scheduler(sweep),
                    num_samples=s.search.num_samples,
                    reuse_actors=False,
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=sweep.name, storage_path=folder.path.rsplit("/", 1)[0], storage_filesystem=fs, verbose=1
                ),
            )
        grid = tuner.fit()
    except KeyboardInterrupt:
        parent.end("KILLED")
        raise
    except BaseException:
        parent.end("FAILED")
        raise
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    if unfinished:  # Tune stops on Ctrl-C after saving its state, and returns
        parent.end("KILLED")
        raise SweepInterrupted(
            f"sweep {sweep.name} was interrupted with {unfinished} trial(s) unfinished; "
            f"run the same command again to resume it from {sweep.folder}"
        )
    trials = summarize(grid, sweep)
    _reconcile_child_runs(base, sweep_id, trials)
    report = SweepReport(
        sweep.name,
        sweep.folder,
        sweep.metric,
        trials,
        best_trial(trials),
        parent_run_id=parent.run_id,
        mlflow_link=parent.ui_link(),
        resumed=resumed,
    )
    _finish(sweep, base, report, parent)
    parent.end("FINISHED" if report.best is not None else "FAILED")
    return report


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial ended (Ctrl-C); its folder holds what it needs to resume."""


def _claim_folder(sweep: Sweep, folder) -> tuple[str, bool]:
    """The sweep id stored in the folder (a sweep resumed), or a new one written there first, so an
    interruption at any later point finds the same MLflow runs. A folder holding a different sweep
    is refused rather than mixed."""
    spec_file = folder.join(SPEC_FILE)
    if storage.exists(spec_file):
        stored = json.loads(storage.read_bytes(spec_file))
        if stored["spec"] != sweep.spec():
            changed = sorted(
                k for k in set(stored["spec"]) | set(sweep.spec()) if stored["spec"].get(k) != sweep.spec().get(k)
            )
            raise sweep.error(
                "sweep.name",
                f"{sweep.folder} holds a different sweep (changed: {', '.join(changed)}); "
                f"choose another sweep.name or remove that folder",
            )
        return stored["sweep_id"], True
    sweep_id = uuid.uuid4().hex
    storage.write_bytes(spec_file, json.dumps({"sweep_id": sweep_id, "spec": sweep.spec()}, indent=1).encode())
    return sweep_id, False


def _prepared_base(sweep: Sweep) -> Config:
    """The training config as trials receive it: paths absolute (a trial's driver runs in its own
    trial folder) and earlier stages (PriorCLIP's scene prior) trained once for all trials."""
    from rsray.train.run import _absolute_paths, _train_earlier_stages

    base = _absolute_paths(copy.deepcopy(sweep.base))
    if sweep.settings.kind == "train":
        if not base.train.run_name:
            base.train.run_name = sweep.name  # names the earlier stages' runs, if any
        base = _train_earlier_stages(base)
        base.train.run_name = ""
    return base


def _trainable(sweep: Sweep, context: TrialContext, scored=None):
    from ray import tune

    if sweep.settings.kind == "smr":
        return tune.with_resources(tune.with_parameters(_smr_trial, context=context, scored=scored), {"CPU": 1})
    return tune.with_resources(tune.with_parameters(_train_trial, context=context), {"CPU": sweep.settings.trial_cpus})


def _smr_scores(sweep: Sweep):
    """The checkpoint's score matrix on the sweep's split, computed once for every trial, and the
    config the checkpoint was trained with."""
    from rsray.data.loader import read_split
    from rsray.eval.checkpoint import load_checkpoint
    from rsray.models import model_config
    from rsray.train.loop import score_split

    model, cfg, _ = load_checkpoint(sweep.settings.checkpoint)
    table = read_split(cfg.train.data, sweep.settings.split, cfg.prepare.s3_endpoint)
    scored = score_split(model, table, model_config(cfg).augment)
    scored.image_features = scored.text_features = None  # trials need only the scores
    return scored, cfg


def _parent_params(sweep: Sweep) -> dict[str, Any]:
    s = sweep.settings
    asha = (
        {
            "grace_period": s.scheduler.grace_period,
            "reduction_factor": s.scheduler.reduction_factor,
            "max_t": sweep.max_epochs,
        }
        if resolved_scheduler(sweep) == "asha"
        else {}
    )
    smr = {"checkpoint": s.checkpoint, "split": s.split} if s.kind == "smr" else {}
    return {
        "sweep": {
            "kind": s.kind,
            "metric": sweep.metric,
            "algorithm": resolved_algorithm(sweep),
            "num_samples": s.search.num_samples,
            "seed": s.search.seed,
            "scheduler": resolved_scheduler(sweep),
            **asha,
            **smr,
            "space": {p.key: p.describe() for p in sweep.params},
        }
    }


def summarize(grid, sweep: Sweep) -> list[TrialSummary]:
    """One row per trial from Tune's results, in trial order."""
    keys = [p.key for p in sweep.params]
    rows = []
    for result in grid:
        trial_id = Path(str(result.path)).name
        frame = result.metrics_dataframe
        values: list[float] = []
        epochs: list[int] = []
        if frame is not None and sweep.metric in frame:
            values = [float(v) for v in frame[sweep.metric]]
            epochs = [int(e) for e in frame[EPOCHS_DONE]] if EPOCHS_DONE in frame else list(range(1, len(values) + 1))
        finite = [(v, e) for v, e in zip(values, epochs, strict=True) if math.isfinite(v)]
        best, best_epoch = max(finite, default=(float("nan"), 0))
        done = max(epochs, default=0)
        if result.error is not None:
            status = "error"
        elif sweep.settings.kind == "train" and done < _trial_epochs(sweep, result.config):
            status = "early_stopped"
        else:
            status = "finished"
        rows.append(
            TrialSummary(
                trial_id,
                {k: (result.config or {}).get(k) for k in keys},
                status,
                done,
                best,
                best_epoch,
                values[-1] if values else float("nan"),
                error=_one_line(result.error) if result.error is not None else "",
            )
        )
    return sorted(rows, key=lambda r: r.trial_id)


def _trial_epochs(sweep: Sweep, params: dict[str, Any] | None) -> int:
    return int((params or {}).get("train.epochs", sweep.base.train.epochs))


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def best_trial(trials: Sequence[TrialSummary]) -> TrialSummary | None:
    """The trial with the highest metric at any epoch (ties: the earlier trial)."""
    scored = [t for t in trials if math.isfinite(t.best)]
    return max(scored, key=lambda t: t.best, default=None)


def _reconcile_child_runs(base: Config, sweep_id: str, trials: list[TrialSummary]) -> None:
    """Mark every child run with how its trial ended (ASHA stops a trial by ending its actor, so
    nobody inside the trial can), give each run its trial's final status, and retire runs of trials
    Tune no longer knows (opened just before an interruption, after Tune's last saved state)."""
    if not base.tracking.enabled:
        return
    from mlflow import MlflowClient

    from rsray.tracking import find_runs, with_retries

    client = MlflowClient(base.tracking.uri)
    runs = {r.data.tags.get(TAG_TRIAL): r for r in find_runs(base.tracking, {TAG_SWEEP: sweep_id, TAG_ROLE: "trial"})}
    known = {t.trial_id for t in trials}
    for trial in trials:
        run = runs.get(trial.trial_id)
        if run is None:
            continue
        trial.run_id = run.info.run_id
        tags = {
            TAG_EARLY: str(trial.early_stopped).lower(),
            "trial_status": trial.status,
            EPOCHS_DONE: str(trial.epochs_done),
        }
        if any(run.data.tags.get(k) != v for k, v in tags.items()):
            for key, value in tags.items():
                with_retries(client.set_tag, run.info.run_id, key, value, retries=base.tracking.retries)
        status = "FAILED" if trial.status == "error" else "FINISHED"
        # left RUNNING by a stopped actor, or FAILED by one interrupted after its training had
        # finished (the resumed trial then replays its checkpoints and never reopens the run)
        if run.info.status != status:
            with_retries(client.set_terminated, run.info.run_id, status, retries=base.tracking.retries)
    for trial_id, run in runs.items():
        if trial_id not in known:
            log.warning("MLflow run %s belongs to no trial of the resumed sweep; deleted (restorable)", run.info.run_id)
            with_retries(client.delete_run, run.info.run_id, retries=base.tracking.retries)


def _finish(sweep: Sweep, base: Config, report: SweepReport, parent) -> None:
    """The parent run's record: summary table, figure, best trial and config, test numbers."""
    keys = [p.key for p in sweep.params]
    parent.log_text(summary_csv(report.trials, keys, sweep.metric), "trials.csv")
    if report.trials:
        parent.log_figure(
            metric_vs_params(report.trials, sweep.params, sweep.metric, report.best), "figures/mR_vs_params.png"
        )
    best = report.best
    if best is None:
        log.warning("no trial of sweep %s reported %s", sweep.name, sweep.metric)
        return
    parent.log_params({"best": {"trial_id": best.trial_id, **best.params}})
    parent.log_metrics(
        {
            f"best/{sweep.metric}": best.best,
            **({"best/epoch": best.best_epoch} if sweep.settings.kind == "train" else {}),
        },
        step=0,
    )
    parent.set_tags({"best_trial_id": best.trial_id, "best_run_id": best.run_id})
    if sweep.settings.kind == "smr":
        _finish_smr(sweep, report, parent)
    else:
        _finish_train(sweep, base, report, parent)


def _finish_train(sweep: Sweep, base: Config, report: SweepReport, parent) -> None:
    import ray.train

    best = report.best
    cfg = trial_config(base, best.params)  # as the trial trained it (same stage checkpoints), not its run folder
    cfg.train.run_name = ""
    cfg.train.storage_path = sweep.base.train.storage_path
    report.best_config = sweep.settings.best_config or _default_best_config(sweep)
    Path(report.best_config).parent.mkdir(parents=True, exist_ok=True)
    cfg.save(report.best_config)
    parent.log_artifact(report.best_config)
    run = storage.resolve(_join(sweep.folder, TRIALS_FOLDER, best.trial_id))
    result = ray.train.Result.from_path(run.path, storage_filesystem=run.fs)
    checkpoint = result.get_best_checkpoint(sweep.metric, "max")
    if checkpoint is None:
        return
    report.best_checkpoint = f"s3://{checkpoint.path}" if storage.is_s3(sweep.folder) else checkpoint.path
    parent.set_tags({"best_checkpoint": report.best_checkpoint})
    if sweep.settings.evaluate_test:
        from rsray.eval.checkpoint import evaluate_checkpoint

        result = evaluate_checkpoint(report.best_checkpoint, split="test")
        report.test = {"metrics": result["metrics"], "smr_metrics": result["smr_metrics"], "epoch": result["epoch"]}
        parent.log_metrics(result["metrics"], step=0, prefix="best/test/")
        parent.log_metrics(result["smr_metrics"], step=0, prefix="best/test_smr/")
        parent.log_dict(report.test, "best_test.json")


def _finish_smr(sweep: Sweep, report: SweepReport, parent) -> None:
    from rsray.eval.rerank import SMRConfig

    smr = SMRConfig(**{key.split(".")[1]: value for key, value in report.best.params.items()})
    report.best_checkpoint = sweep.settings.checkpoint
    report.best_config = sweep.settings.best_config or _default_best_config(sweep, "best_smr.yaml")
    command = f"rsray evaluate {sweep.settings.checkpoint} --smr-k {smr.k} --smr-w {smr.w} --smr-beta {smr.beta}"
    Path(report.best_config).parent.mkdir(parents=True, exist_ok=True)
    Path(report.best_config).write_text(
        yaml.safe_dump(
            {"smr": asdict(smr), "checkpoint": sweep.settings.checkpoint, "evaluate": command}, sort_keys=False
        )
    )
    parent.log_artifact(report.best_config)
    if sweep.settings.evaluate_test:
        from rsray.eval.checkpoint import evaluate_checkpoint

        result = evaluate_checkpoint(sweep.settings.checkpoint, split="test", smr=smr)
        report.test = {"metrics": result["metrics"], "smr_metrics": result["smr_metrics"], "epoch": result["epoch"]}
        parent.log_metrics(result["metrics"], step=0, prefix="best/test/")
        parent.log_metrics(result["smr_metrics"], step=0, prefix="best/test_smr/")
        parent.log_dict(report.test, "best_test.json")


def _default_best_config(sweep: Sweep, name: str = "best_config.yaml") -> str:
    """In the sweep folder when it is local; next to the command (cwd) when the folder is on S3,
    since `rsray train` reads a local file."""
    if storage.is_s3(sweep.folder):
        return str(Path.cwd() / f"{sweep.name}-{name}")
    return str(Path(sweep.folder) / name)


# ----------------------------------------------------------------------------- records


def summary_csv(trials: Sequence[TrialSummary], keys: Sequence[str], metric: str) -> str:
    """The summary table: one row per trial, swept values, status and metric."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "trial_id",
            *keys,
            "status",
            EPOCHS_DONE,
            f"best {metric}",
            "best_epoch",
            f"last {metric}",
            "mlflow_run_id",
            "error",
        ]
    )
    for t in trials:
        writer.writerow(
            [
                t.trial_id,
                *(t.params.get(k) for k in keys),
                t.status,
                t.epochs_done,
                _fmt(t.best),
                t.best_epoch,
                _fmt(t.last),
                t.run_id,
                t.error,
            ]
        )
    return out.getvalue()


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else ""


def metric_vs_params(
    trials: Sequence[TrialSummary], params: Sequence[Param], metric: str, best: TrialSummary | None = None
):
    """One panel per swept key: each trial's best metric against its value (log axis for
    loguniform keys, categories for non-numeric ones); early-stopped trials hollow, the best
    trial starred."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * max(1, len(params)), 3.6), layout="constrained")
    axes = fig.subplots(1, max(1, len(params)), squeeze=False)[0]
    for ax, param in zip(axes, params, strict=False):  # one empty axis when nothing was swept
        values = [t.params.get(param.key) for t in trials]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None)
        if numeric:
            position = {v: v for v in values}
        else:
            labels = list(dict.fromkeys(str(v) for v in values))
            position = {v: labels.index(str(v)) for v in values}
            ax.set_xticks(range(len(labels)), labels)
        for status, face, label in (
            ("finished", "C0", "finished"),
            ("early_stopped", "none", "stopped early (ASHA)"),
            ("error", "none", "failed"),
        ):
            points = [
                (position[t.params.get(param.key)], t.best)
                for t in trials
                if t.status == status and math.isfinite(t.best) and t.params.get(param.key) is not None
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.scatter(
                    xs,
                    ys,
                    marker="o",
                    s=40,
                    facecolors=face,
                    edgecolors="C0" if status != "error" else "C1",
                    label=label,
                )
        if best is not None and best.params.get(param.key) is not None:
            ax.scatter(
                [position[best.params[param.key]]], [best.best], marker="*", s=220, color="C3", zorder=3, label="best"
            )
        if param.kind == "loguniform" or (numeric and param.kind in ("grid", "choice") and _spans_decades(values)):
            ax.set_xscale("log")
        ax.set(xlabel=param.key, ylabel=f"best {metric}", title=param.key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def _spans_decades(values: Sequence[Any]) -> bool:
    positive = [v for v in values if isinstance(v, (int, float)) and v > 0]
    return len(positive) == len(values) and len(positive) > 1 and max(positive) / min(positive) >= 100
