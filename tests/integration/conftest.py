"""Integration fixtures, shared by every module of this package (tests/integration is a package, so
`scope="package"` ends with its last module): one Ray instance (with more
logical CPUs than cores, so Ray Data and Train don't starve each other) and one prepared sample."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="package")
def ray_cluster(s3_endpoint):
    """A real local Ray (separate worker processes) for every integration module; it stops when
    the last one ends, so the unit tests run without Ray as they would alone. It starts after the S3
    fixture has put the test credentials in os.environ, so the raylet and every worker inherit them."""
    import ray

    # Ray Train's controller looks at its workers every 2 s by default, so each tiny run waits up to
    # 2 s to be seen finished (about 30 runs here); 0.5 s saves most of that. Propagated by Ray Train.
    ours = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in os.environ
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(num_cpus=4, object_store_memory=300 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if ours:
        del os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]


@pytest.fixture(scope="package")
def prepared(ray_cluster, tmp_path_factory):
    """The tiny sample (120 images at 64 px) drawn and prepared by the real Ray Data stage: the
    train, sweep and PriorCLIP modules all train on it. Returns the prepared folder."""
    from rsray.config import load_config
    from rsray.data.prepare import prepare
    from rsray.data.synthetic import generate_sample

    root = tmp_path_factory.mktemp("sample")
    generate_sample(root, n_images=120, image_size=64, seed=0, progress=False)
    output = tmp_path_factory.mktemp("prepared") / "sample"
    prepare(load_config("presets/cpu-tiny", [f"data.root={root}", f"prepare.output={output}"]))
    return str(output)
