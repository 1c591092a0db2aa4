"""Integration fixtures: one Ray per test module, with more logical CPUs than cores."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    """A real local Ray (separate worker processes) that inherits the S3 test credentials."""
    import ray

    env_vars = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3")}
    ray.init(num_cpus=4, object_store_memory=300 * 1024 * 1024, include_dashboard=False,
             runtime_env={"env_vars": env_vars}, log_to_driver=False)
    yield ray
    ray.shutdown()
