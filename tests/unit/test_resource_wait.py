"""Waiting for a cold GPU cluster to scale up (rsray.train.scaling.wait_for_resources), on a
simulated clock and cluster: the nodes Ray reports, the autoscaler requests, the progress lines."""

from __future__ import annotations

import logging

import pytest
import ray
import ray.autoscaler.sdk

import rsray.runtime
import rsray.train.scaling as scaling
from rsray.config import ConfigError, load_config

GPU_NODE = {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}
HEAD = {"Alive": True, "Resources": {"CPU": 4.0}}


class SlowCluster:
    """A head without GPUs whose GPU nodes join `boot_s` after the wait starts, one per `every_s`."""

    def __init__(self, monkeypatch, boot_s: float, every_s: float = 10.0):
        self.now, self.boot_s, self.every_s, self.requests = 0.0, boot_s, every_s, []
        monkeypatch.setattr(scaling.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(scaling.time, "sleep", self.sleep)
        monkeypatch.setattr(ray, "nodes", self.nodes)
        monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: self.requests.append(bundles))
        monkeypatch.setattr(rsray.runtime, "ensure_ray", lambda: None)

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def nodes(self) -> list[dict]:
        joined = 0 if self.now < self.boot_s else 1 + int((self.now - self.boot_s) // self.every_s)
        return [HEAD] + [GPU_NODE] * joined


def _cfg(wait_s: float):
    return load_config(
        "train/cpu-tiny",
        ["train.num_workers=2", "train.use_gpu=true", "train.cpus_per_worker=4", f"train.resource_wait_s={wait_s}"],
    )


def test_a_cold_cluster_is_waited_for_with_progress_and_the_request_withdrawn(monkeypatch, caplog):
    cluster = SlowCluster(monkeypatch, boot_s=200)  # a node boot plus the image pull: minutes
    with caplog.at_level(logging.INFO, logger="rsray"):
        scaling.wait_for_resources(_cfg(900), progress_every_s=60)
    assert cluster.now == pytest.approx(210)  # the second GPU node
    waiting = [r.getMessage() for r in caplog.records]
    assert waiting[0].startswith("the cluster can place 0 of 2 workers of {'CPU': 4.0, 'GPU': 1.0}: waiting up to 900")
    assert [m.split(":")[0] for m in waiting[1:]] == ["still waiting for nodes"] * 3  # at 60, 120, 180 s
    assert "0 of 2 workers placeable on 1 node(s), 840 s of 900 s left" in waiting[1]
    assert cluster.requests == [[{"CPU": 4.0, "GPU": 1.0}] * 2, []]  # asked once, withdrawn once


def test_a_wait_that_runs_out_is_one_line_and_withdraws_the_request(monkeypatch):
    cluster = SlowCluster(monkeypatch, boot_s=10_000)
    with pytest.raises(ConfigError, match=r"train.num_workers: 2 workers of .* waited 60 s \(train.resource_wait_s\)"):
        scaling.wait_for_resources(_cfg(60))
    assert cluster.requests[-1] == []


def test_a_ctrl_c_while_waiting_withdraws_the_request(monkeypatch):
    cluster = SlowCluster(monkeypatch, boot_s=10_000)

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(scaling.time, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scaling.wait_for_resources(_cfg(900))
    assert cluster.requests == [[{"CPU": 4.0, "GPU": 1.0}] * 2, []]
