"""Benchmark: preparing a WebDataset corpus from S3 with Ray Data, at growing sizes.

For each size it draws the synthetic corpus (the sample's scenes, five captions per image, a
`.jpg` and a `.json` per sample) as tar shards on S3 and runs `rsray prepare` on it
(`data.format: webdataset`) as its own process, on a one-node Ray and on a two-node
`ray.cluster_utils.Cluster` (every node on this machine). It prints images/s, the `rsray prepare`
process's peak RSS (the driver: VmHWM, read while it runs), the peak of all Ray worker processes'
RSS together, and the size of the manifest it wrote. `--baseline` also prepares the same corpus
as a Karpathy JSON and image folder on local disk (the record path, whose driver reads every
record), for the driver's memory before the corpus path existed.

    python -m benchmarks.corpus_scale                               # 10k, 30k, 100k images
    python -m benchmarks.corpus_scale --images 10000 --nodes 1 --baseline
    python -m benchmarks.corpus_scale --smoke                       # make test: 100 images

Without `--s3` it starts moto's S3 server on 127.0.0.1 (and stops it); with RAY_ADDRESS set it
uses that Ray for the one-node rows and runs no two-node rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.paper_size import moto_s3, status_kib


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, action="append", help="corpus sizes (repeat; default 10k, 30k, 100k)")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per tar shard (default 1000)")
    parser.add_argument("--image-size", type=int, default=64, help="drawn image size in px (default 64)")
    parser.add_argument("--out-size", type=int, default=64, help="prepared image size in px (default 64)")
    parser.add_argument("--nodes", type=int, action="append", help="Ray nodes: 1 and/or 2 (default both)")
    parser.add_argument(
        "--two-node-images", type=int, action="append", help="sizes to prepare on two nodes (default: every size)"
    )
    parser.add_argument("--baseline", action="store_true", help="also prepare each size as Karpathy on local disk")
    parser.add_argument("--s3", default=None, help="s3://bucket/prefix for the corpora (default: a moto server)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here too")
    parser.add_argument("--smoke", action="store_true", help="100 images in shards of 50, one node, with baseline")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.per_shard, args.image_size, args.out_size = [100], 50, 32, 32
        args.nodes, args.baseline = [1], True
    args.images = args.images or [10_000, 30_000, 100_000]
    args.nodes = [1] if os.environ.get("RAY_ADDRESS") else (args.nodes or [1, 2])
    return args


def upload_corpus(s3: str, n_images: int, args: argparse.Namespace) -> str:
    """The corpus's shards under <s3>/corpus-<n>/ (drawn once: kept when already there)."""
    import boto3

    from rsray.data.synthetic.webdataset import corpus_shards

    bucket, _, prefix = s3[len("s3://") :].partition("/")
    prefix = f"{prefix.strip('/')}/corpus-{n_images}-{args.image_size}".strip("/")
    client = boto3.client("s3")
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/", MaxKeys=1)
    if not listed.get("KeyCount"):
        for name, data in corpus_shards(n_images, args.per_shard, args.image_size, captions_in="json"):
            client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
    return f"s3://{bucket}/{prefix}"


def write_karpathy(folder: Path, n_images: int, args: argparse.Namespace) -> Path:
    """The same samples as a Karpathy JSON and an image folder (every image in train)."""
    from rsray.data.synthetic.webdataset import sample_files

    annotation = folder / "dataset_corpus.json"
    if annotation.exists():
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for index in range(n_images):
        (name, jpeg), (_, meta) = sample_files(index, 0, args.image_size, "json")
        (folder / "images" / name).write_bytes(jpeg)
        captions = json.loads(meta)["captions"]
        images.append({"filename": name, "split": "train", "sentences": [{"raw": c} for c in captions]})
    annotation.write_text(json.dumps({"images": images}))
    return folder


def _ray_workers_kib() -> int:
    """Resident memory of every Ray worker process on this machine together (`ray::...`)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::"):
                    total += status_kib(int(entry.name), "VmRSS:")
            except OSError:
                continue
    return total


def run_prepare(overrides: list[str], log: Path, env: dict) -> dict:
    """`rsray prepare` as its own process: wall seconds, its peak RSS and the workers' peak total."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rsray.pipelines.cli", "prepare", "presets/sample", *overrides],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    driver = workers = 0
    while proc.poll() is None:
        driver = max(driver, status_kib(proc.pid, "VmHWM:"))
        workers = max(workers, _ray_workers_kib())
        time.sleep(0.25)
    if proc.returncode != 0:
        raise RuntimeError(f"rsray prepare exited {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
    return {"seconds": time.perf_counter() - started, "driver_mib": driver / 1024, "workers_mib": workers / 1024}


def corpus_overrides(root: str, output: str, args: argparse.Namespace) -> list[str]:
    return [
        "data.name=corpus",
        "data.format=webdataset",
        f"data.root={root}",
        "data.scenes=column",
        "data.validation.mode=folds",
        f"prepare.output={output}",
        f"prepare.image_size={args.out_size}",
        "prepare.max_reject_fraction=0.01",
    ]


def manifest_bytes(output: str) -> int:
    from rsray import storage

    loc = storage.resolve(output).join("manifest.json")
    return loc.fs.get_file_info(loc.path).size


@contextlib.contextmanager
def ray_nodes(nodes: int):
    """RAY_ADDRESS of a Ray with `nodes` nodes of 2 CPUs (4 logical on one node), for the children."""
    if os.environ.get("RAY_ADDRESS"):
        yield os.environ["RAY_ADDRESS"]
        return
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4 if nodes == 1 else 2})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        yield cluster.address
    finally:
        cluster.shutdown()


def measure(args: argparse.Namespace, s3: str, scratch: Path) -> list[dict]:
    rows = []
    corpora = {n: upload_corpus(s3, n, args) for n in args.images}
    for nodes in args.nodes:
        with ray_nodes(nodes) as address:
            env = {**os.environ, "RAY_ADDRESS": address}
            for n, root in corpora.items():
                if nodes == 2 and args.two_node_images and n not in args.two_node_images:
                    continue
                output = f"{s3}/prepared-{n}-{nodes}node"
                numbers = run_prepare(corpus_overrides(root, output, args), scratch / f"prepare-{n}-{nodes}.log", env)
                rows.append({"path": "webdataset on S3", "images": n, "nodes": nodes, **numbers})
                rows[-1]["manifest_kib"] = manifest_bytes(output) / 1024
                _print_row(rows[-1])
                if args.baseline and nodes == 1:
                    folder = write_karpathy(scratch / f"karpathy-{n}", n, args)
                    overrides = [
                        f"data.root={folder}",
                        "data.annotations=dataset_corpus.json",
                        "data.scenes=none",
                        "data.validation.mode=folds",
                        f"prepare.output={scratch / f'karpathy-prepared-{n}'}",
                        f"prepare.image_size={args.out_size}",
                    ]
                    numbers = run_prepare(overrides, scratch / f"karpathy-{n}.log", env)
                    rows.append({"path": "Karpathy, local (before)", "images": n, "nodes": nodes, **numbers})
                    rows[-1]["manifest_kib"] = manifest_bytes(str(scratch / f"karpathy-prepared-{n}")) / 1024
                    _print_row(rows[-1])
    return rows


def _print_row(row: dict) -> None:
    print(
        f"  {row['path']:<26} {row['images']:>8,} images  {row['nodes']} node(s)  "
        f"{row['images'] / row['seconds']:7.1f} images/s  driver {row['driver_mib']:7,.0f} MiB  "
        f"workers {row['workers_mib']:7,.0f} MiB  manifest {row['manifest_kib']:7,.0f} KiB",
        flush=True,
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| input | images | nodes | images/s | driver peak MiB | workers' peak MiB | manifest KiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['images']:,} | {r['nodes']} | {r['images'] / r['seconds']:.1f} | "
            f"{r['driver_mib']:,.0f} | {r['workers_mib']:,.0f} | {r['manifest_kib']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        scratch = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="rsray-corpus-")))
        scratch.mkdir(parents=True, exist_ok=True)
        s3 = args.s3 or f"{stack.enter_context(moto_s3(scratch))}/corpus-scale"
        print(
            f"corpus benchmark: {args.per_shard} samples per shard, {args.image_size} px drawn, "
            f"{args.out_size} px prepared, {os.cpu_count()} cores",
            flush=True,
        )
        rows = measure(args, s3.rstrip("/"), scratch)
    print("\n" + table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
