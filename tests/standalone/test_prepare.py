"""The prepare stage end to end on Ray: bad input, local and S3 outputs, idempotence, the CLI."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rsray import storage
from rsray.config import load_config
from rsray.data.manifest import read_manifest, read_rejections
from rsray.data.prepare import TooManyRejections, prepare
from rsray.data.synthetic import ANNOTATION_FILE, generate_sample

pytestmark = pytest.mark.integration

BAD_RECORDS = {  # file name -> (what is wrong, expected words in the reason)
    "corrupt_1.jpg": "cannot decode image",
    "missing_1.jpg": "image file not found",
    "sixteenbit_1.tif": "unsupported image mode",
    "fourcaps_1.png": "expected 5 captions, got 4",
    "emptycap_1.png": "empty",
    "badbytes_1.png": "not valid UTF-8",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The embedded sample (small) plus one record for each kind of bad input, in Karpathy JSON."""
    root = tmp_path_factory.mktemp("sample")
    generate_sample(root, n_images=60, image_size=72, seed=3, progress=False)
    images = root / "images"
    (images / "corrupt_1.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(images / "sixteenbit_1.tif")
    for name in ("fourcaps_1.png", "emptycap_1.png", "badbytes_1.png"):
        Image.new("RGB", (20, 20), "green").save(images / name)
    ann = json.loads((root / ANNOTATION_FILE).read_text())
    five = [{"raw": f"caption number {k} of a bad record."} for k in range(5)]
    extra = {name: list(five) for name in BAD_RECORDS}
    extra["fourcaps_1.png"] = five[:4]
    extra["emptycap_1.png"] = five[:4] + [{"raw": "   "}]
    extra["badbytes_1.png"] = five[:4] + [{"raw": "BADBYTES"}]
    for i, (name, sentences) in enumerate(extra.items()):
        ann["images"].append({"filename": name, "imgid": 10_000 + i, "split": "train", "sentences": sentences})
    text = json.dumps(ann).encode().replace(b"BADBYTES", b"caf\xe9 ol\xe9")  # Latin-1 bytes
    (root / ANNOTATION_FILE).write_bytes(text)
    return root


def config(dataset, output, **overrides):
    items = [
        f"data.root={dataset}",
        f"prepare.output={output}",
        "prepare.image_size=48",
        "prepare.rows_per_file=20",
        "prepare.max_reject_fraction=0.2",
        "prepare.parallelism=2",
    ]
    return load_config("presets/cpu-tiny", items + [f"{k}={v}" for k, v in overrides.items()])


def read_split(uri: str, split: str):
    loc = storage.resolve(uri).join(split)
    return pq.read_table(loc.path, filesystem=loc.fs).sort_by("image_id")


@pytest.fixture(scope="module")
def local_run(ray_cluster, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "local"
    return prepare(config(dataset, out))


def test_every_record_is_written_or_rejected_with_reason(local_run, dataset):
    m = local_run.manifest
    counts = m["counts"]
    assert counts == {"read": 66, "written": 60, "rejected": 6}
    reasons = {r["image_id"]: r["reason"] for r in read_rejections(local_run.output)}
    assert set(reasons) == set(BAD_RECORDS)
    for name, needle in BAD_RECORDS.items():
        assert needle in reasons[name], (name, reasons[name])
    # the manifest holds them counted by reason, with examples; the file holds each one
    by_reason = {g["reason"]: (g["count"], g["examples"]) for g in m["rejections"]["by_reason"]}
    assert by_reason["cannot decode image"] == (1, ["corrupt_1.jpg"])
    assert by_reason["expected N captions, got N"] == (1, ["fourcaps_1.png"])
    assert sum(count for count, _ in by_reason.values()) == m["rejections"]["count"] == 6
    assert m["rejections"]["file"]["rows"] == 6 and "rejected" not in m
    assert sum(info["images"] for info in m["splits"].values()) == 60
    assert m["splits"]["train"]["images"] == 48 and m["splits"]["test"]["images"] == 6


def test_shards_hold_resized_images_and_the_annotation_captions(local_run, dataset):
    ann = {
        e["filename"]: e
        for e in json.loads((dataset / ANNOTATION_FILE).read_bytes().decode("utf-8", "replace"))["images"]
    }
    vocab = local_run.manifest["vocab"]
    for split in ("train", "val", "test"):
        table = read_split(local_run.output, split)
        assert table.num_rows == local_run.manifest["splits"][split]["images"]
        for row in table.to_pylist():
            source = ann[row["image_id"]]
            assert source["split"] == split == row["split"]
            assert row["captions"] == [s["raw"] for s in source["sentences"]]
            assert row["scene"] == row["image_id"].split("_")[0]
            assert len(row["caption_tokens"]) == 5 and all(row["caption_tokens"])
            image = Image.open(io.BytesIO(row["image"]))
            assert (image.format, image.size, image.mode) == ("JPEG", (48, 48), "RGB")
    assert vocab and local_run.manifest["vocab_splits"] == ["train"]


def test_manifest_records_split_files_and_checksums(local_run):
    m = read_manifest(local_run.output)
    assert m["schema_version"] == 3 and m["dataset"] == "rsray_sample" and m["image_size"] == 48
    assert m["validation"]["mode"] == "fixed"
    train_files = m["splits"]["train"]["files"]
    assert all(0 < f["rows"] <= 20 for f in train_files) and len(train_files) >= 3  # rows_per_file=20
    assert all(re.fullmatch(r"train/part-\d{5}(-\d+)?\.parquet", f["path"]) for f in train_files)
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in train_files)
    assert sum(f["rows"] for f in train_files) == 48
    assert "image_ids" not in m["splits"]["val"]  # the shards hold them: the manifest does not grow per image
    val = [pq.read_table(os.path.join(local_run.output, f["path"])) for f in m["splits"]["val"]["files"]]
    assert m["splits"]["val"]["images"] == sum(t.num_rows for t in val) > 0
    assert m["splits"]["val"]["captions"] == sum(len(c) for t in val for c in t["captions"].to_pylist())


def test_rerun_is_a_no_op_and_forced_rerun_is_identical(local_run, dataset):
    again = prepare(config(dataset, local_run.output))
    assert again.skipped and again.manifest == local_run.manifest
    forced = prepare(config(dataset, local_run.output), force=True)
    assert not forced.skipped
    assert forced.manifest["splits"] == local_run.manifest["splits"]  # same files, same sha256


def test_work_is_spread_over_several_ray_worker_processes(tmp_path):
    """With enough images to keep a worker busy, Ray Data runs batches in parallel processes.

    `rsray prepare` in a Ray of its own (no RAY_ADDRESS): in the package's shared Ray, after the
    tests before it, one process did all the work twice in fresh-clone runs, as if the cluster had
    one CPU to give. Ray Data also starts an operator with one task until it has its cluster's
    resources (refreshed each second): 400 images at 128 px were done by that task before the
    refresh (CI saw it); at 256 px the work outlasts the ramp."""
    root = tmp_path / "bigger"
    generate_sample(root, n_images=400, image_size=256, seed=5, progress=False)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = ["presets/cpu-tiny", f"data.root={root}", f"prepare.output={tmp_path / 'out'}", "prepare.image_size=224"]
    done = subprocess.run(
        [sys.executable, "-m", "rsray.pipelines.prepare", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r"wrote 400 images to .* images processed by (\d+) Ray worker processes", done.stderr)
    assert found and int(found.group(1)) >= 2, done.stderr[-2000:]


def test_s3_output_matches_local_output(local_run, dataset, s3_bucket):
    uri = f"s3://{s3_bucket}/prepared/sample"
    result = prepare(config(dataset, uri))
    assert result.output == uri
    assert result.manifest["counts"] == local_run.manifest["counts"]
    for split in ("train", "val", "test"):
        assert read_split(uri, split).equals(read_split(local_run.output, split))
        s3_files = result.manifest["splits"][split]["files"]
        assert [f["sha256"] for f in s3_files] == [f["sha256"] for f in local_run.manifest["splits"][split]["files"]]
    assert read_manifest(uri)["counts"]["written"] == 60

    import boto3  # a rewrite on S3 replaces rsray's objects only

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    client.put_object(Bucket=s3_bucket, Key="prepared/sample/notes.txt", Body=b"mine")
    again = prepare(config(dataset, uri), force=True)
    assert again.manifest["splits"] == result.manifest["splits"]
    assert client.get_object(Bucket=s3_bucket, Key="prepared/sample/notes.txt")["Body"].read() == b"mine"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="prepared/sample/")["Contents"]]
    assert not [k for k in keys if "_staging" in k or "in-progress" in k]


def test_too_many_rejections_fails_after_writing_the_manifest(ray_cluster, dataset, tmp_path):
    with pytest.raises(TooManyRejections, match=r"6 of 66 records rejected"):
        prepare(config(dataset, tmp_path / "strict", **{"prepare.max_reject_fraction": 0.05}))
    assert read_manifest(str(tmp_path / "strict"))["counts"]["rejected"] == 6


def test_cli_joins_the_cluster_and_exits_non_zero_on_rejections(ray_cluster, dataset, tmp_path):
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    args = [
        sys.executable,
        "-m",
        "rsray.pipelines.prepare",
        "presets/cpu-tiny",
        f"data.root={dataset}",
        f"prepare.output={tmp_path / 'cli'}",
        "prepare.max_reject_fraction=0.01",
    ]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rsray: error: 6 of 66 records rejected")
    # again, and while it runs a second prepare into the same folder is refused in one line
    first = subprocess.Popen(
        args[:-1] + ["prepare.max_reject_fraction=0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = tmp_path / "cli" / "prepare-lock.json"
    deadline = time.monotonic() + 120
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lock.exists(), "the first prepare never held the output's lock"
    from rsray.config import ConfigError

    with pytest.raises(ConfigError) as refused:
        prepare(config(dataset, tmp_path / "cli"))
    message = str(refused.value)
    assert "\n" not in message and f"is being written by another prepare (pid {first.pid} on " in message
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert "prepared" in out and "60 images" in out and not lock.exists()


def test_bert_tokenizer_ids_are_attached_when_configured(ray_cluster, dataset, tmp_path, tiny_tokenizer):
    result = prepare(config(dataset, tmp_path / "tok", **{"data.tokenizer": tiny_tokenizer}))
    assert result.manifest["tokenizer"] == str(tiny_tokenizer)
    row = read_split(result.output, "test").to_pylist()[0]
    assert len(row["caption_input_ids"]) == 5 and all(ids[0] == 2 for ids in row["caption_input_ids"])


# ----------------------------------------------------------------------------- never delete what is not ours


def _snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("manifest", [b"{}", b"not json at all", b'{"schema_version": 1}'])
def test_a_folder_rsray_did_not_write_is_refused_and_left_as_it_was(ray_cluster, dataset, tmp_path, manifest):
    """A file that happens to be called manifest.json does not make a folder rsray's."""
    from rsray.config import ConfigError

    folder = tmp_path / "theirs"
    (folder / "src").mkdir(parents=True)
    (folder / "manifest.json").write_bytes(manifest)
    (folder / "important.txt").write_text("a year of notes")
    (folder / "src" / "data.csv").write_text("a,b\n1,2\n")
    before = _snapshot(folder)
    with pytest.raises(ConfigError, match=r"prepare\.output: .*manifest\.json is not a manifest rsray wrote") as err:
        prepare(config(dataset, folder), force=True)
    assert "\n" not in str(err.value)
    assert _snapshot(folder) == before


def test_files_without_any_manifest_are_refused_naming_one(ray_cluster, dataset, tmp_path):
    folder = tmp_path / "plain"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "part-00000-0.parquet").write_bytes(b"someone else's shard")
    with pytest.raises(ValueError, match=r"holds files rsray did not write \(e\.g\. train/part-00000-0\.parquet\)"):
        prepare(config(dataset, folder))
    assert (folder / "train" / "part-00000-0.parquet").read_bytes() == b"someone else's shard"


def test_a_rewrite_replaces_only_the_files_rsray_wrote(ray_cluster, dataset, tmp_path):
    folder = tmp_path / "ours"
    first = prepare(config(dataset, folder))
    (folder / "notes.txt").write_text("which run used this data")
    (folder / "train" / "my-extra.parquet").write_bytes(b"kept")
    second = prepare(config(dataset, folder), force=True)
    assert (folder / "notes.txt").read_text() == "which run used this data"
    assert (folder / "train" / "my-extra.parquet").read_bytes() == b"kept"
    assert second.manifest["splits"] == first.manifest["splits"]  # the extra file is not a shard of ours
    assert not (folder / "_staging").exists() and not (folder / "prepare-in-progress.json").exists()


def test_an_interrupted_prepare_is_never_read_as_complete_and_is_redone(ray_cluster, dataset, tmp_path):
    """What a prepare killed while writing leaves: its marker, staged and old shards, no manifest."""
    from rsray.data.manifest import IN_PROGRESS_FILE as IN_PROGRESS
    from rsray.data.manifest import PRODUCER

    folder = tmp_path / "interrupted"
    done = prepare(config(dataset, folder))
    (folder / "manifest.json").unlink()
    (folder / IN_PROGRESS).write_text(json.dumps({"producer": PRODUCER}))
    (folder / "_staging" / "train").mkdir(parents=True)
    (folder / "_staging" / "train" / "part-00003-0.parquet").write_bytes(b"half a shard")
    with pytest.raises(FileNotFoundError, match="no manifest: a prepare started here and did not finish"):
        read_manifest(str(folder))
    redone = prepare(config(dataset, folder))
    assert not redone.skipped and redone.manifest["splits"] == done.manifest["splits"]
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "rejected.parquet", "test", "train", "val"]


def test_file_names_outside_the_images_folder_or_unreadable_are_rejected_per_record(ray_cluster, tmp_path):
    """A file next to the dataset (readable: a naive reader would take it), an absolute path, a NUL
    byte, bytes that are not UTF-8 and an image above the pixel limit: each record rejected with
    its reason, the rest prepared, and nothing read from outside the images folder."""
    root = tmp_path / "paths"
    generate_sample(root, n_images=20, image_size=72, seed=4, progress=False)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (72, 72), "red").save(outside)
    Image.new("RGB", (100, 100), "blue").save(root / "images" / "big_1.png")
    expected = {
        "../../outside.png": "points outside the images folder",
        str(outside): "points outside the images folder",
        "nul\u0000_1.png": "contains a NUL byte",
        "BADNAME_1.png": "not valid UTF-8",
        "big_1.png": "image too large: 100x100 is above prepare.max_image_pixels=6000",
    }
    ann = json.loads((root / ANNOTATION_FILE).read_text())
    five = [{"raw": f"caption number {k} of a record."} for k in range(5)]
    for i, name in enumerate(expected):
        ann["images"].append({"filename": name, "imgid": 20_000 + i, "split": "train", "sentences": five})
    (root / ANNOTATION_FILE).write_bytes(json.dumps(ann).encode().replace(b"BADNAME", b"caf\xe9"))

    overrides = {"prepare.max_image_pixels": 6000, "prepare.max_reject_fraction": 0.5}
    overrides["tracking.uri"] = "http://rsray-user:pw-in-a-manifest@127.0.0.1:5000"  # recorded, redacted
    result = prepare(config(root, tmp_path / "out", **overrides))
    assert "pw-in-a-manifest" not in (tmp_path / "out" / "manifest.json").read_text()
    assert result.manifest["config"]["tracking"]["uri"] == "http://rsray-user:***@127.0.0.1:5000"
    assert result.manifest["counts"] == {"read": 25, "written": 20, "rejected": 5}
    reasons = {r["image_id"]: r["reason"] for r in read_rejections(result.output)}
    reasons["BADNAME_1.png"] = reasons.pop("caf\\udce9_1.png")  # the record shows the bad byte escaped
    assert set(reasons) == set(expected)
    for name, reason in expected.items():
        assert reason in reasons[name], (name, reasons[name])
    sources = {
        p for split in ("train", "val", "test") for p in read_split(result.output, split)["source_path"].to_pylist()
    }
    assert len(sources) == 20 and all(p.startswith(str(root / "images")) for p in sources)
