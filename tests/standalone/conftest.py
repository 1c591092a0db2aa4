"""The integration modules that need a Ray and the tiny sample but none of tests/integration's
trained runs: training presets and stages, the study, preparing, the corpus, the benchmarks' smoke
runs, the wheel. A package of their own, with its own Ray and sample (made once for all its
modules), so that `make test` runs it on the second xdist worker beside tests/integration and
tests/multinode at a lower priority (tests/conftest.py); alone it is one more package."""

from __future__ import annotations

import pytest

from tests.conftest import local_test_ray, prepare_tiny_sample

# Beside the other packages at a lower priority, a Train run's workers can take longer than Ray
# Train's 60 s to start; nothing here tests that timeout (tests/integration's more-workers test does).
BESIDE = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}


@pytest.fixture(scope="package")
def ray_cluster(s3_endpoint, mlflow_server):
    """This package's local Ray, started after the S3 and MLflow fixtures have put the test
    credentials in os.environ, so the raylet and every worker inherit them."""
    with local_test_ray(**BESIDE) as ray:
        yield ray


@pytest.fixture(scope="package")
def prepared(ray_cluster, tmp_path_factory):
    """The tiny sample (120 images at 64 px) prepared by the real Ray Data stage."""
    return prepare_tiny_sample(tmp_path_factory)
