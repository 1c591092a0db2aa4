"""Ray Train: one model trained data-parallel (DDP) on `train.num_workers` workers.

    result = train(load_config("train/cpu-tiny"))   # ensures Ray, fits, returns ray.train.Result

How data reaches the workers
----------------------------
The driver reads the prepared output's manifest and builds one Ray Dataset over the train split's
Parquet files (local folder or s3://), exploded to (image, caption) pair rows by
`rsray.data.pairs.explode_pairs` in Ray Data tasks. When the pairs fit, they are made once and
held in Ray's object store for the whole run (`train.cache_train_split`); otherwise every epoch
reads and explodes the shards again. `DataConfig(datasets_to_split=["train"])`
hands each worker an equal streaming shard; the worker shuffles it locally (seeded by seed, epoch,
rank) and decodes + augments each batch with `batch_from_arrow` (the same function the local
DataLoader path uses), in the worker or in `train.decode_workers` forked processes
(`rsray.data.decode`). The validation split is not a Ray Dataset: rank 0 reads it whole with
`read_split` and scores the whole gallery with `rsray.eval.split.evaluate`; other ranks skip it.

Every epoch every worker calls `ray.train.report`; rank 0 attaches a checkpoint folder holding
`state.pt` (model, optimizer, scheduler, epoch, RNG states, metric history: plain tensors and
dicts, loadable with `torch.load(..., weights_only=True)`) and `config.yaml` (the resolved
config, loadable with `rsray.config.load_config`). A restarted worker group resumes from
`ray.train.get_checkpoint()` at the next epoch. The folder's layout is `rsray.checkpoint`'s.

Models, the loader and MLflow are imported inside the functions that use them: Ray Data tasks
and the Train controller import this module to unpickle its functions, and start without them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.train import UserCallback
from torch import nn

from rsray import storage
from rsray.checkpoint import CONFIG_FILE, STATE_FILE, load_checkpoint_state
from rsray.config import Config, config_from_dict

log = logging.getLogger("rsray.train")

SHUFFLE_BUFFER_BATCHES = 8  # local shuffle buffer per worker, in batches (at least 1000 pairs)


class TrainingFailed(RuntimeError):
    """The Ray Train run ended in error (after its allowed restarts); the message is one line."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training run; the message says what was kept."""


# ----------------------------------------------------------------------------- config in workers


def _absolute_paths(cfg: Config) -> Config:
    """Local paths a worker reads, made absolute (workers need not share the driver's cwd)."""

    def absolute(value):
        if (
            isinstance(value, str)
            and value
            and not storage.is_s3(value)
            and not os.path.isabs(value)
            and os.path.exists(value)
        ):
            return os.path.abspath(value)
        return value

    uri = cfg.tracking.uri  # sqlite:///relative.db is relative to the cwd: pin it to the driver's
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        cfg.tracking.uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    cfg.train.data = absolute(cfg.train.data)
    cfg.data.tokenizer = absolute(cfg.data.tokenizer)

    def absolute_model_paths(section: dict) -> None:  # nested too (priorclip_open's clip: {checkpoint})
        for key, value in list(section.items()):
            if isinstance(value, dict):
                absolute_model_paths(value)
            elif key.endswith(("_path", "_checkpoint")) or key in ("checkpoint", "path"):
                section[key] = absolute(value)

    absolute_model_paths(cfg.model)
    return cfg


# ----------------------------------------------------------------------------- per worker


class _LossForward(nn.Module):
    """`forward(batch) = model.loss(batch)`, so DistributedDataParallel sees the loss computation
    (DDP synchronises gradients only for calls through its forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


class _Distributed(nn.Module):
    """What `rsray.train.loop.train_epoch` needs (`loss`, `train`, `parameters`) on a DDP model."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped

    def loss(self, batch):
        return self.wrapped(batch)


def _seed_everything(*parts: int) -> None:
    seed = int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """RNG states as plain tensors, ints and lists (what `weights_only=True` loads)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _pair_batches(shard, batch_size: int, decoder, seed: int, epoch: int, rank: int):
    """Training batches of one epoch from this worker's shard of pair rows, decoded by `decoder`
    (a `rsray.data.decode.BatchDecoder`)."""
    rng = np.random.default_rng([seed, epoch, rank])  # each batch's augmentation seed is drawn from it
    shuffle_seed = int(np.random.SeedSequence([seed, epoch, rank, 1]).generate_state(1)[0])
    pairs = shard.iter_batches(
        batch_size=batch_size,
        batch_format="pyarrow",
        drop_last=True,
        local_shuffle_buffer_size=max(1000, SHUFFLE_BUFFER_BATCHES * batch_size),
        local_shuffle_seed=shuffle_seed,
    )
    return decoder.batches(pairs, rng)


def _mean_across_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist(), strict=True))


def _sum_across_workers(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.tolist()


def epoch_line(metrics: dict[str, float], epochs: int | None = None) -> str:
    """One readable line for an epoch's metrics (rank 0 logs it live; `rsray train` prints all at the end)."""
    terms = ", ".join(f"{k[len('train/') :]} {v:.4f}" for k, v in metrics.items() if k.startswith("train/"))
    waiting = metrics.get("data_wait_seconds", 0.0) / max(metrics.get("train_seconds", 0.0), 1e-9)
    number = f"{int(metrics['epoch'])}" + (f" of 0..{epochs - 1}" if epochs else "")  # 0-based, as MLflow's step
    return (
        f"epoch {number}: {terms}; lr {metrics['lr']:.2e}; {metrics['pairs_per_s']:.0f} pairs/s "
        f"({waiting:.0%} of it waiting for data); "
        f"val mR {metrics.get('val/mR', float('nan')):.2f} (i2t R@1 {metrics.get('val/i2t_R1', float('nan')):.1f}, "
        f"t2i R@1 {metrics.get('val/t2i_R1', float('nan')):.1f})"
    )


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, float]]:
    """The Ray Train worker function. `config`: {"config": Config.to_dict(), "mlflow_run_id": id or None}.

    Returns (on every rank; Ray keeps rank 0's) the per-epoch metrics of the whole run."""
    import ray.train
    import ray.train.torch

    from rsray.data.decode import BatchDecoder
    from rsray.data.loader import read_split, vocab_size
    from rsray.data.prepare import read_manifest
    from rsray.eval.split import evaluate
    from rsray.models import build_model, model_config
    from rsray.optim import make_optimizer, steps_per_batch
    from rsray.runtime import quiet_ray_progress_logs
    from rsray.train.loop import train_epoch

    quiet_ray_progress_logs()
    cfg = config_from_dict(config["config"])
    tc = cfg.train
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    if isinstance(device, list):
        device = device[0]

    manifest = read_manifest(tc.data, cfg.prepare.s3_endpoint)
    _seed_everything(tc.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg, vocab_size=vocab_size(manifest), vocab=manifest["vocab"]["words"])
    model_cfg = model_config(cfg)

    start_epoch, history, saved = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        saved = load_checkpoint_state(checkpoint)
        model.load_state_dict(saved["model"])
        start_epoch, history = int(saved["epoch"]) + 1, list(saved["history"])

    if tc.sync_batchnorm and context.get_world_size() > 1:
        model = with_sync_batchnorm(model)
    ddp_kwargs = dict(getattr(model, "ddp_kwargs", {}))  # e.g. CMPAGL: its queue is never re-broadcast
    distributed = _Distributed(
        ray.train.torch.prepare_model(_LossForward(model), parallel_strategy_kwargs=ddp_kwargs or None)
    )
    optimizer, scheduler = make_optimizer(model, model_cfg, total_steps=tc.epochs * _steps_per_epoch(manifest, tc))
    per_batch_schedule = steps_per_batch(model_cfg)
    lr_scale = elastic_lr_scale(tc, context.get_world_size())
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    rescale_learning_rate(optimizer, scheduler, lr_scale / (saved or {}).get("lr_scale", 1.0))
    if saved is not None and rank == 0:
        _set_rng_state(saved["rng"])  # the saved states are rank 0's
    else:
        _seed_everything(tc.seed, rank, start_epoch)

    val = read_split(tc.data, "val", cfg.prepare.s3_endpoint) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    placed = {"workers": context.get_world_size(), "worker_nodes": _nodes_of_workers(context.get_world_size())}
    amp_dtype = _amp_dtype(tc.amp, device)

    with BatchDecoder(model_cfg.augment, tc.decode_workers) as decoder:  # forked once, reused every epoch
        for epoch in range(start_epoch, tc.epochs):
            lr = float(scheduler.get_last_lr()[0])
            batches = _pair_batches(shard, tc.batch_size, decoder, tc.seed, epoch, rank)
            stats = train_epoch(
                distributed,
                batches,
                optimizer,
                device=device,
                grad_clip=tc.grad_clip or None,
                amp_dtype=amp_dtype,
                scheduler=scheduler if per_batch_schedule else None,
            )
            if not per_batch_schedule:
                scheduler.step()
            losses = _mean_across_workers(stats.losses, device)
            (pairs,) = _sum_across_workers([float(stats.pairs)], device)
            seconds, data_seconds = _sum_across_workers([stats.seconds, stats.data_seconds], device, op="max")
            metrics: dict[str, float] = {
                "epoch": epoch,
                "lr": lr,
                "pairs_per_s": pairs / max(seconds, 1e-9),
                "train_seconds": seconds,
                "data_wait_seconds": data_seconds,
                "lr_scale": lr_scale,
                **placed,
            }
            metrics.update({f"train/{'loss' if k == 'total' else k}": v for k, v in losses.items()})
            if rank != 0:
                ray.train.report(metrics)
                continue
            started = time.perf_counter()
            scores = evaluate(model, val, model_cfg.augment, device=device, image_batch=tc.eval_batch_size)
            metrics.update({f"val/{k}": v for k, v in scores.items()})
            metrics["val_seconds"] = time.perf_counter() - started
            history.append(dict(metrics))
            log.info(epoch_line(metrics, tc.epochs))  # not print(): Ray Train echoes a worker print to logging too
            with tempfile.TemporaryDirectory(prefix="rsray-ckpt-") as folder:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "rng": _rng_state(),
                        "lr_scale": lr_scale,  # in the optimizer's and scheduler's state
                        "metrics": dict(metrics),
                        "history": history,
                        # the MLflow run this epoch was logged to: `rsray evaluate` adds its numbers there
                        "mlflow_run_id": config.get("mlflow_run_id"),
                    },
                    Path(folder) / STATE_FILE,
                )
                config_from_dict(config["config"]).save(Path(folder) / CONFIG_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    return history


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


def _nodes_of_workers(world_size: int) -> int:
    """How many Ray nodes the worker group runs on, from each worker's own node id (gathered)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world_size < 2 or not torch.distributed.is_initialized():
        return 1
    nodes: list[str | None] = [None] * world_size
    torch.distributed.all_gather_object(nodes, node)
    return len(set(nodes))


def _steps_per_epoch(manifest: dict, tc) -> int:
    """Optimizer steps of one epoch on each worker: the train pairs split evenly over the workers,
    in full batches (Ray Train's shards are equal and read with drop_last); an elastic run plans for
    its max workers."""
    return max(1, manifest["splits"]["train"]["captions"] // tc.max_workers // tc.batch_size)


class EpochLogger(UserCallback):
    """Logs each epoch's metrics (rank 0's, which include validation) to the run's MLflow run.

    It runs in the Ray Train controller, after Ray has registered the epoch's checkpoint. That
    makes the MLflow history agree with the checkpoints whatever fails: a worker killed after its
    report but before Ray registered the checkpoint retrains that epoch from the previous
    checkpoint, and the epoch is logged once, when its checkpoint counts (logging from the worker
    would log it twice, measured in the fault test). The controller survives worker-group restarts,
    so nothing is logged by a worker and nothing needs filling in afterwards."""

    def __init__(self, tracking_cfg: Any, run_id: str):
        self.tracking_cfg, self.run_id = tracking_cfg, run_id
        self._tracker = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        from rsray.tracking import Tracker

        if checkpoint is None or not metrics:
            return
        if self._tracker is None:
            self._tracker = Tracker.attach(self.tracking_cfg, self.run_id)
        self._tracker.log_metrics(metrics[0], step=int(metrics[0]["epoch"]))


# ----------------------------------------------------------------------------- driver


def default_run_name(cfg: Config) -> str:
    return f"{cfg.model.get('name', 'model')}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train_dataset(cfg: Config):
    """The train split's shard files as a Ray Dataset of (image, caption) pair rows."""
    import ray
    import ray.data

    from rsray.data.pairs import explode_pairs, image_numbers, scene_index  # no torch: fast task start
    from rsray.data.prepare import read_manifest

    manifest = read_manifest(cfg.train.data, cfg.prepare.s3_endpoint)
    files = manifest["splits"].get("train", {}).get("files")
    if not files:
        raise cfg.error("train.data", f"{cfg.train.data} has no train split to train on")
    pairs = manifest["splits"]["train"]["captions"]
    if pairs < cfg.train.batch_size * cfg.train.max_workers:
        raise cfg.error(
            "train.batch_size",
            f"{pairs} training pairs give no full batch of {cfg.train.batch_size} "
            f"on each of {cfg.train.max_workers} workers",
        )
    root = storage.resolve(cfg.train.data, cfg.prepare.s3_endpoint)
    columns = ["image_id", "scene", "caption_tokens", "image"]
    if manifest.get("tokenizer"):
        columns.append("caption_input_ids")
    # Ray Data's Parquet reader V2 (the default in Ray 2.60) starts 32 footer-reader actors for every
    # read: new processes that cost 3 s of each run on an idle 2-core machine and 10 s inside a sweep
    # trial. The files to read are listed in the manifest, so V1 (no actors) loses nothing: 0.3-1.6 s
    # (measured). Our choice, scoped to this read. One block per shard file: V1 otherwise sizes its
    # blocks by the CPUs free at the moment, and the shuffled pair order (so a seed's run) would change.
    context = ray.data.DataContext.get_current()
    use_v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        dataset = ray.data.read_parquet(
            [root.join(*f["path"].split("/")).path for f in files], filesystem=root.fs, override_num_blocks=len(files)
        ).select_columns(columns)
    finally:
        context.use_datasource_v2 = use_v2
    explode = {
        "fn": explode_pairs,
        "batch_format": "pyarrow",
        "fn_kwargs": {"scenes": scene_index(manifest), "image_index": image_numbers(manifest, "train")},
    }
    shuffle_blocks = {"seed": ray.data.RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True)}
    # Pair rows repeat their image's bytes once per caption: the cache holds about that many times the shards.
    pair_bytes = sum(f["bytes"] for f in files) * pairs / max(1, manifest["splits"]["train"].get("images", 1))
    if cache_train_split(
        cfg.train.cache_train_split, pair_bytes, ray.cluster_resources().get("object_store_memory", 0)
    ):
        # read and explode once; every epoch replays the pair blocks in a new order, with no task to start
        train_pairs = dataset.map_batches(**explode).materialize().randomize_block_order(**shuffle_blocks)
    else:
        train_pairs = dataset.randomize_block_order(**shuffle_blocks).map_batches(**explode)
    train_pairs.context.enable_progress_bars = False  # runs every epoch; rank 0 logs one line per epoch instead
    return train_pairs


def cache_train_split(setting: str, pair_bytes: float, object_store_bytes: float) -> bool:
    """Whether to hold the train split's pair rows in Ray's object store (`train.cache_train_split`):
    always, never, or (auto) when they fill at most half of the cluster's object store."""
    if setting != "auto":
        return setting == "always"
    return pair_bytes <= 0.5 * object_store_bytes


def preflight(cfg: Config) -> Config:
    """Everything checked before an MLflow run or any worker starts, each refusal one line: the
    model section, that every node can reach the data and storage paths, the prepared data against
    its manifest (`rsray.data.verify`), and, when the run name has checkpoints, that resuming would
    not ignore a changed setting (`run_folder`). Returns
    the resolved copy the workers get: local paths absolute, model keys that follow from the data
    filled in, a run name."""
    from rsray.data.verify import verify_prepared
    from rsray.models import model_config
    from rsray.train.run_folder import check_resume, resume_point

    model_config(cfg)
    _check_every_node_sees_the_paths(cfg)
    verify_prepared(cfg.train.data, cfg.prepare.s3_endpoint, tuple(cfg.train.verify_checksums))
    stopwords = _check_caption_rule(cfg)
    cfg = _absolute_paths(copy.deepcopy(cfg))
    cfg.data.stopwords = stopwords  # the checkpoint's config says how its captions were tokenized
    _fill_model_from_data(cfg)
    if not cfg.train.run_name:
        cfg.train.run_name = default_run_name(cfg)
    point = resume_point(cfg)
    if point is not None:
        check_resume(cfg, point)
    _wait_for_resources(cfg)
    return cfg


def local_paths_unseen_by_other_nodes(cfg: Config, alive_nodes: int) -> list[tuple[str, str]]:
    """(key, path) of `train.data` and `train.storage_path` when they are local folders, the
    cluster has more than one node and `train.shared_fs_ok` does not say every node mounts them."""
    if alive_nodes < 2 or cfg.train.shared_fs_ok:
        return []
    paths = {"train.data": cfg.train.data, "train.storage_path": cfg.train.storage_path}
    return [(key, path) for key, path in paths.items() if "://" not in path]


def _check_every_node_sees_the_paths(cfg: Config) -> None:
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


def with_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every BatchNorm a SyncBatchNorm (`train.sync_batchnorm`): same parameters,
    buffers, state-dict keys and train/eval modes, so checkpoints load either way."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _check_caption_rule(cfg: Config) -> str:
    """The stop-word rule `train.data` was prepared with. A config that names `data.stopwords` (a
    release preset does) must train on data prepared that way: the shards hold the token ids, so
    a mismatch would silently train the other recipe."""
    from rsray.data.prepare import read_manifest

    prepared = read_manifest(cfg.train.data, cfg.prepare.s3_endpoint)["vocab"].get("stopwords", "drop")
    if cfg.source_of("data.stopwords") != "defaults" and prepared != cfg.data.stopwords:
        raise cfg.error(
            "data.stopwords",
            f"is {cfg.data.stopwords}, but {cfg.train.data} was prepared with stopwords {prepared}: "
            f"prepare it again with data.stopwords={cfg.data.stopwords}",
        )
    return prepared


WORKER_GROUP_START_RETRIES = 2  # Ray Train's default retries a worker group that cannot start forever


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


def _wait_for_resources(cfg: Config) -> None:
    """Refuse, in one line, workers the cluster cannot place, after `train.resource_wait_s` for an
    autoscaler to add nodes; say once that it waits. While it waits it asks the autoscaler for the
    workers' bundles (`ray.autoscaler.sdk.request_resources`: no Ray Train placement group exists
    yet to create that demand), and withdraws the request after."""
    import ray
    from ray.autoscaler.sdk import request_resources

    from rsray.runtime import ensure_ray

    ensure_ray()
    tc, need = cfg.train, worker_resources(cfg.train)
    deadline, said = time.monotonic() + tc.resource_wait_s, False
    while True:
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        fits = placeable_workers(nodes, need)
        if fits >= tc.min_workers:
            if said:
                request_resources(bundles=[])  # Ray Train's own placement group asks from here on
            return
        if time.monotonic() >= deadline:
            if said:
                request_resources(bundles=[])
            raise cfg.error(
                "train.num_workers",
                f"{tc.min_workers} workers of {need} cannot be placed: the cluster's {len(nodes)} node(s) hold "
                f"{fits} of them at most; waited {tc.resource_wait_s:g} s (train.resource_wait_s) for more nodes. "
                "Lower train.num_workers or train.cpus_per_worker, or add nodes",
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
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def build_trainer(cfg: Config, mlflow_run_id: str | None = None, callbacks: Sequence[Any] = (), checked: bool = False):
    """The TorchTrainer for `cfg` (does not start training). `callbacks`: Ray Train UserCallbacks,
    e.g. the one a sweep trial uses to pass each epoch's metrics on to Ray Tune. `checked`: `cfg`
    is already `preflight`'s result."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rsray.models import model_config
    from rsray.train.loop import selection_metric

    cfg = cfg if checked else preflight(cfg)
    tc = cfg.train
    store = storage.resolve(tc.storage_path)
    run_config = RunConfig(
        name=tc.run_name,
        storage_path=store.path,
        storage_filesystem=store.fs if storage.is_s3(tc.storage_path) else None,
        failure_config=FailureConfig(max_failures=tc.max_failures, controller_failure_limit=WORKER_GROUP_START_RETRIES),
        checkpoint_config=CheckpointConfig(
            num_to_keep=tc.keep_checkpoints,
            checkpoint_score_attribute=selection_metric(model_config(cfg)),
            checkpoint_score_order="max",
        ),
        callbacks=([EpochLogger(cfg.tracking, mlflow_run_id)] if mlflow_run_id else []) + list(callbacks) or None,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "mlflow_run_id": mlflow_run_id},
        scaling_config=ScalingConfig(
            num_workers=tuple(tc.num_workers) if tc.elastic else tc.num_workers,
            elastic_resize_monitor_interval_s=tc.elastic_resize_s,
            use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker, **tc.worker_resources},
            placement_strategy=tc.placement.upper(),
        ),
        run_config=run_config,
        datasets={"train": train_dataset(cfg)},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def _fill_model_from_data(cfg: Config) -> None:
    """Model keys that follow from the prepared data, filled in before any worker starts so that
    every worker and the checkpoint's config.yaml agree. A model config may define
    `check_data(manifest)` (yields (key, problem), like `check`) and `from_data(manifest)` (returns
    {key: value}); the scene prior sizes its classifier to the manifest's scenes this way."""
    from rsray.data.prepare import read_manifest
    from rsray.models import model_config

    typed = model_config(cfg)
    if not hasattr(typed, "from_data"):
        return
    manifest = read_manifest(cfg.train.data, cfg.prepare.s3_endpoint)
    for key, problem in getattr(typed, "check_data", lambda _: ())(manifest):
        raise cfg.error(f"model.{key}", problem)
    cfg.model.update(typed.from_data(manifest))
    model_config(cfg)


TRAIN_FIRST = "train"  # `model.<stage checkpoint key>: train` trains that earlier stage first


def _train_earlier_stages(cfg: Config) -> Config:
    """Train the stages a model starts from when its config says so, and point it at their results.

    A model config may declare `earlier_stages = {checkpoint_key: stage_key}` (PriorCLIP:
    {"instruction_checkpoint": "instruction_stage"}). When `model.<checkpoint_key>` is "train",
    the model section of the config file named by `model.<stage_key>` (e.g. model/scene_prior) is
    trained first with this run's data, train and tracking sections, as its own run
    `<run_name>-<stage model>` (Ray Train and MLflow alike), and its best checkpoint by its own
    selection metric becomes `model.<checkpoint_key>`. Returns the updated copy of `cfg`."""
    from rsray.config import load_config
    from rsray.models import model_config
    from rsray.train.loop import selection_metric

    cfg = copy.deepcopy(cfg)
    for checkpoint_key, stage_key in getattr(model_config(cfg), "earlier_stages", {}).items():
        if cfg.model.get(checkpoint_key) != TRAIN_FIRST:
            continue
        stage_file = load_config(cfg.model[stage_key])
        stage = copy.deepcopy(cfg)
        stage.model = stage_file.model
        stage.origins.update({k: v for k, v in stage_file.origins.items() if k.startswith("model.")})
        stage.train.run_name = f"{cfg.train.run_name}-{stage.model.get('name')}" if cfg.train.run_name else ""
        result = train(stage)
        best = result.get_best_checkpoint(selection_metric(model_config(stage)), "max")
        if best is None:
            raise TrainingFailed(f"stage {stage.model.get('name')} reported no checkpoint for model.{checkpoint_key}")
        cfg.model[checkpoint_key] = f"s3://{best.path}" if storage.is_s3(stage.train.storage_path) else best.path
        cfg.origins[f"model.{checkpoint_key}"] = f"stage {stage.train.run_name or stage.model.get('name')}"
    return cfg


def train(cfg: Config, tracker=None, callbacks: Sequence[Any] = (), score_test: bool = True):
    """Start or join Ray, train, record the run in MLflow (`tracking.enabled`), and return the
    `ray.train.Result` (raises TrainingFailed). The driver owns the MLflow run; each epoch is logged
    into it by `EpochLogger` in the Ray Train controller, so a worker-group restart adds no second run. The returned
    Result also carries `mlflow_run_id` and `mlflow_link` (the runs table in the MLflow UI).
    A sweep trial passes its own `tracker` (its child run, which this function ends) and
    `callbacks` for `build_trainer`, and `score_test=False`: a sweep scores only its best
    checkpoint on the test split, so no trial's test numbers are there to select by."""
    from ray.train import TrainingFailedError

    from rsray.runtime import configure_data_context, ensure_ray
    from rsray.tracking import NullTracker, Tracker
    from rsray.train.run_folder import RunLock

    _check_every_node_sees_the_paths(cfg)  # before the run lock writes into train.storage_path
    cfg = _absolute_paths(_train_earlier_stages(cfg))
    if not cfg.train.run_name:
        cfg.train.run_name = default_run_name(cfg)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(RunLock(cfg))  # one live run per name: two would mix their checkpoints
            resolved = preflight(cfg)  # before the MLflow run opens: a refused run leaves none behind
        except BaseException as exc:
            if tracker is not None:  # a sweep trial's own run
                tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        if tracker is None:
            tracker = NullTracker()
            if cfg.tracking.enabled:  # an unreachable server fails here, before any worker starts
                tracker = Tracker.start(
                    cfg.tracking,
                    cfg.train.run_name,
                    params=cfg.to_dict(),
                    tags={"model": cfg.model.get("name", ""), "dataset": cfg.data.name},
                )
        name = cfg.train.run_name
        _log_data_input(tracker, resolved)
        try:  # from here on, whatever stops the run ends its MLflow run too (never left RUNNING)
            ensure_ray()
            configure_data_context()  # the train stream's order is fixed for a seed: a config reproduces its run
            trainer = build_trainer(resolved, mlflow_run_id=tracker.run_id, callbacks=callbacks, checked=True)
            result = _fit_stopping_on_ctrl_c(trainer)
            if result.error:  # fit() raises in Ray 2.60; kept in case a version returns the error instead
                raise TrainingFailed(f"training run {name} failed: {_summary(result.error)}")
        except TrainingFailedError as exc:
            tracker.end("FAILED")
            raise TrainingFailed(f"training run {name} failed: {_summary(exc)}") from exc
        except KeyboardInterrupt:
            tracker.end("KILLED")
            raise TrainingInterrupted(
                f"run {name} stopped; its last checkpoint is kept: the same command resumes it"
            ) from None
        except BaseException:
            tracker.end("FAILED")
            raise
    # Training is done and its checkpoints are registered: nothing below may fail the run. A tracking
    # outage is collected by the tracker and reported once (`result.tracking_outage`).
    try:
        _log_earlier_epochs(tracker, result.return_value or [])
        _log_run_artifacts(tracker, cfg, result, score_test)
    except Exception as exc:  # e.g. the best checkpoint cannot be fetched from storage just now
        log.warning("the run's artifacts were not logged to MLflow: %s", _summary(exc))
        tracker.not_logged.append("run artifacts")
    finally:  # even a Ctrl-C here: the training itself finished
        tracker.end("FINISHED")
    result.mlflow_run_id, result.mlflow_link = tracker.run_id, tracker.ui_link()
    result.tracking_outage = tracker.outage()
    return result


def _log_data_input(tracker, cfg: Config) -> None:
    """The prepared data as the run's MLflow dataset input: its name, URI, a digest of its shards'
    checksums (`rsray.data.verify.data_digest`) and its split counts, so runs can be filtered by
    exactly which data they used. A tracking failure here is collected, as every other."""
    from rsray.data.prepare import read_manifest
    from rsray.data.verify import data_digest, dataset_profile

    if tracker.run_id is None:
        return
    try:
        manifest = read_manifest(cfg.train.data, cfg.prepare.s3_endpoint)
    except Exception as exc:  # read a moment ago by the preflight: a storage hiccup must not stop training
        log.warning("the run's dataset input was not logged: %s", _summary(exc))
        tracker.not_logged.append("dataset input")
        return
    name = manifest.get("dataset") or cfg.data.name
    tracker.log_dataset(name, data_digest(manifest), cfg.train.data, dataset_profile(manifest), "training")


def _fit_stopping_on_ctrl_c(trainer):
    """`trainer.fit()` in a helper thread, so that the first Ctrl-C reaches this thread at once.

    On the main thread Ray Train installs its own SIGINT handler, which asks the controller to wind
    down and returns; measured with Ray 2.60: one Ctrl-C ended `rsray train` with exit 1 and no
    message, the MLflow run FAILED. Here the KeyboardInterrupt is ours: the caller marks the run
    KILLED and `_stop_ray_work` ends this driver's Ray work, which stops the controller and the
    workers it owns. (In a sweep, trials already run off the main thread.)"""
    import threading

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="rsray-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(timeout=0.5)
    except KeyboardInterrupt:
        _stop_ray_work()
        thread.join(timeout=30)  # its ray.get fails at once now; a thread left inside Ray crashes the exit
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _stop_ray_work() -> None:
    """End this driver's connection to Ray: Ray stops the actors the driver owns (the Train
    controller, and with it the workers), or the whole local Ray when this process started it."""
    import ray

    ray.shutdown()


def _log_earlier_epochs(tracker, history: list[dict[str, float]]) -> None:
    """Epochs this MLflow run lacks because they were trained by an earlier run of the same name
    (Ray resumed from its checkpoints): logged from the checkpointed history, so each run's
    curves start at epoch 0. Runs after fit, when no EpochLogger is logging any more."""
    if not history:
        return
    logged = tracker.metric_history("epoch")
    if logged is None:  # the store is away: what it lacks cannot be told (listed in tracker.not_logged)
        return
    logged = {step for step, _ in logged}
    for metrics in history:
        if int(metrics["epoch"]) not in logged:
            tracker.log_metrics(metrics, step=int(metrics["epoch"]))


def _log_run_artifacts(tracker, cfg: Config, result, score_test: bool = True) -> None:
    """What a person opens in MLflow after a run: config, final metrics, curves, best checkpoint,
    top-5 retrieval grids and the embedding projection on the validation split, and the best
    checkpoint's test-split numbers, ranks and grids (`result.test_report`)."""
    from rsray.figures import loss_and_mr_curves

    if tracker.run_id is None:  # tracking disabled: nothing to draw the figures for
        return
    history = result.return_value or []
    tracker.log_dict(cfg.public_dict(), "config.yaml")
    tracker.log_dict({"final": result.metrics, "history": history}, "metrics.json")
    if history:
        tracker.log_figure(loss_and_mr_curves(history), "figures/loss_and_mr.png")
    if result.best_checkpoints:
        best = best_checkpoint(result, cfg)
        with best.as_directory() as folder:
            tracker.log_artifact(folder, "best_checkpoint")
            for name, figure in _validation_figures(folder, cfg).items():
                tracker.log_figure(figure, f"figures/{name}")
            result.test_report = result.model_id = result.registered_model = None
            if score_test:
                result.model_id, result.registered_model = _log_model(tracker, folder, cfg)
                result.test_report = _log_test_evaluation(tracker, folder, cfg, result.model_id)


def _log_model(tracker, checkpoint_folder: str, cfg: Config) -> tuple[str | None, str | None]:
    """The best checkpoint as the run's MLflow model (`rsray.logged_model`), registered when
    `tracking.register_as` names a model: (model id, models:/NAME@ALIAS), None for what was not
    done. Never fails the run."""
    from rsray.data.prepare import read_manifest
    from rsray.logged_model import log_embedding_model

    if not cfg.tracking.log_model:
        return None, None
    try:
        return log_embedding_model(
            tracker, checkpoint_folder, read_manifest(cfg.train.data, cfg.prepare.s3_endpoint), cfg
        )
    except Exception as exc:
        log.warning("the run's MLflow model was not logged: %s", _summary(exc))
        tracker.not_logged.append("model")
        return None, None


def _log_test_evaluation(
    tracker, checkpoint_folder: str, cfg: Config, model_id: str | None = None
) -> dict[str, Any] | None:
    """The best checkpoint scored on the test split, logged into the run (`rsray.eval.record`):
    the numbers a paper reports, where the runs table shows them, linked to the logged model
    (`model_id`) and the data's digest. Training has finished by now, so a failure here is a
    warning and never fails the run."""
    from rsray.data.prepare import read_manifest
    from rsray.data.verify import data_digest
    from rsray.eval.checkpoint import evaluate_loaded, load_checkpoint
    from rsray.eval.record import log_evaluation
    from rsray.figures import split_figures

    try:
        model, checkpoint_cfg, state = load_checkpoint(checkpoint_folder)
        report, scored, table = evaluate_loaded(model, checkpoint_cfg, state, checkpoint_folder, "test")
        figures = split_figures(scored.scores, scored.caption_image, table, seed=cfg.train.seed)  # the grids
        manifest = read_manifest(cfg.train.data, cfg.prepare.s3_endpoint)
    except Exception as exc:
        log.warning("the test split was not evaluated: %s", _summary(exc))
        tracker.not_logged.append("test evaluation")
        return None
    dataset = (manifest.get("dataset") or cfg.data.name, data_digest(manifest))
    log_evaluation(tracker, report, figures, model_id=model_id, dataset=dataset)
    log.info(
        "test split, best checkpoint (epoch %d): mR %.2f, with SMR %.2f",
        report["epoch"],
        report["metrics"]["mR"],
        report["smr_metrics"]["mR"],
    )
    return report


def best_checkpoint(result, cfg: Config):
    """The kept checkpoint with the best value of the model's selection metric (val/mR for
    retrieval models, val/accuracy for the scene prior), or None when none was kept."""
    from rsray.models import model_config
    from rsray.train.loop import selection_metric

    if not result.best_checkpoints:
        return None
    return result.get_best_checkpoint(selection_metric(model_config(cfg)), "max")


def _validation_figures(checkpoint_folder: str, cfg: Config) -> dict[str, Any]:
    """Retrieval grids and the embedding projection of the best checkpoint on the validation split.
    Training has finished by now, so a failure here is reported on stderr and never fails the run."""
    import sys

    from rsray.data.loader import read_split
    from rsray.eval.checkpoint import load_checkpoint
    from rsray.eval.split import score_split
    from rsray.figures import split_figures
    from rsray.models import model_config

    try:
        model, checkpoint_cfg, _ = load_checkpoint(checkpoint_folder)
        table = read_split(cfg.train.data, "val", cfg.prepare.s3_endpoint)
        scored = score_split(model, table, model_config(checkpoint_cfg).augment)
        return split_figures(
            scored.scores, scored.caption_image, table, scored.image_features, scored.text_features, seed=cfg.train.seed
        )
    except Exception as exc:
        print(f"rsray: warning: no retrieval figures for {checkpoint_folder}: {_summary(exc)}", file=sys.stderr)
        return {}


def _summary(exc: BaseException) -> str:
    """One line for an error that may carry a worker's traceback: its last non-empty line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
