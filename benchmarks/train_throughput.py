"""Benchmark: training throughput of the Ray Train loop (1 worker) against a bare PyTorch loop.

Same model, same prepared shards, same batch size, same per-sample decode + augmentation code
(`rsray.data.loader`), same `rsray.train.loop.train_epoch`, same CPU threads (`--threads`; Ray gives
a worker as many as its CPUs), same number of decode processes (`--decode-workers`). What
differs is only what Ray adds: the Ray Data stream feeding the worker's shard (read, explode to
pairs, cached in the object store, local shuffle), the worker process, DDP's wrapper and the
per-epoch report + checkpoint. Throughput is image-caption
pairs per second inside the training epoch (validation, which both would do, is excluded), the
mean over the epochs after the first (the first pays for imports, Ray Data start-up and caches).

    python -m benchmarks.train_throughput                      # CPU, VSE++ tiny, Ray vs bare
    python -m benchmarks.train_throughput --bare-only --device cuda --amp bf16 --model vsepp \\
        --images 2000 --size 256 --batch 100                   # a GPU machine without Ray

`--bare-only` needs no Ray at all (the shards are made in this process), so the GPU measurement
runs where only torch, timm and transformers are installed. Target: Ray overhead <= 10%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rsray.config import load_config
from rsray.data.loader import make_train_loader
from rsray.data.synthetic import generate_sample
from rsray.models import build_model, model_config
from rsray.optim import make_optimizer
from rsray.train.loop import train_epoch
from rsray.train.precision import AMP_SETTINGS, choose_precision


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vsepp-tiny", help="a conf/model/ name (default vsepp-tiny)")
    parser.add_argument("--images", type=int, default=600, help="sample images to generate (5 captions each)")
    parser.add_argument("--size", type=int, default=64, help="prepared image size in pixels")
    parser.add_argument("--batch", type=int, default=32, help="pairs per batch (per worker)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per loop; the first is warm-up")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bare loop; Ray uses a GPU with --device cuda)")
    parser.add_argument("--amp", default="off", choices=AMP_SETTINGS, help="train.amp (rsray.train.precision)")
    parser.add_argument(
        "--decode-workers",
        type=int,
        default=0,
        help="processes that decode + augment images: the bare loop's DataLoader workers and the "
        "Ray worker's train.decode_workers (0: decode in the training process)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for the model: torch.set_num_threads in the bare loop, the CPUs of the Ray "
        "worker (Ray sets its OMP_NUM_THREADS to them); default 1",
    )
    parser.add_argument("--bare-only", action="store_true", help="skip the Ray Train loop (no Ray needed)")
    parser.add_argument("--smoke", action="store_true", help="40 images, 2 epochs, the bare loop only (make test)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.epochs, args.batch, args.bare_only = 40, 2, 8, True
    return args


def model_overrides(args: argparse.Namespace) -> list[str]:
    """The tiny presets crop 64 px from 72: scale the crop to the prepared size."""
    if args.size == 64:
        return []
    return [
        f"model.augment.train_resize={args.size}",
        f"model.augment.crop={int(args.size * 64 / 72)}",
        f"model.augment.eval_resize={args.size}",
    ]


def steady_rate(rates: list[float]) -> float:
    return statistics.mean(rates[1:] if len(rates) > 1 else rates)


def bare_loop(cfg, train_table, vocab_size: int, args: argparse.Namespace) -> list[float]:
    """Pairs/s per epoch of the plain PyTorch loop (rsray.train.loop) in this process."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, vocab_size=vocab_size).to(device)
    model_cfg = model_config(cfg)
    optimizer, schedule = make_optimizer(model, model_cfg)
    loader = make_train_loader(
        train_table,
        model_cfg.augment,
        batch_size=args.batch,
        seed=cfg.train.seed,
        num_workers=args.decode_workers,
        pin_memory=device.type == "cuda",
    )
    precision = choose_precision(args.amp, device)
    scaler = precision.grad_scaler(device)
    print(f"  {precision.reason}", flush=True)
    rates = []
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        stats = train_epoch(
            model,
            loader,
            optimizer,
            device=device,
            grad_clip=cfg.train.grad_clip or None,
            amp_dtype=precision.dtype,
            scaler=scaler,
        )
        schedule.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(stats.pairs_per_second)
        print(
            f"  bare epoch {epoch}: {stats.pairs_per_second:8.1f} pairs/s  loss {stats.losses['total']:.3f}  "
            f"{stats.seconds:6.1f} s, {stats.data_seconds:5.1f} s waiting for data",
            flush=True,
        )
    return rates


def ray_loop(cfg, folder: Path, args: argparse.Namespace) -> list[float]:
    """Pairs/s per epoch of `rsray.train.run` with one Ray Train worker (as each epoch reported it)."""
    from rsray.train.run import train

    cfg.train.num_workers = 1
    cfg.train.cpus_per_worker = args.threads
    cfg.train.use_gpu = args.device.startswith("cuda")
    cfg.train.storage_path = str(folder / "runs")
    cfg.train.run_name = f"throughput-{int(time.time())}"
    cfg.train.amp = args.amp
    cfg.train.decode_workers = args.decode_workers
    cfg.tracking.enabled = False
    result = train(cfg)
    rates = [float(m["pairs_per_s"]) for m in result.return_value]
    for epoch, m in enumerate(result.return_value):
        print(
            f"  ray  epoch {epoch}: {rates[epoch]:8.1f} pairs/s  loss {m['train/loss']:.3f}  "
            f"{m['train_seconds']:6.1f} s, {m['data_wait_seconds']:5.1f} s waiting for data",
            flush=True,
        )
    return rates


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rsray-train-bench-") as tmp:
        folder = Path(tmp)
        generate_sample(folder / "sample", n_images=args.images, image_size=args.size, seed=0, progress=False)
        overrides = [
            f"data.root={folder / 'sample'}",
            f"prepare.output={folder / 'prepared'}",
            f"prepare.image_size={args.size}",
            f"train.data={folder / 'prepared'}",
            f"train.batch_size={args.batch}",
            f"train.epochs={args.epochs}",
        ]
        cfg = load_config("train/cpu-tiny", overrides)
        model_cfg = load_config(f"model/{args.model}", model_overrides(args))
        cfg.model = model_cfg.model
        print(
            f"{args.model}: {args.images} images x 5 captions at {args.size} px, batch {args.batch}, "
            f"{args.epochs} epochs, device {args.device}, amp {args.amp}, "
            f"{args.decode_workers} decode processes",
            flush=True,
        )

        if args.bare_only:
            from rsray.data.prepare import prepare_in_process

            tables, vocab = prepare_in_process(cfg)
            train_table, vocab_size = tables["train"], len(vocab)
        else:
            from rsray.data.loader import read_split
            from rsray.data.manifest import read_manifest
            from rsray.data.manifest import vocab_size as manifest_vocab_size
            from rsray.data.prepare import prepare
            from rsray.runtime import ensure_ray

            ensure_ray()
            prepare(cfg)
            train_table = read_split(cfg.train.data, "train")
            vocab_size = manifest_vocab_size(read_manifest(cfg.train.data))
        print(f"training pairs: {train_table.num_rows * 5}", flush=True)

        bare = steady_rate(bare_loop(cfg, train_table, vocab_size, args))
        print(f"bare PyTorch loop:      {bare:8.1f} pairs/s (mean of epochs 1..{args.epochs - 1})")
        if args.bare_only:
            return 0
        ray = steady_rate(ray_loop(cfg, folder, args))
        print(f"Ray Train, 1 worker:    {ray:8.1f} pairs/s (mean of epochs 1..{args.epochs - 1})")
        print(f"Ray overhead: {bare / ray - 1:+.1%} (bare / Ray - 1; target <= +10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
