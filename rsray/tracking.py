"""MLflow tracking: one run per training (or sweep), logged from rank 0 only.

`Tracker.start` opens a run in the configured experiment (a SQLite file by default, or any
`http://` MLflow server) and logs the resolved config as flat params and the tags. Everything
logged afterwards goes through one retry helper: a transient failure mid-run is retried with
exponential backoff and then skipped with a warning, so tracking never kills a training. Only
the start is strict: a server that cannot be reached then is a clear `TrackingUnavailable`.

Ranks other than 0, and `tracking.enabled: false`, use `NullTracker` (same methods, no effect);
`open_tracker` picks the right one. Reaching the store (clients, retries, search) is
`rsray.tracking_store`'s; its public names are importable from here too.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rsray.redact import (
    is_secret,
    redact,
    redact_config_text,
    redact_tree,
    without_credentials,
)
from rsray.tracking_store import (
    DEFAULT_UI,
    MLFLOW_HTTP_DEFAULTS,
    PARENT_RUN_TAG,
    TrackingUnavailable,
    as_number,
    check_reachable,
    default_tags,
    experiment_for,
    find_runs,
    flatten_params,
    metric_history,
    metric_name,
    mlflow_client,
    one_line,
    tracking_section,
    ui_command,
    with_retries,
)

log = logging.getLogger("rsray.tracking")

__all__ = [
    "NullTracker",
    "Tracker",
    "TrackingUnavailable",
    "check_reachable",
    "find_runs",
    "metric_history",
    "metric_name",
    "mlflow_client",
    "open_tracker",
    "ui_command",
    "with_retries",
]

OUTAGE_COOLDOWN_S = 60.0  # after a call gives up, further calls are skipped this long


# ----------------------------------------------------------------------------- trackers


class Tracker:
    """One MLflow run. Use `Tracker.start(...)`; as a context manager the run ends FINISHED, or
    FAILED when the block raises."""

    def __init__(self, client: Any, uri: str, run_id: str, experiment_id: str, retries: int, base_delay: float = 1.0):
        self.client = client
        self.uri = uri
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.retries = retries
        self.base_delay = base_delay
        self._monitor: Any = None
        self._ended = False
        self.resumed = False  # True when `start_or_resume` found the run instead of opening it
        self._down_since: float | None = None  # when a call last gave up (the store counts as down)
        self.not_logged: list[str] = []  # what was given up on, in order

    @classmethod
    def start(
        cls,
        tracking_cfg: Any,
        run_name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        base_delay: float = 1.0,
    ) -> Tracker:
        """Open a run in `tracking_cfg.experiment` at `tracking_cfg.uri`; `params` is the nested
        resolved config (flattened here), `tags` are added to `default_tags()`; with
        `parent_run_id` the run is nested under that run (sweeps)."""
        from mlflow.exceptions import MlflowException

        tracking_cfg = tracking_section(tracking_cfg)
        uri = tracking_cfg.uri
        for name, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        check_reachable(uri)
        all_tags = {**default_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
        if parent_run_id:
            all_tags[PARENT_RUN_TAG] = parent_run_id
        try:
            client = mlflow_client(uri)
            experiment_id = experiment_for(client, tracking_cfg.experiment)
            run = client.create_run(experiment_id, run_name=run_name or None, tags=all_tags)
        except (MlflowException, OSError) as exc:
            raise TrackingUnavailable(
                f"MLflow tracking store {redact(uri)} cannot be used ({one_line(exc)}); check tracking.uri"
            ) from None
        tracker = cls(client, uri, run.info.run_id, experiment_id, tracking_cfg.retries, base_delay)
        tracker.log_params(params or {})
        if getattr(tracking_cfg, "system_metrics", False):
            tracker._start_system_metrics()
        log.info("MLflow run %s in experiment %s (%s)", tracker.run_id, experiment_id, redact(uri))
        return tracker

    @classmethod
    def attach(cls, tracking_cfg: Any, run_id: str, experiment_id: str = "", base_delay: float = 1.0) -> Tracker:
        """A run opened elsewhere (by the driver), for logging from a Ray worker: creates nothing
        and never ends the run, so a restarted worker keeps writing into the same run."""

        tracking_cfg = tracking_section(tracking_cfg)
        for name, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        tracker = cls(
            mlflow_client(tracking_cfg.uri), tracking_cfg.uri, run_id, experiment_id, tracking_cfg.retries, base_delay
        )
        tracker._ended = True  # the owner ends it
        return tracker

    @classmethod
    def start_or_resume(
        cls,
        tracking_cfg: Any,
        run_name: str,
        key_tags: Mapping[str, str],
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        base_delay: float = 1.0,
    ) -> Tracker:
        """The run carrying every tag in `key_tags` (an interrupted sweep or trial run again),
        owned again and marked RUNNING; else a new run with those tags. A resumed job therefore
        never opens a second run for the same thing. `resumed` tells which happened."""
        from mlflow.exceptions import MlflowException

        tracking_cfg = tracking_section(tracking_cfg)
        check_reachable(tracking_cfg.uri)
        try:
            found = find_runs(tracking_cfg, key_tags)
        except (MlflowException, OSError) as exc:
            raise TrackingUnavailable(
                f"MLflow tracking store {redact(tracking_cfg.uri)} cannot be searched ({one_line(exc)}); "
                "check tracking.uri"
            ) from None
        if not found:
            return cls.start(tracking_cfg, run_name, params, {**(tags or {}), **key_tags}, parent_run_id, base_delay)
        run = found[0]
        tracker = cls.attach(tracking_cfg, run.info.run_id, run.info.experiment_id, base_delay)
        tracker._ended = False  # owned here from now on
        tracker.resumed = True
        tracker._call("reopen run", tracker.client.update_run, run.info.run_id, status="RUNNING")
        tracker.log_params(params or {})  # identical values are accepted again
        if getattr(tracking_cfg, "system_metrics", False):
            tracker._start_system_metrics()
        log.info(
            "MLflow run %s resumed in experiment %s (%s)",
            tracker.run_id,
            run.info.experiment_id,
            redact(tracking_cfg.uri),
        )
        return tracker

    # -- logging (every call goes through `_call`, which never raises)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, must_try: bool = False, **kwargs: Any) -> Any:
        """`fn` with retries; None when it gave up. Once a call has given up, the store counts as
        down: calls in the next OUTAGE_COOLDOWN_S seconds are skipped at once, and after that one
        attempt without retries tells whether it is back (`must_try`: attempt it now in any case,
        as ending the run does). A dead server therefore costs one round of retries, not one per
        call, and everything skipped is listed in `not_logged`."""
        down = self._down_since is not None
        if down and not must_try and time.monotonic() - self._down_since < OUTAGE_COOLDOWN_S:
            self.not_logged.append(what)
            return None
        gave_up: list[BaseException] = []
        result = with_retries(
            fn,
            *args,
            retries=0 if down else self.retries,
            base_delay=self.base_delay,
            what=what,
            on_give_up=gave_up.append,
            **kwargs,
        )
        if gave_up:
            self._down_since = time.monotonic()
            self.not_logged.append(what)
        else:
            self._down_since = None
        return result

    def retried(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` under this run's retry and outage rules (`_call`): for logging that
        goes through MLflow's own APIs (a logged model, a registry version); None when given up."""
        return self._call(what, fn, *args, **kwargs)

    def outage(self) -> str | None:
        """One line saying what could not be logged (None when everything was): for the end of a
        command whose work succeeded while the tracking store was away."""
        if not self.not_logged:
            return None
        missed = list(dict.fromkeys(self.not_logged))
        shown = ", ".join(missed[:6])
        more = f" and {len(missed) - 6} more" if len(missed) > 6 else ""
        ended = any(what.startswith("end run") for what in self.not_logged)
        return f"MLflow at {without_credentials(self.uri)} failed; not logged: {shown}{more}" + (
            f"; run {self.run_id} stays RUNNING there until you end it" if ended else ""
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, v) for k, v in flatten_params(params).items()]
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
            self._call("log params", self.client.log_batch, self.run_id, params=flat[i : i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(k, redact(v)) for k, v in tags.items() if not is_secret(k)]
        self._call("set tags", self.client.log_batch, self.run_id, tags=tags)

    def log_metrics(
        self,
        metrics: Mapping[str, float],
        step: int,
        prefix: str = "",
        model_id: str | None = None,
        dataset: tuple[str, str] | None = None,
    ) -> None:
        """Numbers only (None and non-numbers are left out), names made MLflow-safe. `model_id` and
        `dataset` (name, digest) link them to a logged model and the data they were measured on
        (MLflow 3 shows them on the model's page)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        name, digest = dataset or (None, None)
        batch = [
            Metric(
                metric_name(f"{prefix}{k}"),
                x,
                now,
                int(step),
                model_id=model_id,
                dataset_name=name,
                dataset_digest=digest,
            )
            for k, v in metrics.items()
            if (x := as_number(v)) is not None
        ]
        for i in range(0, len(batch), 1000):
            self._call(f"log metrics (step {step})", self.client.log_batch, self.run_id, metrics=batch[i : i + 1000])

    def log_dataset(self, name: str, digest: str, source: str, profile: Mapping[str, Any], context: str) -> None:
        """The data a run used as an MLflow dataset input (MLflow 3's runs table filters by it):
        `source` is its URI, `context` the role (training)."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        source_type = "s3" if str(source).startswith("s3://") else "local"
        dataset = Dataset(name, digest, source_type, json.dumps({"uri": redact(source)}), profile=json.dumps(profile))
        inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]
        self._call(f"log dataset {name}", self.client.log_inputs, self.run_id, datasets=inputs)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A local file, or every file under a local folder (e.g. a checkpoint directory)."""
        path = Path(path)
        if path.is_dir():
            self._call(f"log artifacts {path}", self.client.log_artifacts, self.run_id, str(path), artifact_path)
        else:
            self._call(f"log artifact {path}", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        """`obj` as JSON (name ending .json) or YAML (.yaml/.yml) at artifact path `name`, redacted."""
        self._call(f"log {name}", self.client.log_dict, self.run_id, redact_tree(obj), name)

    def log_figure(self, fig: Any, name: str) -> None:
        """A matplotlib figure as an image artifact (e.g. figures/loss.png)."""
        self._call(f"log figure {name}", self.client.log_figure, self.run_id, fig, name)

    def log_text(self, text: str, name: str) -> None:
        self._call(f"log {name}", self.client.log_text, self.run_id, redact_config_text(text), name)

    def end_orphans(self, run_name: str, storage_path: str) -> list[str]:
        """Mark KILLED the runs of this experiment still RUNNING under `run_name` with this
        `train.storage_path`, other than this one: their driver died without ending them (a SIGKILL,
        a lost machine). Called by a run that holds the run folder's lock, which proves no live
        driver has that folder. Returns their ids (none when the store cannot be searched)."""
        quoted = run_name.replace("'", "\\'")
        found = self._call(
            "find runs left running",
            self.client.search_runs,
            [self.experiment_id],
            filter_string=f"tags.mlflow.runName = '{quoted}' and attributes.status = 'RUNNING'",
        )
        orphans = [
            run.info.run_id
            for run in found or []
            if run.info.run_id != self.run_id and run.data.params.get("train.storage_path") == storage_path
        ]
        for run_id in orphans:
            self._call(f"end run {run_id} left running", self.client.set_terminated, run_id, "KILLED")
        return orphans

    def end_if_running(self, status: str = "KILLED") -> bool:
        """Mark this run `status` if the store still has it RUNNING; for a run whose driver the
        caller knows to be dead (an attached run is otherwise never ended here). Whether it did."""
        run = self._call("read the run's status", self.client.get_run, self.run_id)
        if run is None or run.info.status != "RUNNING":
            return False
        self._call(f"end run ({status})", self.client.set_terminated, self.run_id, status)
        return True

    def end(self, status: str = "FINISHED") -> None:
        """Stop system metrics and mark the run FINISHED, FAILED or KILLED (once)."""
        if self._ended:
            return
        self._ended = True
        if self._monitor is not None:
            self._call("stop system metrics", self._monitor.finish)
            self._monitor = None
        self._call(f"end run ({status})", self.client.set_terminated, self.run_id, status, must_try=True)

    # -- reading back and linking

    def metric_history(self, key: str) -> list[tuple[int, float]] | None:
        """[(step, value)] of one of this run's metrics; None when the store cannot be read."""
        return self._call(f"read {key} history", metric_history, self.run_id, key, self.uri)

    def ui_link(self, host_base: str | None = None) -> str:
        """The experiment's runs table in the MLflow UI (training view), this run among them.
        `host_base` defaults to the tracking server (without credentials: the browser asks for them),
        or `mlflow ui`'s address for a local store."""
        server = without_credentials(self.uri)
        base = host_base or (server if server.startswith(("http://", "https://")) else DEFAULT_UI)
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs?workflowType=machine_learning"

    def run_link(self, host_base: str | None = None) -> str:
        """This run's own page in the MLflow UI, in the training view (without the parameter MLflow
        3.17 opens a run page in its GenAI view: seen in a browser)."""
        table, query = self.ui_link(host_base).split("?")
        return f"{table}/{self.run_id}?{query}"

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import (
                SystemMetricsMonitor,
            )

            monitor_uri = without_credentials(self.uri) if self.uri.startswith("http") else self.uri
            self._monitor = SystemMetricsMonitor(self.run_id, tracking_uri=monitor_uri)
            self._monitor.start()
        except Exception as exc:
            log.warning("MLflow: system metrics disabled: %s", one_line(exc))
            self._monitor = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is KeyboardInterrupt:
            self.end("KILLED")
        else:
            self.end("FAILED" if exc_type else "FINISHED")


class NullTracker:
    """A Tracker that records nothing: ranks other than 0, or `tracking.enabled: false`."""

    run_id: str | None = None
    experiment_id: str | None = None
    uri = ""
    resumed = False

    def __init__(self) -> None:
        self.not_logged: list[str] = []

    def outage(self) -> str | None:
        return None

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> NullTracker:
        return cls()

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def end_orphans(self, run_name: str, storage_path: str) -> list[str]:
        return []

    def end_if_running(self, status: str = "KILLED") -> bool:
        return False

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int, prefix: str = "", **links: Any) -> None: ...
    def log_dataset(self, name: str, digest: str, source: str, profile: Mapping[str, Any], context: str) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, obj: Any, name: str) -> None: ...
    def log_figure(self, fig: Any, name: str) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return []

    def ui_link(self, host_base: str | None = None) -> str:
        return ""

    def run_link(self, host_base: str | None = None) -> str:
        return ""

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        return None


def open_tracker(
    tracking_cfg: Any,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    rank: int = 0,
) -> Tracker | NullTracker:
    """A real Tracker on rank 0 when tracking is enabled, else a NullTracker."""
    tracking_cfg = tracking_section(tracking_cfg)
    if rank != 0 or not tracking_cfg.enabled:
        return NullTracker()
    return Tracker.start(tracking_cfg, run_name, params, tags, parent_run_id)
