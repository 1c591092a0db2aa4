"""Fixtures of the multi-node tests: one Ray cluster of two nodes on this machine
(`ray.cluster_utils.Cluster`: each node its own raylet, object store and worker processes, as Ray
tests itself), and the tiny sample prepared on it. tests/multinode is its own package, so this
cluster starts after tests/integration's single-node Ray has stopped (both own the process's
`ray.init`)."""

from __future__ import annotations

import os

import pytest

NODES = 2
STORE = 150 * 1024 * 1024  # object store per node


@pytest.fixture(scope="package")
def ray_nodes(s3_endpoint):
    """Head + one more node, 2 logical CPUs each, every process on 127.0.0.1; started after the S3
    fixture has put the test credentials in os.environ, so every raylet and worker inherits them."""
    import ray
    from ray.cluster_utils import Cluster

    ours = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in os.environ
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # as in tests/integration
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": STORE, "include_dashboard": False},
    )
    for _ in range(NODES - 1):
        cluster.add_node(num_cpus=2, object_store_memory=STORE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    if ours:
        del os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]


@pytest.fixture(scope="package")
def prepared_on_nodes(ray_nodes, tmp_path_factory) -> str:
    """The tiny sample (120 images at 64 px) prepared by Ray Data's tasks on both nodes."""
    from rsray.config import load_config
    from rsray.data.prepare import prepare
    from rsray.data.synthetic import generate_sample

    root = tmp_path_factory.mktemp("sample")
    generate_sample(root, n_images=120, image_size=64, seed=0, progress=False)
    output = tmp_path_factory.mktemp("prepared") / "sample"
    prepare(load_config("presets/cpu-tiny", [f"data.root={root}", f"prepare.output={output}"]))
    return str(output)
