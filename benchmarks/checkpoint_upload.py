"""Benchmark: what each epoch's checkpoint costs the training workers, uploaded synchronously or in
Ray Train's background thread (`train.checkpoint_upload: sync | async`).

Ray Train runs `--workers` workers under DDP; every epoch each does `--compute-s` seconds of
matrix products (standing in for the epoch's training steps), and rank 0 writes a checkpoint of a
synthetic model of `--state-mb` MiB of fp32 weights plus Adam's two moments (3 x the weights, as
rsray's checkpoint holds model and optimizer: CMPAGL at paper size is 2.3 GiB), with rsray's own
`write_checkpoint`, then reports it to Ray Train as `rsray.train.worker` does. Printed per mode: rank
0's seconds per epoch outside the compute (write + report: what the other workers wait for at the
next all-reduce) and the run's wall time.

    python -m benchmarks.checkpoint_upload                  # 256 MiB of weights, 2 workers, 3 epochs
    python -m benchmarks.checkpoint_upload --storage s3://bucket/prefix
    python -m benchmarks.checkpoint_upload --smoke          # a few MiB: that it runs (make test)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-mb", type=float, default=256.0, help="MiB of fp32 weights (the checkpoint holds 3x)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compute-s", type=float, default=4.0, help="seconds of work per epoch on each worker")
    parser.add_argument("--storage", default=None, help="storage_path (local folder or s3://); default a temp folder")
    parser.add_argument("--modes", nargs="+", default=["sync", "async"], choices=["sync", "async"])
    parser.add_argument("--smoke", action="store_true", help="4 MiB, 2 epochs, 0.5 s, 1 worker: that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.state_mb, args.epochs, args.compute_s, args.workers = 4.0, 2, 0.5, 1
    return args


def _work(seconds: float) -> None:
    """`seconds` of matrix products, every worker in step (DDP's all-reduce of a small tensor)."""
    import torch.distributed as dist

    a = torch.randn(256, 256)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        a = torch.tanh(a @ a)
    if dist.is_initialized():
        dist.all_reduce(torch.ones(1))  # the next epoch's first step waits for every rank, rank 0 included


def train_loop(config: dict) -> list[float]:
    import ray.train

    from rsray.checkpoint import write_checkpoint
    from rsray.config import load_config

    rank = ray.train.get_context().get_world_rank()
    weights = int(config["state_mb"] * 2**20 / 4)
    state = {"weight": torch.randn(weights)} if rank == 0 else {}
    optimizer = {"state": {0: {"exp_avg": torch.randn(weights), "exp_avg_sq": torch.rand(weights)}}} if state else {}
    cfg = load_config("train/cpu-tiny")
    outside: list[float] = []  # rank 0's seconds per epoch between its compute and the next epoch's
    for epoch in range(config["epochs"]):
        _work(config["compute_s"])
        if rank != 0:
            ray.train.report({"epoch": epoch})
            continue
        started = time.perf_counter()
        folder = tempfile.mkdtemp(prefix="rsray-bench-ckpt-")
        write_checkpoint(
            folder,
            cfg,
            model=state,
            optimizer=optimizer,
            scheduler={},
            epoch=epoch,
            rng={},
            lr_scale=1.0,
            metrics={},
            history=[],
            mlflow_run_id=None,
        )
        ray.train.report(
            {"epoch": epoch},
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_upload_mode=ray.train.CheckpointUploadMode[config["mode"].upper()],
            delete_local_checkpoint_after_upload=True,
        )
        outside.append(time.perf_counter() - started)  # with async the upload may still be running
    return outside  # Ray Train hands rank 0's to the driver (Result.return_value)


def run(mode: str, args: argparse.Namespace, storage: str) -> tuple[list[float], float]:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"state_mb": args.state_mb, "epochs": args.epochs, "compute_s": args.compute_s, "mode": mode},
        scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(
            name=f"checkpoint-{mode}-{time.time_ns()}",
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    return list(result.return_value), time.perf_counter() - started


def main(argv=None) -> int:
    import ray

    from rsray.runtime import ensure_ray

    args = parse_args(argv)
    ensure_ray()
    storage = args.storage or tempfile.mkdtemp(prefix="rsray-bench-storage-")
    size = 3 * args.state_mb
    print(
        f"checkpoint benchmark: {args.workers} workers, {args.epochs} epochs of {args.compute_s} s, "
        f"a {size:.0f} MiB checkpoint each epoch to {storage} (Ray {ray.__version__})"
    )
    try:
        for mode in args.modes:
            outside, wall = run(mode, args, storage)
            mean = statistics.fmean(outside) if outside else float("nan")
            print(
                f"{mode:>5}: rank 0 writes and reports in {mean:.2f} s per epoch (mean of {len(outside)}); "
                f"run {wall:.1f} s"
            )
    finally:
        if not args.storage:  # its own temporary folder: 768 MiB per kept checkpoint at the default size
            shutil.rmtree(storage, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
