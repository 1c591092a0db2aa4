"""Reaching an MLflow store: clients with bounded HTTP retries, our retry helper, run search,
metric histories, reachability, and the names, tags and params rsray gives runs. `rsray.tracking`
builds its Tracker on these; commands that only read runs (compare, studies) use them directly.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rsray.config import TrackingConfig
from rsray.redact import (
    HIDDEN,
    is_secret,
    redact,
    split_credentials,
    without_credentials,
)

log = logging.getLogger("rsray.tracking")

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # opens the runs table (training view) in the UI
PARENT_RUN_TAG = "mlflow.parentRunId"  # how MLflow nests a child run under its parent
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local SQLite store

# MLflow's own HTTP client retries up to 7 times with long backoff; our helper does the retrying,
# so a dead server stalls one call for seconds, not minutes. Users may still override both.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def ui_command(uri: str) -> str:
    """The shell command that serves a local tracking store in the MLflow UI: the `mlflow` installed
    beside this Python (relative to the working directory when it is inside it, so the line works
    when pasted there) and the store as an absolute URI."""
    executable = Path(sys.executable).parent / "mlflow"
    try:
        shown = str(executable.relative_to(Path.cwd()))
    except ValueError:
        shown = str(executable)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    return f"{shown} ui --backend-store-uri {uri}"


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be used at the start of a run; the message is one line."""


# ----------------------------------------------------------------------------- helpers


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.epochs": "10", ...}: dotted keys, string values, secrets dropped."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if is_secret(str(key)):
            continue
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{dotted}."))
        else:
            flat[dotted] = redact(str(value))[:MAX_PARAM_LENGTH]
    return flat


def metric_name(name: str) -> str:
    """A name MLflow accepts: `@` dropped (i2t_R@1 -> i2t_R1), `/` kept, anything else odd -> `_`."""
    return re.sub(r"[^\w\-. :/]", "_", name.replace("@", ""))


def with_retries(
    fn: Callable[..., Any],
    *args: Any,
    retries: int = 5,
    base_delay: float = 1.0,
    max_delay: float = 30.0,
    what: str = "",
    on_give_up: Callable[[BaseException], None] | None = None,
    **kwargs: Any,
) -> Any:
    """Call `fn`; on an exception wait base_delay * 2**attempt (capped) and try again, `retries`
    more times. After the last failure log one warning, tell `on_give_up` and return None: never
    raises."""
    for attempt in range(retries + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == retries:
                log.warning(
                    "MLflow: %s failed after %d attempt(s), skipped: %s",
                    what or getattr(fn, "__name__", "call"),
                    attempt + 1,
                    one_line(exc),
                )
                if on_give_up is not None:
                    on_give_up(exc)
                return None
            time.sleep(min(base_delay * 2**attempt, max_delay))
    return None


def as_number(value: Any) -> float | None:
    """float(value) for ints, floats, numpy and 0-d torch numbers; None for anything else."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def one_line(exc: BaseException) -> str:
    text = redact(" ".join(str(exc).split()))
    return f"{type(exc).__name__}: {text[:300]}"


def default_tags() -> dict[str, str]:
    """Where a run came from: git commit of the code, Ray job id (when Ray is up), host name."""
    tags = {"host": socket.gethostname(), "git_commit": git_commit()}
    tags["mlflow.source.git.commit"] = tags["git_commit"]  # shown by the MLflow UI
    job_id = ray_job_id()
    if job_id:
        tags["ray_job_id"] = job_id
    return tags


def git_commit() -> str:
    """HEAD of the repository holding this code, else of the working directory, else
    $RSRAY_GIT_COMMIT (container images carry no .git; cluster/Dockerfile sets it), else unknown."""
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        try:
            out = subprocess.run(
                ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return os.environ.get("RSRAY_GIT_COMMIT") or "unknown"


def ray_job_id() -> str | None:
    """The current Ray job id, without importing Ray when this process never used it."""
    if "ray" not in sys.modules:
        return None
    try:
        import ray

        return ray.get_runtime_context().get_job_id() if ray.is_initialized() else None
    except Exception:
        return None


def mlflow_client(uri: str | None) -> Any:
    """An MlflowClient for `uri`. Credentials written into the URI (`http://user:password@host`) are
    handed to MLflow through its own variables (MLFLOW_TRACKING_USERNAME / _PASSWORD, in this
    process only) and the client gets the bare address, so nothing MLflow prints or logs (its
    "View run at" lines, its errors) can show them. Variables the user set win; a redacted
    password (`***`, from a saved config) is left to them. Only http(s) URIs: a database URI's
    login is the database's."""
    from mlflow import MlflowClient

    if not uri or not uri.startswith(("http://", "https://")):  # a database URI keeps its login
        return MlflowClient(uri)
    address, credentials = split_credentials(uri)
    if credentials and credentials[1] != HIDDEN:  # `***`: a saved config; the variables hold the login
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", credentials[0])
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", credentials[1])
    return MlflowClient(address)


def metric_history(run_id: str, key: str, tracking_uri: str | None = None) -> list[tuple[int, float]]:
    """[(step, value)] of one metric of a run, in step order."""
    history = mlflow_client(tracking_uri).get_metric_history(run_id, metric_name(key))
    return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


def find_runs(tracking_cfg: Any, tags: Mapping[str, str]) -> list[Any]:
    """Active (not deleted) runs of the configured experiment carrying every tag in `tags`,
    oldest first: how a resumed sweep finds the parent and trial runs it opened before."""
    from mlflow.entities import ViewType

    tracking_cfg = tracking_section(tracking_cfg)
    client = mlflow_client(tracking_cfg.uri)
    experiment = client.get_experiment_by_name(tracking_cfg.experiment)
    if experiment is None:
        return []
    query = " and ".join(f"tags.`{key}` = '{quoted(str(value))}'" for key, value in tags.items())
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment.experiment_id],
            filter_string=query,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def quoted(value: str) -> str:
    """A value inside an MLflow filter string's single quotes."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """For an http(s) tracking URI, one quick request; raise TrackingUnavailable if nothing answers.
    Any HTTP answer (even an error status) means a server is there."""
    if not uri.startswith(("http://", "https://")):
        return
    try:  # credentials in the URI are not part of the address (urllib would read them as the host)
        with urllib.request.urlopen(f"{without_credentials(uri).rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = redact(getattr(exc, "reason", exc))
        raise TrackingUnavailable(
            f"MLflow tracking server {redact(uri)} is not reachable ({reason}); start it or set tracking.uri "
            f"(e.g. tracking.uri=sqlite:///mlflow.db)"
        ) from None


def tracking_section(cfg: Any) -> Any:
    """The TrackingConfig from a TrackingConfig, a whole Config, or their plain-dict forms
    (`Config.to_dict()` is what reaches Ray workers)."""
    if isinstance(cfg, Mapping):
        cfg = cfg.get("tracking", cfg)
        return TrackingConfig(**cfg) if isinstance(cfg, Mapping) else cfg
    return getattr(cfg, "tracking", cfg)


def experiment_for(client: Any, name: str) -> str:
    """The experiment's id, created (and tagged as a training experiment) when missing."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # another process created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            experiment_id = experiment.experiment_id
    else:
        experiment_id = experiment.experiment_id
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment_id
