"""A sweep file read and checked: its `sweep:` section (`SweepSettings`), the swept keys
(`Param`) and the training config they vary, all in one `Sweep`. Errors are one line naming the
file (or command line) and key that set the value.

Also the names the sweep's parts share: files in the sweep folder and tags on its MLflow runs.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rsray import config_tree as trees
from rsray import storage
from rsray.config import COMMAND_LINE, Config, ConfigError

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
    # Tune restarts a trial whose driver actor died (its node was lost) up to this many times; the
    # restarted trial finds its MLflow child run and its Train run resumes from its last checkpoint.
    # A lost Train worker is train.max_failures' business, inside the trial. -1: restart forever.
    trial_max_failures: int = 3  # our choice (Tune's default, 0, ends a sweep's trial with its node)
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
        if self.trial_max_failures < -1:
            yield "trial_max_failures", f"must be >= -1 (-1: restart forever), got {self.trial_max_failures}"
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
        return self.settings.scheduler.max_t or max(candidates(self, "train.epochs", self.base.train.epochs))

    @property
    def folder(self) -> str:
        """The sweep's folder (local absolute path or s3:// URI)."""
        root = self.settings.storage_path or join_uri(self.base.train.storage_path, "sweeps")
        root = root if storage.is_s3(root) else str(Path(root).expanduser().resolve())
        return join_uri(root, self.name)

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
                    "config": self.base.public_dict(),
                },
                default=str,
            )
        )


def join_uri(root: str, *parts: str) -> str:
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
    path = trees.find_config_file(path, "sweep file")
    tree = trees.read_yaml_mapping(path, _SweepYamlLoader)
    defaults = trees.pop_defaults(tree, path)
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
        trees.merge_config_file(parent, config_tree, origins, seen=(path,))
    trees.merge_into(config_tree, tree, origins, str(path))
    sweep_tree = {"sweep": section}
    trees.merge_into({}, sweep_tree, origins, str(path))  # records where sweep keys come from
    for item in overrides:
        key, value = trees.parse_override(item, _SweepYamlLoader)
        space = sweep_tree["sweep"].setdefault("space", {}) if key.startswith("sweep.space.") else None
        if isinstance(space, dict):
            swept, _, kind = key[len("sweep.space.") :].rpartition(".")
            swept, value = (swept, {kind: value}) if kind in KINDS else (f"{swept}.{kind}".strip("."), value)
            space[swept] = value  # a whole key's spec replaces the file's
            origins[f"sweep.space.{swept}"] = COMMAND_LINE
            continue
        target = sweep_tree if key.split(".")[0] == "sweep" else config_tree
        trees.merge_into(target, trees.nest(key, value), origins, COMMAND_LINE)

    base = trees.build_section(Config, config_tree, prefix="", origins=origins)
    base.origins = origins
    settings = trees.build_section(SweepSettings, sweep_tree["sweep"], prefix="sweep.", origins=origins)
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
            raise sweep.error(where, f"expected {{{'|'.join(KINDS)}: [...]}}, got {trees.value_kind(node)}")
        kinds = [k for k in node if k in KINDS]
        if not kinds:
            raise sweep.error(where, f"unknown kind {', '.join(map(str, node))}: use one of {', '.join(KINDS)}")
        if len(node) != 1:
            raise sweep.error(where, f"give exactly one of {', '.join(KINDS)}, got {', '.join(map(str, node))}")
        kind, values = kinds[0], node[kinds[0]]
        if not isinstance(values, list) or not values:
            raise sweep.error(where, f"{kind}: expected a non-empty list, got {trees.value_kind(values)}")
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


def candidates(sweep: Sweep, key: str, default: Any) -> list[Any]:
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
