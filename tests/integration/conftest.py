"""Integration fixtures, shared by every module of this package (tests/integration is a package, so
`scope="package"` ends with its last module): one Ray instance (with more
logical CPUs than cores, so Ray Data and Train don't starve each other) and one prepared sample."""

from __future__ import annotations

import pytest

from tests.conftest import prepare_tiny_sample, quick_train_polling


@pytest.fixture(scope="package")
def ray_cluster(s3_endpoint):
    """A real local Ray (separate worker processes) for every integration module; it stops when
    the last one ends, so the unit tests run without Ray as they would alone. It starts after the S3
    fixture has put the test credentials in os.environ, so the raylet and every worker inherit them."""
    import ray

    with quick_train_polling():
        ray.init(num_cpus=4, object_store_memory=300 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
        yield ray
        ray.shutdown()


@pytest.fixture(scope="package")
def prepared(ray_cluster, tmp_path_factory):
    """The tiny sample (120 images at 64 px) prepared by the real Ray Data stage: the train,
    sweep and PriorCLIP modules all train on it. Returns the prepared folder."""
    return prepare_tiny_sample(tmp_path_factory)
