"""Where and how many workers run: each worker's resources, whether the cluster can place them
(waiting for an autoscaler first), that every node sees the paths they read and write, and the
learning rate of an elastic run that has fewer workers than its maximum.

Ray is imported inside the functions that talk to the cluster; the rest is plain arithmetic that
unit tests check without Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from rsray.config import Config
from rsray.data.manifest import Manifest, train_pairs

log = logging.getLogger("rsray.train")


def elastic_lr_scale(tc, world_size: int) -> float:
    """The factor on the configured learning rate for `world_size` workers: `train.elastic_lr`
    linear scales it with the global batch (workers / max workers) in an elastic run; a fixed run
    and `constant` keep it."""
    if not tc.elastic or tc.elastic_lr == "constant":
        return 1.0
    return world_size / tc.max_workers


def rescale_learning_rate(optimizer, scheduler, factor: float) -> None:
    """Multiply the learning rate by `factor` from here on, whatever the schedule: the optimizer's
    current lr (what StepLR's chained form goes on from) and the scheduler's base lrs (what the
    LambdaLR schedules multiply). A resumed run passes new scale / the checkpoint's scale."""
    if factor == 1.0:
        return
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def steps_per_epoch(manifest: Manifest, tc) -> int:
    """Optimizer steps of one epoch on each worker: the train pairs split evenly over the workers,
    in full batches (Ray Train's shards are equal and read with drop_last); an elastic run plans for
    its max workers."""
    return max(1, train_pairs(manifest) // tc.max_workers // tc.batch_size)


def local_paths_unseen_by_other_nodes(cfg: Config, alive_nodes: int) -> list[tuple[str, str]]:
    """(key, path) of `train.data` and `train.storage_path` when they are local folders, the
    cluster has more than one node and `train.shared_fs_ok` does not say every node mounts them."""
    if alive_nodes < 2 or cfg.train.shared_fs_ok:
        return []
    paths = {"train.data": cfg.train.data, "train.storage_path": cfg.train.storage_path}
    return [(key, path) for key, path in paths.items() if "://" not in path]


def check_every_node_sees_the_paths(cfg: Config) -> None:
    """Refuse, before any worker starts, a local folder that only this machine sees: Ray Data
    reads the shards and Ray Train writes checkpoints from whichever node a task or worker is on."""
    import ray

    from rsray.runtime import ensure_ray

    ensure_ray()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    for key, path in local_paths_unseen_by_other_nodes(cfg, nodes):
        raise cfg.error(
            key,
            f"{path} is a local folder, but the Ray cluster has {nodes} nodes and the others cannot "
            "read or write it: use s3://..., or a path every node mounts and set train.shared_fs_ok=true",
        )


def worker_resources(tc) -> dict[str, float]:
    return {"CPU": tc.cpus_per_worker, **({"GPU": 1.0} if tc.use_gpu else {}), **tc.worker_resources}


def placeable_workers(nodes: list[dict], need: Mapping[str, float]) -> int:
    """How many workers needing `need` fit on the alive nodes of `ray.nodes()`, by their totals
    (what is busy now frees up: Ray Train queues for it; what no node has never comes)."""
    return sum(
        min(int(node.get("Resources", {}).get(key, 0.0) // amount) for key, amount in need.items())
        for node in nodes
        if node.get("Alive")
    )


def wait_for_resources(cfg: Config, progress_every_s: float = 30.0) -> None:
    """Refuse, in one line, workers the cluster cannot place, after `train.resource_wait_s` for an
    autoscaler to add nodes (GPU nodes scaling from zero take minutes: cluster/ sets 900 s); say
    that it waits, and every `progress_every_s` how far it got. While it waits it asks the
    autoscaler for the workers' bundles (`ray.autoscaler.sdk.request_resources`: no Ray Train
    placement group exists yet to create that demand), and withdraws the request however the wait
    ends (Ctrl-C included): a request left behind would keep the nodes up."""
    import ray
    from ray.autoscaler.sdk import request_resources

    from rsray.runtime import ensure_ray

    ensure_ray()
    tc, need = cfg.train, worker_resources(cfg.train)
    started = time.monotonic()
    deadline, said, next_progress = started + tc.resource_wait_s, False, started + progress_every_s
    try:
        while True:
            nodes = [node for node in ray.nodes() if node.get("Alive")]
            fits = placeable_workers(nodes, need)
            if fits >= tc.min_workers:
                return
            now = time.monotonic()
            if now >= deadline:
                raise cfg.error(
                    "train.num_workers",
                    f"{tc.min_workers} workers of {need} cannot be placed: the cluster's {len(nodes)} node(s) hold "
                    f"{fits} of them at most; waited {tc.resource_wait_s:g} s (train.resource_wait_s) for more "
                    "nodes. Lower train.num_workers or train.cpus_per_worker, or add nodes",
                )
            if not said:
                request_resources(bundles=[need] * tc.min_workers)  # what an autoscaler scales up for
                log.info(
                    "the cluster can place %d of %d workers of %s: waiting up to %g s for more nodes",
                    fits,
                    tc.min_workers,
                    need,
                    tc.resource_wait_s,
                )
                said = True
            elif now >= next_progress:
                log.info(
                    "still waiting for nodes: %d of %d workers placeable on %d node(s), %.0f s of %g s left",
                    fits,
                    tc.min_workers,
                    len(nodes),
                    deadline - now,
                    tc.resource_wait_s,
                )
                next_progress = now + progress_every_s
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
    finally:
        if said:
            request_resources(bundles=[])  # Ray Train's own placement group asks from here on
