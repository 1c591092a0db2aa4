"""The Ray Train run builder's plain helpers (rsray.train.run), without starting Ray."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from rsray.config import ConfigError, load_config
from rsray.data.stream import cache_train_split
from rsray.train.errors import error_summary
from rsray.train.plan import absolute_paths, default_run_name
from rsray.train.records import epoch_line
from rsray.train.rng import rng_state, seed_everything, set_rng_state
from rsray.train.scaling import local_paths_unseen_by_other_nodes, steps_per_epoch
from rsray.train.worker import with_sync_batchnorm


@pytest.mark.parametrize(
    "setting, pair_bytes, store, expected",
    [
        ("auto", 100, 1000, True),
        ("auto", 500, 1000, True),  # exactly half still fits
        ("auto", 501, 1000, False),
        ("auto", 1, 0, False),  # no object store reported: stream
        ("always", 10**12, 1000, True),
        ("never", 1, 10**12, False),
    ],
)
def test_the_train_split_is_cached_when_it_fits_or_when_told(setting, pair_bytes, store, expected):
    assert cache_train_split(setting, pair_bytes, store) is expected


def test_a_bad_cache_setting_names_the_key():
    with pytest.raises(ConfigError, match="train.cache_train_split"):
        load_config("train/cpu-tiny", ["train.cache_train_split=sometimes"])


def test_a_placement_ray_does_not_have_names_the_key():
    with pytest.raises(ConfigError, match=r"train.placement: must be one of pack, spread, strict_pack, strict_spread"):
        load_config("train/cpu-tiny", ["train.placement=scatter"])


@pytest.mark.parametrize(
    "nodes, overrides, refused",
    [
        (1, [], []),  # one node: a local folder is what it sees
        (2, [], ["train.data", "train.storage_path"]),
        (3, ["train.storage_path=s3://bucket/runs"], ["train.data"]),
        (2, ["train.data=s3://bucket/data", "train.storage_path=s3://bucket/runs"], []),
        (2, ["train.shared_fs_ok=true"], []),  # the user says every node mounts them
    ],
)
def test_local_folders_are_refused_on_a_cluster_of_several_nodes(nodes, overrides, refused):
    cfg = load_config("train/cpu-tiny", overrides)
    assert [key for key, _ in local_paths_unseen_by_other_nodes(cfg, nodes)] == refused


def test_rng_states_round_trip_through_a_safe_checkpoint(tmp_path):
    seed_everything(3, 1)
    saved = rng_state()
    path = tmp_path / "rng.pt"
    torch.save(saved, path)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    seed_everything(99)
    set_rng_state(torch.load(path, weights_only=True))
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_seeds_differ_per_part():
    seed_everything(0, 0)
    first = torch.rand(2)
    seed_everything(0, 1)
    assert not torch.equal(first, torch.rand(2))


def test_steps_per_epoch_split_the_pairs_over_workers_in_full_batches():
    cfg = load_config("train/cpu-tiny", ["train.batch_size=16", "train.num_workers=2"])
    manifest = {"splits": {"train": {"captions": 100}}}
    assert steps_per_epoch(manifest, cfg.train) == 3  # 50 pairs per worker -> 3 full batches of 16
    manifest["splits"]["train"]["captions"] = 5
    assert steps_per_epoch(manifest, cfg.train) == 1  # never 0: a schedule needs a positive total


def test_relative_local_paths_become_absolute_for_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prepared").mkdir()
    (tmp_path / "glove.txt").write_text("")
    cfg = load_config("train/cpu-tiny", ["train.data=prepared", "tracking.uri=sqlite:///runs.db"])
    cfg.model["glove_path"] = "glove.txt"
    cfg.model["clip"] = {"checkpoint": "prepared"}
    cfg.model["missing_path"] = "not-here"
    out = absolute_paths(cfg)
    assert out.train.data == str(tmp_path / "prepared")
    assert out.tracking.uri == "sqlite:///" + str(tmp_path / "runs.db")
    assert out.model["glove_path"] == str(tmp_path / "glove.txt")
    assert out.model["clip"]["checkpoint"] == str(tmp_path / "prepared")
    assert out.model["missing_path"] == "not-here"  # not a file here: left for the model to report
    assert os.path.isabs(out.train.data)


def test_default_run_names_say_model_and_dataset():
    cfg = load_config("train/cpu-tiny")
    name = default_run_name(cfg)
    assert name.startswith(f"{cfg.model['name']}-{cfg.data.name}-")


def test_a_worker_traceback_is_summarised_in_its_last_line():
    assert error_summary(RuntimeError("Traceback:\n  File x\nValueError: bad batch\n\n")) == "ValueError: bad batch"
    assert error_summary(RuntimeError("")) == "RuntimeError"


# Ray 2.60's memory monitor report as Ray Train's WorkerGroupError carried it to the driver
# (a CMPAGL paper-size run on 2 workers, trimmed); its last line only points at Ray's docs
RAY_OOM_REPORT = """ray.train.WorkerGroupError: Training failed due to worker errors:
[Rank 1 Error Snippet]:
A worker health check failed.
7 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 192.0.2.2, \
ID: 1977553b2e9bcc6d7b5e5361482890a8d1e41566563b19312c48bffa) was 22.92GB used / 23.54GB limit (0.973812)
OOM kill reason: Memory usage 24249257984B exceeded threshold of 24012374016B (95.0% of 25276182528B limit)
To see more information about memory usage on this node, use `ray logs raylet.out -ip 192.0.2.2`
Top 10 memory users: PID\tMEM(GB)\tCOMMAND
28597\t7.60\tray::RayTrainWorker
26584\t6.23\t/work/main/.venv/bin/python -m moto.server -H 127.0.0.1 -p 40833
28567\t4.14\tray::RayTrainWorker
28243\t0.55\t/work/main/.venv/bin/python -m rsray.pipelines.cli train model/cmpagl train.data=s3://x
Refer to the documentation on how to address the out of memory issue: https://docs.ray.io/en/latest/ray-\
observability/user-guides/debug-apps/debug-memory.html. Consider provisioning more memory on this node.
"""


def test_rays_out_of_memory_report_is_one_line_with_the_node_and_its_largest_processes():
    line = error_summary(RuntimeError(RAY_OOM_REPORT))
    assert line == (
        "out of memory: Ray stopped the run's workers with node 192.0.2.2 at 22.92GB used of 23.54GB; "
        "largest: ray::RayTrainWorker 7.6 GB, python -m moto.server 6.2 GB, ray::RayTrainWorker 4.1 GB; "
        "use fewer workers per node (train.num_workers, train.cpus_per_worker), a smaller "
        "train.batch_size, or nodes with more memory"
    )


def test_an_epoch_line_names_losses_speed_data_wait_and_validation():
    metrics = {
        "epoch": 2,
        "lr": 2e-4,
        "pairs_per_s": 151.4,
        "train_seconds": 10.0,
        "data_wait_seconds": 2.5,
        "train/loss": 0.41234,
        "train/triplet": 0.3,
        "val/mR": 23.456,
        "val/i2t_R1": 8.0,
        "val/t2i_R1": 7.25,
    }
    line = epoch_line(metrics, epochs=5)
    assert line.startswith("epoch 2 of 0..4: loss 0.4123, triplet 0.3000; lr 2.00e-04; 151 pairs/s")
    assert "(25% of it waiting for data)" in line
    assert "val mR 23.46 (i2t R@1 8.0, t2i R@1 7.2)" in line
    assert epoch_line({**metrics, "epoch": 0}).startswith("epoch 0: ")


def test_sync_batchnorm_keeps_weights_modes_and_checkpoint_keys():
    """SWAN's release converts BatchNorm to SyncBatchNorm under DDP: the converted model has the
    same state dict, computes the same numbers in one process, and its frozen backbone stays in
    eval mode through model.train()."""
    from rsray.models import build_model

    cfg = load_config("model/swan-tiny", ["model.freeze_backbone=true", "model.allow_random_frozen_backbone=true"])
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=30).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.encode_images({"images": images})
    converted = with_sync_batchnorm(model)
    norms = [m for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert converted.state_dict().keys() == before.keys()
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        torch.testing.assert_close(converted.eval().encode_images({"images": images}), expected)
    converted.train()
    assert all(not m.training for m in converted.visual.backbone.body.modules())  # frozen: eval mode kept
    with pytest.raises(ConfigError, match="train.sync_batchnorm: needs use_gpu"):
        load_config("model/swan-tiny", ["train.sync_batchnorm=true"])


@pytest.mark.parametrize(
    "setting, storage_path, copied",
    [
        ("auto", "/data/runs", True),  # a local folder may not outlive its machine
        ("auto", "s3://bucket/runs", False),  # already durable and shared: the tag names it
        ("always", "s3://bucket/runs", True),
        ("never", "/data/runs", False),
    ],
)
def test_the_best_checkpoint_is_copied_into_mlflow_only_where_asked(setting, storage_path, copied):
    from rsray.train.records import copies_checkpoint

    cfg = load_config("train/cpu-tiny", [f"tracking.log_checkpoint={setting}", f"train.storage_path={storage_path}"])
    assert copies_checkpoint(cfg) is copied


def test_tracking_log_checkpoint_is_one_of_its_settings():
    expected = "tracking.log_checkpoint: must be one of auto, always, never, got 'sometimes'"
    with pytest.raises(ConfigError, match=expected):
        load_config("train/cpu-tiny", ["tracking.log_checkpoint=sometimes"])


def test_only_data_with_test_images_has_its_best_checkpoint_scored_on_test():
    from rsray.train.records import has_test_split

    assert has_test_split({"splits": {"test": {"images": 3}}})
    assert not has_test_split({"splits": {"train": {"images": 9}, "test": {"images": 0}}})
    assert not has_test_split({"splits": {}})


def test_the_trainer_leaves_pythons_sigint_handler_in_place():
    """Ray Train would install its own SIGINT handler around fit() on the main thread (one Ctrl-C
    then ended `rsray train` with exit 1, the run FAILED); rsray's trainer keeps Python's, so a
    Ctrl-C raises KeyboardInterrupt in fit()."""
    import signal

    from ray.train.torch import TorchTrainer

    from rsray.train.run import interruptible_trainer_class

    trainer_class = interruptible_trainer_class()
    assert issubclass(trainer_class, TorchTrainer)
    before = signal.getsignal(signal.SIGINT)
    try:
        trainer_class._register_sigint_handler(object.__new__(trainer_class), controller=None)
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, before)


def test_the_epoch_logger_takes_the_commands_mlflow_http_settings_to_the_controller(monkeypatch):
    """The controller logs the epochs with the cluster's environment: a user's
    MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT for this command travel in the callback (as Ray
    pickles it) and are set there before the first request; nothing else of the environment does."""
    import pickle

    from rsray.train.records import EpochLogger

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-carried")
    logger = pickle.loads(pickle.dumps(EpochLogger(None, "run")))
    assert logger.http_settings == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "7"}
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")  # the controller's environment
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    logger.apply_http_settings()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
