"""Benchmark: each model's paper config through the real pipeline, to see what paper size costs
before a GPU cluster is booked.

Per model: `rsray prepare` of an RSITMD-shaped synthetic set at the paper's image size (a few
hundred training images, 5 captions each, and an RSICD-sized test gallery of 1,093 images x 5,465
captions) to S3; `rsray train model/<name>` with 2 Ray Train workers for a few steps (one epoch),
checkpoints on S3, tracked on an MLflow server; the checkpoint logged as the run's MLflow model;
then `rsray evaluate` of the checkpoint on the gallery (CMPAGL with its ITM stage, `--itm-topk`).
`rsray train` runs with `train.evaluate_test=false` and `tracking.log_model=false`, so the gallery
is scored and the model uploaded once each, where they are timed. Weights are random (no download here); staged models
start their earlier stages from random weights too (`model.*_checkpoint=null`), so each model is
one Train run.

Printed per model: seconds per training step (the slowest worker), the largest worker's peak RSS
(`worker_peak_rss_mib`, reported by the workers), the `rsray train` and `rsray evaluate` processes'
peak RSS (their own VmHWM, read while they run), checkpoint bytes, save+upload and download+load seconds
(rsray's `write_checkpoint` + pyarrow's copy to S3, `read_checkpoint` from S3), the logged
model's bytes and upload seconds (`rsray.logged_model.log_embedding_model` into the same run), and
the evaluation's seconds.

    python -m benchmarks.paper_size --model swan                 # one model (repeat --model)
    python -m benchmarks.paper_size --model all --batch 100 --gpu  # every model at a paper batch, GPUs
    python -m benchmarks.paper_size --smoke                      # vsepp-tiny, tiny data (make test)

Without `--s3`/`--tracking-uri` it starts moto's S3 server and an MLflow server on 127.0.0.1 (and
stops them); without RAY_ADDRESS it starts a local Ray. `--data` reuses a prepared output.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

MODELS = ("vsepp", "swan", "dove", "cmpagl", "priorclip", "priorclip_open", "clip")
# Random weights throughout: staged models start their earlier stages from random weights (one Train
# run each), and SWAN's and DOVE's frozen backbone stays frozen (the paper's cost) though random.
RANDOM_START = {
    "swan": ["model.allow_random_frozen_backbone=true"],
    "dove": ["model.allow_random_frozen_backbone=true"],
    "priorclip": ["model.instruction_checkpoint=null"],
    "priorclip_open": ["model.instruction_checkpoint=null", "model.clip_checkpoint=null"],
}
PAPER_IMAGE_SIZE = 278  # the largest train_resize of the paper configs (SWAN, VSE++, DOVE: 278 -> 256)
TOKENIZER = "minilm"  # the packaged uncased BERT WordPiece vocabulary (30,522), as bert-base-uncased's
CAPTIONS = 5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", help=f"one of {', '.join(MODELS)} or all (repeatable)")
    parser.add_argument("--batch", type=int, default=16, help="pairs per step per worker (papers: 100-128)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per worker (sets the train images)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gallery", type=int, default=1093, help="test images (x5 captions); RSICD: 1,093")
    parser.add_argument("--val", type=int, default=40, help="validation images (scored every epoch)")
    parser.add_argument("--image-size", type=int, default=PAPER_IMAGE_SIZE, help="prepared image size")
    parser.add_argument("--gpu", action="store_true", help="one GPU per Train worker (train.use_gpu, amp auto)")
    parser.add_argument("--itm-topk", type=int, default=None, help="CMPAGL's ITM re-scoring depth (default: 16)")
    parser.add_argument("--data", default=None, help="a prepared output to reuse (skips drawing and prepare)")
    parser.add_argument("--s3", default=None, help="s3://bucket/prefix for data and runs (default: a moto server)")
    parser.add_argument(
        "--runs",
        default=None,
        help="train.storage_path (default <s3>/runs); a local folder where moto cannot hold a model's "
        "checkpoints in this machine's memory (it keeps an upload in memory: 6 GB for CMPAGL's 2.3 GiB)",
    )
    parser.add_argument("--tracking-uri", default=None, help="MLflow server (default: one started here)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--smoke", action="store_true", help="vsepp-tiny, 64 px, 1 step, 20-image gallery")
    args = parser.parse_args(argv)
    names = [m for given in (args.model or ["vsepp" if args.smoke else "swan"]) for m in given.split(",")]
    args.models = list(MODELS) if "all" in names else names
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"--model: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)} or all")
    args.presets = [f"model/{m}" for m in args.models]
    if args.smoke:
        args.presets = [f"model/{m}-tiny" for m in args.models]
        args.batch, args.steps, args.gallery, args.val, args.image_size = 8, 1, 20, 10, 64
    return args


def train_images(args: argparse.Namespace) -> int:
    """Enough training images for `steps` full batches on every worker (5 pairs per image)."""
    return -(-args.steps * args.workers * args.batch // CAPTIONS)


# ----------------------------------------------------------------------------- servers and data


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_s3(folder: Path):
    """moto's S3 server as its own process on 127.0.0.1 (in this one it held GBs of checkpoints in
    the measuring process), its test credentials set for every child."""
    import boto3

    port = _free_port()
    log = open(folder / "moto.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "benchmark",
            "AWS_SECRET_ACCESS_KEY": "benchmark",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint,
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
        }
    )
    try:
        _wait_for(f"{endpoint}/moto-api/", proc, folder / "moto.log")
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="paper-size")
        yield "s3://paper-size"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{url} did not answer; see {log}") from None
            time.sleep(0.5)


@contextmanager
def mlflow_server(folder: Path, artifacts: str):
    """`mlflow server` on 127.0.0.1: a SQLite store in `folder`, artifacts proxied to `artifacts`."""
    port = _free_port()
    log = open(folder / "mlflow-server.log", "w")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db"]
    command += ["--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # without MLflow's job runner: eight more processes that take memory from the measured ones
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=folder, env=env)
    uri = f"http://127.0.0.1:{port}"
    _wait_for(f"{uri}/health", proc, folder / "mlflow-server.log")
    try:
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def draw_data(root: Path, args: argparse.Namespace) -> Path:
    """The synthetic sample with its own split: the first images train, then validation, then the
    gallery (the generator's 80/10/10 split would need 11,000 images for an RSICD-sized test set)."""
    from rsray.data.synthetic import ANNOTATION_FILE, generate_sample

    n_train = train_images(args)
    total = n_train + args.val + args.gallery
    generate_sample(root, n_images=total, image_size=args.image_size, seed=0, image_format="jpeg")
    annotation = root / ANNOTATION_FILE
    data = json.loads(annotation.read_text())
    for index, image in enumerate(data["images"]):
        image["split"] = "train" if index < n_train else "val" if index < n_train + args.val else "test"
    annotation.write_text(json.dumps(data))
    return root


# ----------------------------------------------------------------------------- one model


def run_command(argv: list[str], log: Path) -> tuple[float, float]:
    """`rsray ...` as its own process, output to `log`: (seconds, its peak RSS in MiB). Raises with
    the log's tail when it fails. The peak is the process's own high-water mark (VmHWM), read
    while it runs: wait4's ru_maxrss starts from this process's peak (the exec'd child inherits
    it), which made every row after the largest one report that one's size."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rsray.pipelines.cli", *argv], stdout=out, stderr=subprocess.STDOUT
        )
    peak_kib = 0
    while proc.poll() is None:
        peak_kib = max(peak_kib, status_kib(proc.pid, "VmHWM:"))
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"rsray {argv[0]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    return seconds, peak_kib / 1024


def status_kib(pid: int, field: str) -> int:
    """A memory field of /proc/PID/status in KiB (VmHWM: the peak resident memory so far), 0 once
    the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def checkpoint_costs(checkpoint_uri: str, scratch: Path) -> dict:
    """Bytes of the checkpoint; seconds to download and load it (`read_checkpoint`), and to write it
    again (`write_checkpoint`) and upload it to S3 beside the original (pyarrow's copy, as Ray
    Train uploads a reported checkpoint)."""
    import pyarrow.fs as pafs

    from rsray import storage
    from rsray.checkpoint import read_checkpoint, write_checkpoint
    from rsray.config import config_from_dict

    source = storage.resolve(checkpoint_uri)
    files = source.fs.get_file_info(pafs.FileSelector(source.path, recursive=True))
    size = sum(info.size for info in files if info.type == pafs.FileType.File)
    started = time.perf_counter()
    state, config = read_checkpoint(checkpoint_uri)
    load_s = time.perf_counter() - started
    folder = scratch / "rewritten"
    folder.mkdir()
    started = time.perf_counter()
    keys = ("model", "optimizer", "scheduler", "epoch", "rng", "lr_scale", "metrics", "history", "mlflow_run_id")
    write_checkpoint(folder, config_from_dict(config), **{key: state.get(key) for key in keys})
    target = f"{source.path.rstrip('/')}-rewritten"
    source.fs.create_dir(target, recursive=True)  # a local destination must exist (on S3 a no-op)
    pafs.copy_files(str(folder), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=source.fs)
    save_s = time.perf_counter() - started
    return {"checkpoint_mib": size / 2**20, "load_s": load_s, "save_upload_s": save_s}


def logged_model_costs(checkpoint_uri: str, run, tracking_uri: str, scratch: Path) -> dict:
    """The checkpoint logged again as the run's MLflow model, with the function `rsray train` uses:
    its seconds and its artifacts' bytes as the server holds them."""
    import pyarrow.fs as pafs
    from mlflow import MlflowClient

    from rsray import storage
    from rsray.config import config_from_dict
    from rsray.data.manifest import read_manifest
    from rsray.logged_model import log_embedding_model
    from rsray.tracking import Tracker

    local = scratch / "checkpoint"
    local.mkdir()
    source = storage.resolve(checkpoint_uri)
    pafs.copy_files(source.path, str(local), source_filesystem=source.fs, destination_filesystem=pafs.LocalFileSystem())
    client = MlflowClient(tracking_uri)
    tracker = Tracker(client, tracking_uri, run.info.run_id, run.info.experiment_id, retries=1)
    cfg = config_from_dict(_yaml(local / "config.yaml"))
    started = time.perf_counter()
    model_id, _ = log_embedding_model(tracker, local, read_manifest(cfg.train.data, cfg.prepare.s3_endpoint), cfg)
    seconds = time.perf_counter() - started
    if model_id is None:
        return {"model_mib": float("nan"), "model_upload_s": float("nan")}

    def size(path: str | None = None) -> int:
        return sum(
            size(item.path) if item.is_dir else (item.file_size or 0)
            for item in client.list_logged_model_artifacts(model_id, path)
        )

    return {"model_mib": size() / 2**20, "model_upload_s": seconds}


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def rehearse(preset: str, args: argparse.Namespace, data: str, runs: str, tracking_uri: str, scratch: Path) -> dict:
    """One model through `rsray train` and `rsray evaluate`; its row of numbers."""
    from mlflow import MlflowClient

    from rsray import storage

    name = preset.split("/", 1)[1].removesuffix("-tiny")
    run_name = f"paper-{preset.split('/', 1)[1]}"
    cpus = max(1.0, (os.cpu_count() or 2) / args.workers)
    train_argv = ["train", preset, f"train.data={data}", f"train.storage_path={runs}", f"train.run_name={run_name}"]
    train_argv += ["train.epochs=1", f"train.batch_size={args.batch}", f"train.num_workers={args.workers}"]
    train_argv += [f"train.cpus_per_worker={cpus}", "train.shared_fs_ok=true", *RANDOM_START.get(name, [])]
    if args.gpu:
        train_argv.append("train.use_gpu=true")  # rsray evaluate scores on the GPU by itself (--device auto)
    train_argv += [f"tracking.uri={tracking_uri}", "tracking.experiment=paper-size", "tracking.system_metrics=false"]
    # the gallery is scored by `rsray evaluate` and the model logged by logged_model_costs, once each
    train_argv += ["train.evaluate_test=false", "tracking.log_model=false"]
    if args.itm_topk is not None and name == "cmpagl":
        train_argv.append(f"model.itm_topk={args.itm_topk}")
    print(f"{preset}: rsray train ...", flush=True)
    train_s, driver_mib = run_command(train_argv, scratch / "train.log")

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("paper-size")
    (run,) = client.search_runs(
        [experiment.experiment_id], f"attributes.run_name = '{run_name}'", order_by=["start_time DESC"], max_results=1
    )
    metrics = run.data.metrics
    run_folder = storage.resolve(f"{runs.rstrip('/')}/{run_name}")
    checkpoint = sorted(p for p in _folders(run_folder) if p.rsplit("/", 1)[1].startswith("checkpoint_"))[-1]
    checkpoint_uri = f"{runs.rstrip('/')}/{run_name}/{checkpoint.rsplit('/', 1)[1]}"

    print(f"{preset}: rsray evaluate on the gallery ...", flush=True)
    eval_argv = ["evaluate", checkpoint_uri, "--split", "test", "-o", str(scratch / "eval.json"), "--no-mlflow"]
    if args.itm_topk is not None:
        eval_argv += ["--itm-topk", str(args.itm_topk)]
    eval_s, eval_mib = run_command(eval_argv, scratch / "evaluate.log")
    steps = -(-train_images(args) * CAPTIONS // (args.workers * args.batch))
    return {
        "model": preset,
        "step_s": metrics["train_seconds"] / steps,
        "pairs_per_s": metrics["pairs_per_s"],
        "worker_peak_mib": metrics.get("worker_peak_rss_mib", float("nan")),
        "train_command_s": train_s,
        "train_driver_peak_mib": driver_mib,
        **checkpoint_costs(checkpoint_uri, scratch),
        **logged_model_costs(checkpoint_uri, run, tracking_uri, scratch),
        "evaluate_s": eval_s,
        "evaluate_peak_mib": eval_mib,
        "gallery_images": gallery_images(data),
        "train_scored_test": any(key.startswith("test/") for key in metrics),
    }


def gallery_images(data: str) -> int:
    """Images in the prepared test split (the gallery `rsray evaluate` scored)."""
    from rsray.data.manifest import read_manifest

    return int(read_manifest(data)["splits"]["test"]["images"])


def _remove(prefix: str) -> None:
    """Every object under `prefix`: a model's run folder, its rewritten checkpoint inside it."""
    from rsray import storage

    storage.remove_tree(storage.resolve(prefix))


def _folders(location) -> list[str]:
    import pyarrow.fs as pafs

    infos = location.fs.get_file_info(pafs.FileSelector(location.path))
    return [info.path for info in infos if info.type == pafs.FileType.Directory]


# ----------------------------------------------------------------------------- the table

COLUMNS = [
    ("model", "model", "{}"),
    ("gallery_images", "gallery", "{}"),
    ("step_s", "s/step", "{:.2f}"),
    ("worker_peak_mib", "worker MiB", "{:.0f}"),
    ("train_driver_peak_mib", "driver MiB", "{:.0f}"),
    ("train_command_s", "train cmd s", "{:.0f}"),
    ("checkpoint_mib", "ckpt MiB", "{:.0f}"),
    ("save_upload_s", "save+up s", "{:.1f}"),
    ("load_s", "down+load s", "{:.1f}"),
    ("model_mib", "model MiB", "{:.0f}"),
    ("model_upload_s", "model up s", "{:.1f}"),
    ("evaluate_s", "evaluate s", "{:.0f}"),
    ("evaluate_peak_mib", "eval MiB", "{:.0f}"),
]


def _cell(value, fmt: str) -> str:
    """A number as `fmt` says; "-" for what was not measured (no logged model: DOVE scores pairs)."""
    return "-" if isinstance(value, float) and value != value else fmt.format(value)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['model']} | failed: {row['failed']} |")
            continue
        lines.append("| " + " | ".join(_cell(row[key], fmt) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows: list[dict] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="rsray-paper-size-") as tmp:
        scratch = Path(tmp)
        s3 = args.s3 or stack.enter_context(moto_s3(scratch))
        tracking_uri = args.tracking_uri or stack.enter_context(mlflow_server(scratch, f"{s3}/mlflow"))
        if not os.environ.get("RAY_ADDRESS"):
            import ray

            ray.init(num_cpus=2 * (os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
            stack.callback(ray.shutdown)
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address  # the commands join it
        data = args.data
        if data is None:
            data = f"{s3}/prepared"
            print(f"drawing {train_images(args) + args.val + args.gallery} images at {args.image_size} px ...")
            root = draw_data(scratch / "sample", args)
            overrides = [f"data.root={root}", f"prepare.output={data}", f"prepare.image_size={args.image_size}"]
            seconds, _ = run_command(
                ["prepare", "presets/sample", *overrides, f"data.tokenizer={TOKENIZER}"], scratch / "prepare.log"
            )
            print(f"prepared in {seconds:.0f} s")
        runs = args.runs or f"{s3}/runs"
        for preset in args.presets:
            folder = scratch / preset.replace("/", "-")
            folder.mkdir()
            try:
                rows.append(rehearse(preset, args, data, runs, tracking_uri, folder))
            except Exception as exc:  # one model's failure (out of memory) is its row, not the end
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
                print(f"{preset}: FAILED: {reason}", flush=True)
                rows.append({"model": preset, "failed": reason})
            finally:
                if not args.s3 and not args.runs:  # moto holds what it is sent in memory; the next model needs it
                    _remove(f"{runs}/paper-{preset.split('/', 1)[1]}")
            print(table(rows[-1:]), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{args.workers} workers, batch {args.batch}, {args.steps} steps; this process's peak {peak:.0f} MiB")
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
