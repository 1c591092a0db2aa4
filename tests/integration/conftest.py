"""Integration fixtures: one Ray per test module, with more logical CPUs than cores."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    """A real local Ray (separate worker processes). It starts after the S3 fixture has put the
    test credentials in os.environ, so the raylet and every worker inherit them."""
    import ray

    ray.init(num_cpus=4, object_store_memory=300 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
