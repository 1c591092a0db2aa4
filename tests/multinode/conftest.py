"""Fixtures of the multi-node tests: one Ray cluster of two nodes on this machine
(`ray.cluster_utils.Cluster`: each node its own raylet, object store and worker processes, as Ray
tests itself), and the tiny sample prepared on it. tests/multinode is its own package, so this
cluster starts after tests/integration's single-node Ray has stopped (both own the process's
`ray.init`)."""

from __future__ import annotations

import pytest

from tests.conftest import free_port, prepare_tiny_sample, quick_train_polling

NODES = 2
STORE = 150 * 1024 * 1024  # object store per node
# Every node holds one of this custom resource, as a one-GPU node holds one GPU: a run whose workers
# need one each (train.worker_resources) gets one worker per node, elastic runs included.
SLOT = {"train_slot": 1}
# How soon the head declares a lost node dead: Ray's defaults (a check every 3 s, dead after 5
# misses, each waiting up to 10 s) kept a removed node counted for about 30 s, and Ray Train's
# elastic group tried the old size three times meanwhile. A check a second, dead after 5 misses.
NODE_HEALTH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 5}


@pytest.fixture(scope="package")
def ray_nodes(s3_endpoint, mlflow_server):
    """Head + one more node, 2 logical CPUs each, every process on 127.0.0.1, token authentication
    on (the session's token: tests/conftest.py); the head serves the dashboard and job API on 127.0.0.1
    (`cluster.dashboard_url`). Started after the S3 and MLflow fixtures have put the test
    credentials in os.environ, so every raylet and worker inherits them."""
    import ray
    from ray.cluster_utils import Cluster

    with quick_train_polling():
        dashboard_port = free_port()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 2,
                "object_store_memory": STORE,
                "resources": SLOT,
                "_system_config": NODE_HEALTH,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard_port,
            },
        )
        cluster.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        for _ in range(NODES - 1):
            cluster.add_node(num_cpus=2, object_store_memory=STORE, resources=SLOT)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="package")
def prepared_on_nodes(ray_nodes, tmp_path_factory) -> str:
    """The tiny sample prepared by Ray Data's tasks on both nodes."""
    return prepare_tiny_sample(tmp_path_factory)
