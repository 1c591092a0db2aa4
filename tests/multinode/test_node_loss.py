"""A node lost mid-training on the two-node cluster (`Cluster.remove_node`: its raylet, object
store and the Train workers on it are gone, as when a machine dies), with two runs training on it
at once (`one_node_loss`):

- Fixed workers (2, one per node, `strict_spread`): the run cannot go on with one, waits, and
  once a replacement node joins (what an autoscaler provides) resumes from its last checkpoint and
  finishes every epoch.
- Elastic (`train.num_workers=[1, 2]`): the run goes on with one worker at once and grows back to
  two when a node returns; the learning rate follows `train.elastic_lr` (linear) each epoch. Its
  workers need one `train_slot` each, a resource every node has once: Ray Train counts an elastic
  group's size from resources alone (it ignores `strict_spread`, and with it asked for two workers
  on one node and waited out its 60 s start timeout).

In both, MLflow holds each epoch exactly once with its worker count, and the final checkpoint
re-evaluates to the val mR it reported. While the fixed run waits, a run lock that names the lost
node is shown to be stale at once. The cluster is left with two nodes again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from rsray.checkpoint import read_checkpoint
from rsray.config import ConfigError, config_from_dict, load_config
from rsray.data.loader import read_split
from rsray.data.manifest import read_manifest, vocab_size
from rsray.eval.split import evaluate
from rsray.models import build_model, model_config
from rsray.train.run_folder import LOCK_FILE, RunLock
from tests.multinode.conftest import SLOT, STORE

pytestmark = pytest.mark.integration

ELASTIC_EPOCHS = 6
# Four, not two: the fixed run starts beside the elastic one and must still be training when both
# have registered an epoch and the node goes.
FIXED_EPOCHS = 4
LR = 1e-3  # vsepp-tiny's learning rate, flat over these epochs (its step decay comes every 15)


def _train(prepared, runs: Path, name: str, mlflow_server: str, cluster, log: Path, start_timeout_s: int, *extra: str):
    """`rsray train` VSE++ tiny joined to the two-node cluster, output to `log`; Ray Train gives up
    on one worker-group start after `start_timeout_s` (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)."""
    args = [
        "train/cpu-tiny",
        f"train.data={prepared}",
        f"train.storage_path={runs}",
        f"train.run_name={name}",
        "train.shared_fs_ok=true",  # both nodes are this machine
        "train.placement=strict_spread",  # one worker per node: a lost node takes its worker
        "train.cpus_per_worker=0.5",
        "train.max_failures=4",
        f"tracking.uri={mlflow_server}",
        f"tracking.experiment=node-loss-{name}",
        "tracking.system_metrics=false",
        "tracking.log_model=false",
        *extra,
    ]
    # Ray Train passes RAY_TRAIN_* variables on to its controller.
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(start_timeout_s)}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "rsray.pipelines.train", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


# Once a second: a condition asks the MLflow server (one request a run once its run is known). Polling
# every 0.2 s with three requests, the session's server answered 3,561 requests in the suite (61 s of its
# CPU); once a second, 2,371 (42 s).
POLL_S = 1.0


def wait_until(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"training ended before {what}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{log.read_text()[-4000:]}"
        time.sleep(POLL_S)


def _checkpoints(runs: Path, name: str) -> list[Path]:
    return sorted((runs / name).glob("checkpoint_*/state.pt"))


_RUN_IDS: dict[tuple[str, str], str] = {}  # a run keeps its MLflow run through restarts: looked up once


def _logged_epochs(mlflow_server: str, name: str) -> int:
    """Epochs the MLflow run holds: Ray Train has registered their checkpoints (a checkpoint folder
    appears before every worker has reported, and a group lost then restarts without it). One
    request a poll once the run is known (three before: the server's CPU is the suite's too)."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    run_id = _RUN_IDS.get((mlflow_server, name))
    if run_id is None:
        experiment = client.get_experiment_by_name(f"node-loss-{name}")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if not runs:
            return 0
        run_id = _RUN_IDS[(mlflow_server, name)] = runs[0].info.run_id
    return len(client.get_metric_history(run_id, "val/mR"))


def _epochs_trained(log: Path, epoch: int) -> int:
    """How many times a Train worker trained `epoch` (more than once: a restart without its checkpoint)."""
    lines = log.read_text().splitlines()  # rank 0's epoch lines reach the console as rsray's own (rsray.console)
    return sum(line.startswith(f"rsray: epoch {epoch} of 0..") for line in lines)


def lose_the_worker_node(cluster) -> str:
    """Remove the node that is not the head; its Ray node id."""
    worker_node = next(node for node in cluster.list_all_nodes() if node is not cluster.head_node)
    cluster.remove_node(worker_node)
    return worker_node.node_id


def _a_run_lock_from_a_dead_node_is_taken_over(lost_node: str, live_node: str, tmp_path: Path, proc, log) -> None:
    """A run lock written on another machine with a fresh heartbeat holds while its Ray node lives
    and is taken over at once when the cluster has declared that node dead (a sweep's trial
    restarted elsewhere would otherwise wait STALE_S)."""
    import ray

    def declared_dead() -> bool:
        return not any(n["NodeID"] == lost_node and n["Alive"] for n in ray.nodes())

    wait_until(declared_dead, proc, log, "lost node declared dead", timeout=60)
    cfg = load_config("train/cpu-tiny", [f"train.storage_path={tmp_path / 'locks'}", "train.run_name=held"])
    lock = tmp_path / "locks" / "held" / LOCK_FILE
    lock.parent.mkdir(parents=True)
    record = {"host": "another-machine", "pid": 1, "heartbeat": time.time()}
    lock.write_text(json.dumps({**record, "ray_node": live_node}))
    with pytest.raises(ConfigError, match="'held' is in use by a live run"):
        RunLock(cfg).__enter__()
    lock.write_text(json.dumps({**record, "ray_node": lost_node}))
    with RunLock(cfg):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def add_a_node(cluster) -> None:
    cluster.add_node(num_cpus=2, object_store_memory=STORE, resources=SLOT)
    cluster.wait_for_nodes()


def tick_the_coordinator(expect_nodes: int) -> None:
    """Once the cluster shows `expect_nodes` live nodes, have Ray's AutoscalingCoordinator (where an
    elastic group's resource view comes from) refresh its node list now: it does so every 20 s on
    its own (`TICK_INTERVAL_S`, docs/deploy/node-loss.md), and without this nudge the run needed
    14 epochs to outlast that wait. Its public method `get_reserved_resources(recompute=True)` runs
    the tick; the timing is the only thing this changes."""
    import ray

    deadline = time.monotonic() + 60
    while sum(node["Alive"] for node in ray.nodes()) != expect_nodes:
        assert time.monotonic() < deadline, f"the cluster never showed {expect_nodes} live nodes"
        time.sleep(0.5)
    coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    ray.get(coordinator.get_reserved_resources.remote("rsray-node-loss-test", recompute=True), timeout=30)


def _mlflow_epochs(mlflow_server: str, name: str) -> tuple[dict[int, float], dict[int, float], dict[int, float]]:
    """val/mR, workers and lr per epoch as the MLflow run holds them (each epoch must be there once)."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(f"node-loss-{name}")
    (run,) = client.search_runs([experiment.experiment_id])
    series = {}
    for key in ("val/mR", "workers", "lr"):
        history = client.get_metric_history(run.info.run_id, key)
        steps = [m.step for m in history]
        assert sorted(steps) == sorted(set(steps)), f"{key}: an epoch logged twice: {steps}"
        series[key] = {m.step: m.value for m in history}
    return series["val/mR"], series["workers"], series["lr"]


def _final_checkpoint_reevaluates(runs: Path, name: str, prepared: str, reported: float) -> None:
    kept = [read_checkpoint(str(state.parent)) for state in _checkpoints(runs, name)]
    state, saved_config = max(kept, key=lambda checkpoint: checkpoint[0]["epoch"])
    cfg = config_from_dict(saved_config)
    model = build_model(cfg, vocab_size=vocab_size(read_manifest(prepared)))
    model.load_state_dict(state["model"])
    scores = evaluate(model, read_split(prepared, "val"), model_config(cfg).augment)
    assert state["epoch"] == cfg.train.epochs - 1
    assert scores["mR"] == pytest.approx(reported, abs=1e-6) == pytest.approx(state["metrics"]["val/mR"], abs=1e-6)


class _Run:
    """One `rsray train` of the shared node loss, started at once (`_train`)."""

    def __init__(self, name: str, folder: Path, prepared: str, mlflow_server: str, cluster, start_timeout_s, *extra):
        self.name, self.runs, self.log = name, folder / name / "runs", folder / f"{name}.log"
        self.runs.mkdir(parents=True)
        self.proc = _train(prepared, self.runs, name, mlflow_server, cluster, self.log, start_timeout_s, *extra)

    def alive(self) -> None:
        assert self.proc.poll() is None, f"{self.name}: training ended early:\n{self.log.read_text()[-4000:]}"


@pytest.fixture(scope="module")
def one_node_loss(ray_nodes, prepared_on_nodes, mlflow_server, tmp_path_factory):
    """A fixed run and an elastic run trained at once on the two nodes, through one loss of the
    worker node and its return: one start-up, one loss and one replacement serve both (they took
    about 60 s and 80 s one after the other). The fixed run has 2 workers spread one per node and
    waits; the elastic one (`[1, 2]` workers, one `train_slot` each) goes on with one and grows back.
    Ray Train's view of the nodes for the elastic run comes from Ray's AutoscalingCoordinator,
    refreshed here as soon as the cluster changes (tick_the_coordinator); the epochs left after the
    node returns must still outlast one resize poll (train.elastic_resize_s=1) and the restart."""
    folder = tmp_path_factory.mktemp("node-loss")
    started = time.monotonic()
    # The fixed run waits for the replacement node through its worker-group starts: Ray's default
    # timeout (60 s) each, three tries (rsray.train.run.WORKER_GROUP_START_RETRIES), so 3 min, as
    # on a cluster. With 10 s it once gave up after 30 s, before the node came back: the elastic
    # run's epoch on one worker comes first, and under load it took that long. The elastic run
    # keeps 10 s: after the loss Ray Train may first try the old size again, from a resource view
    # that still counts the dead node, and waits out that timeout before going on with fewer.
    fixed = _Run("fixed", folder, prepared_on_nodes, mlflow_server, ray_nodes, 60, f"train.epochs={FIXED_EPOCHS}")
    elastic_extra = [f"train.epochs={ELASTIC_EPOCHS}", "train.num_workers=[1,2]", "train.elastic_resize_s=1"]
    elastic_extra += ["train.worker_resources={train_slot: 1}", "train.placement=pack"]  # one per node, counted by Ray
    elastic = _Run("elastic", folder, prepared_on_nodes, mlflow_server, ray_nodes, 10, *elastic_extra)
    runs = (fixed, elastic)
    try:

        def each_registered_an_epoch() -> bool:
            elastic.alive()
            return all(_logged_epochs(mlflow_server, run.name) >= 1 for run in runs)

        wait_until(each_registered_an_epoch, fixed.proc, fixed.log, "a registered epoch in both runs")
        lost = lose_the_worker_node(ray_nodes)
        lost_at = time.monotonic()
        fixed_at_loss = _logged_epochs(mlflow_server, "fixed")
        assert fixed_at_loss < FIXED_EPOCHS, "the fixed run finished before the node loss"
        tick_the_coordinator(expect_nodes=1)
        before = _logged_epochs(mlflow_server, "elastic")
        wait_until(
            lambda: _logged_epochs(mlflow_server, "elastic") > before,
            elastic.proc,
            elastic.log,
            "an epoch on one worker",
            timeout=120,
        )
        time.sleep(max(0.0, lost_at + 5 - time.monotonic()))  # 5 s at least: the fixed run may not move on
        fixed.alive()  # one node cannot hold two strict_spread workers
        assert _logged_epochs(mlflow_server, "fixed") == fixed_at_loss, fixed.log.read_text()[-3000:]
        _a_run_lock_from_a_dead_node_is_taken_over(lost, ray_nodes.head_node.node_id, folder, fixed.proc, fixed.log)
        add_a_node(ray_nodes)
        tick_the_coordinator(expect_nodes=2)
        codes = {run.name: run.proc.wait(timeout=300) for run in runs}
    finally:
        for run in runs:
            run.proc.kill()
    print(f"\nfixed and elastic runs through one node loss: {time.monotonic() - started:.0f} s")
    return {run.name: SimpleNamespace(code=codes[run.name], runs=run.runs, log=run.log) for run in runs}


def test_fixed_workers_wait_for_a_replacement_node_and_resume_from_the_last_checkpoint(
    one_node_loss, prepared_on_nodes, mlflow_server
):
    fixed = one_node_loss["fixed"]
    assert fixed.code == 0, fixed.log.read_text()[-4000:]
    mr, workers, _ = _mlflow_epochs(mlflow_server, "fixed")
    assert sorted(mr) == list(range(FIXED_EPOCHS)) and set(workers.values()) == {2}
    assert _epochs_trained(fixed.log, 0) == 1  # the restart went on from the last checkpoint
    _final_checkpoint_reevaluates(fixed.runs, "fixed", prepared_on_nodes, mr[FIXED_EPOCHS - 1])


def test_an_elastic_run_goes_on_with_fewer_workers_and_grows_back(one_node_loss, prepared_on_nodes, mlflow_server):
    elastic = one_node_loss["elastic"]
    assert elastic.code == 0, elastic.log.read_text()[-4000:]
    mr, workers, lr = _mlflow_epochs(mlflow_server, "elastic")
    epochs = ELASTIC_EPOCHS
    assert sorted(mr) == list(range(epochs))
    counts = [int(workers[epoch]) for epoch in range(epochs)]
    assert counts[0] == 2 and 1 in counts and counts[-1] == 2, counts  # shrank without waiting, grew back
    assert _epochs_trained(elastic.log, 0) == 1  # each restart went on from the last checkpoint
    print(f"\nworkers per epoch: {counts}")
    for epoch in range(epochs):  # the linear rule: lr x workers / max (the tiny preset's schedule is flat)
        assert lr[epoch] == pytest.approx(LR * counts[epoch] / 2, rel=1e-9), (epoch, counts)
    _final_checkpoint_reevaluates(elastic.runs, "elastic", prepared_on_nodes, mr[epochs - 1])
