"""Benchmark: the Ray Data prepare stage against a plain single-process loop doing the same work.

Both read the same annotation records and run the same per-batch function (read file, decode,
validate, resize, re-encode, tokenize) and write Parquet; the plain loop does it in one process.
`ray.init` is excluded (a cluster is started once, not per stage). The stage runs twice: cold
(worker processes still import rsray on their first task) and warm (as on a cluster that has
already run a stage); scheduling, writing and the manifest's checksums are included in both. Prints images/s for
both and the ratio. Usage:

    python -m benchmarks.prepare_throughput --images 5000 --size 256 [--out-size 224]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq


def plain_loop(cfg, out_dir: Path) -> int:
    """The same per-batch work as the Ray stage, in one process, one batch after another."""
    from rsray.data.prepare import SHARD_COMPRESSION, prepare_in_process

    tables, _ = prepare_in_process(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, table in tables.items():
        pq.write_table(table, out_dir / f"{split}.parquet", compression=SHARD_COMPRESSION)
    return sum(t.num_rows for t in tables.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="generated images (default 5000)")
    parser.add_argument("--size", type=int, default=256, help="generated image size in px (default 256)")
    parser.add_argument(
        "--out-size", type=int, default=278, help="prepared image size in px (default 278, as conf/data/rsitmd.yaml)"
    )
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "rsray-bench"))
    parser.add_argument("--smoke", action="store_true", help="30 images of 32 px (make test)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.size, args.out_size = 30, 32, 32

    from rsray.cli import setup_logging
    from rsray.config import load_config
    from rsray.data.prepare import prepare
    from rsray.data.synthetic import generate_sample
    from rsray.runtime import ensure_ray

    setup_logging()
    work = Path(args.workdir)
    root = work / f"sample-{args.images}-{args.size}"
    generate_sample(root, n_images=args.images, image_size=args.size, seed=0)
    cfg = load_config(
        "presets/sample",
        [f"data.root={root}", f"prepare.image_size={args.out_size}", f"prepare.output={work / 'ray-out'}"],
    )

    started = time.perf_counter()
    n_plain = plain_loop(cfg, work / "plain-out")
    plain_s = time.perf_counter() - started

    ensure_ray()
    ray_s = []
    for _ in range(2):  # cold: worker processes import rsray on their first task; warm: they are ready
        started = time.perf_counter()
        result = prepare(cfg, force=True)
        ray_s.append(time.perf_counter() - started)
    n_ray = result.manifest["counts"]["written"]

    plain_rate = n_plain / plain_s
    print(
        f"\nprepare benchmark: {args.images} images {args.size}px -> {args.out_size}px "
        f"{cfg.prepare.image_encoding}, {os.cpu_count()} cores, Ray with {_ray_cpus()} logical CPUs"
    )
    print(f"  plain single-process loop : {plain_rate:8.1f} images/s  ({plain_s:.1f}s)")
    for label, seconds in zip(("Ray Data stage, cold", "Ray Data stage, warm"), ray_s, strict=True):
        rate = n_ray / seconds
        print(f"  {label:<26}: {rate:8.1f} images/s  ({seconds:.1f}s)  ratio {rate / plain_rate:.2f}x")


def _ray_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 0))


if __name__ == "__main__":
    main()
