"""The Ray Train worker: build the model, resume from Ray's checkpoint, and train epoch after epoch on
this worker's shard of the training stream; rank 0 validates on the whole validation split, writes
the checkpoint and reports it. The epoch itself is `rsray.train.loop.train_epoch`, plain PyTorch.

Models, the loader and evaluation are imported inside `train_loop_per_worker`: the Ray Train
controller imports this module to unpickle the function, and starts without them.
"""

from __future__ import annotations

import logging
import resource
import shutil
import tempfile
import time
from typing import Any

import torch
from torch import nn

from rsray.checkpoint import load_checkpoint_state, write_checkpoint
from rsray.config import config_from_dict
from rsray.ray_errors import errors_name
from rsray.train.precision import choose_precision
from rsray.train.records import epoch_line
from rsray.train.reduce import mean_across_workers, nodes_of_workers, reduce_across_workers
from rsray.train.rng import rng_state, seed_everything, set_rng_state
from rsray.train.scaling import elastic_lr_scale, rescale_learning_rate, steps_per_epoch

log = logging.getLogger("rsray.train")


class LossForward(nn.Module):
    """`forward(batch) = model.loss(batch)`, so DistributedDataParallel sees the loss computation
    (DDP synchronises gradients only for calls through its forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


class DistributedModel(nn.Module):
    """What `rsray.train.loop.train_epoch` needs (`loss`, `train`, `parameters`) on a DDP model."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped

    def loss(self, batch):
        return self.wrapped(batch)


def with_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every BatchNorm a SyncBatchNorm (`train.sync_batchnorm`): same parameters,
    buffers, state-dict keys and train/eval modes, so checkpoints load either way. timm's converter,
    not torch's: torch's turns timm's fused `BatchNormAct2d` (EfficientNet, ConvNeXt stems, ...)
    into a plain SyncBatchNorm and drops its activation; timm's makes it a `SyncBatchNormAct`."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, float]]:
    """The Ray Train worker function. `config`: {"config": Config.to_dict(), "manifest": the run
    plan's manifest, "mlflow_run_id": id or None}.

    Returns (on every rank; Ray keeps rank 0's) the per-epoch metrics of the whole run."""
    import ray.train
    import ray.train.torch

    from rsray.console import own_lines_in_workers
    from rsray.data.decode import BatchDecoder
    from rsray.data.loader import read_split
    from rsray.data.manifest import vocab_size
    from rsray.data.stream import pair_batches
    from rsray.eval.split import evaluate
    from rsray.models import build_model, model_config
    from rsray.optim import make_optimizer, steps_per_batch
    from rsray.runtime import quiet_ray_progress_logs
    from rsray.train.loop import train_epoch

    quiet_ray_progress_logs()
    own_lines_in_workers()  # rank 0's epoch line reaches the driver's console as an rsray line
    cfg = config_from_dict(config["config"])
    tc = cfg.train
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    if isinstance(device, list):
        device = device[0]

    manifest = config["manifest"]
    seed_everything(tc.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
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
    distributed = DistributedModel(
        ray.train.torch.prepare_model(LossForward(model), parallel_strategy_kwargs=ddp_kwargs or None)
    )
    optimizer, scheduler = make_optimizer(model, model_cfg, total_steps=tc.epochs * steps_per_epoch(manifest, tc))
    per_batch_schedule = steps_per_batch(model_cfg)
    lr_scale = elastic_lr_scale(tc, context.get_world_size())
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    rescale_learning_rate(optimizer, scheduler, lr_scale / (saved or {}).get("lr_scale", 1.0))
    precision = choose_precision(tc.amp, device)
    scaler = precision.grad_scaler(device)
    if scaler is not None and saved is not None and saved.get("grad_scaler"):
        scaler.load_state_dict(saved["grad_scaler"])
    if rank == 0:  # a GPU run says which precision it chose and why; a CPU run has no choice to report
        log.log(logging.INFO if device.type == "cuda" else logging.DEBUG, "%s", precision.reason)
    if saved is not None and rank == 0:
        set_rng_state(saved["rng"], device)  # the saved states are rank 0's
    else:
        seed_everything(tc.seed, rank, start_epoch)

    val = read_split(tc.data, "val", cfg.prepare.s3_endpoint)  # every rank encodes a share of it
    shard = ray.train.get_dataset_shard("train")
    placed = {"workers": context.get_world_size(), "worker_nodes": nodes_of_workers(context.get_world_size())}

    with BatchDecoder(model_cfg.augment, tc.decode_workers) as decoder:  # forked once, reused every epoch
        for epoch in range(start_epoch, tc.epochs):
            # every epoch draws from (seed, rank, epoch), whatever ran before it in this process: a
            # resumed run (any rank, any number of restarts) draws what the uninterrupted one did
            seed_everything(tc.seed, rank, epoch)
            lr = float(scheduler.get_last_lr()[0])
            batches = pair_batches(shard, tc.batch_size, decoder, tc.seed, epoch, rank)
            stats = train_epoch(
                distributed,
                batches,
                optimizer,
                device=device,
                grad_clip=tc.grad_clip or None,
                amp_dtype=precision.dtype,
                scheduler=scheduler if per_batch_schedule else None,
                scaler=scaler,
            )
            if not per_batch_schedule:
                scheduler.step()
            losses = mean_across_workers(stats.losses, device)
            (pairs,) = reduce_across_workers([float(stats.pairs)], device)
            seconds, data_seconds, peak_rss = reduce_across_workers(
                [stats.seconds, stats.data_seconds, peak_rss_mib()], device, op="max"
            )
            metrics: dict[str, float] = {
                "epoch": epoch,
                "lr": lr,
                "pairs_per_s": pairs / max(seconds, 1e-9),
                "train_seconds": seconds,
                "data_wait_seconds": data_seconds,
                "worker_peak_rss_mib": peak_rss,  # the largest worker process's high-water mark so far
                "lr_scale": lr_scale,
                **placed,
            }
            metrics.update({f"train/{'loss' if k == 'total' else k}": v for k, v in losses.items()})
            started = time.perf_counter()
            # every worker encodes its share of the validation split, rank 0 scores it
            scores = evaluate(
                model, val, model_cfg.augment, device=device, image_batch=tc.eval_batch_size, sharded=True
            )
            if rank != 0:
                ray.train.report(metrics)
                continue
            metrics.update({f"val/{k}": v for k, v in scores.items()})
            metrics["val_seconds"] = time.perf_counter() - started
            history.append(dict(metrics))
            log.info(epoch_line(metrics, tc.epochs))  # not print(): Ray Train echoes a worker print to logging too
            folder = tempfile.mkdtemp(prefix="rsray-ckpt-")  # Ray deletes it once uploaded,
            try:  # and only then: a failed write or upload (a full disk) would leave it in /tmp
                write_checkpoint(
                    folder,
                    config_from_dict(config["config"]),
                    model=model.state_dict(),
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    epoch=epoch,
                    rng=rng_state(device),
                    grad_scaler=scaler.state_dict() if scaler is not None else None,
                    lr_scale=lr_scale,
                    metrics=metrics,
                    history=history,
                    mlflow_run_id=config.get("mlflow_run_id"),
                    initial_weights=config.get("weights"),
                )
                with errors_name(f"{tc.storage_path.rstrip('/')}/{tc.run_name}"):  # pyarrow's copy names no file
                    ray.train.report(
                        metrics,
                        checkpoint=ray.train.Checkpoint.from_directory(folder),
                        checkpoint_upload_mode=ray.train.CheckpointUploadMode[tc.checkpoint_upload.upper()],
                        delete_local_checkpoint_after_upload=True,
                    )
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
    return history


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB), in MiB: what a
    worker needs at this model size, logged every epoch beside the step times."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
