"""Ray Train end to end on a cluster's layout: the prepared shards and Ray Train's run folder on
S3 (moto's server), VSE++ tiny on 2 DDP workers for 2 epochs, recorded on the MLflow server.

One run serves every test that only reads what it left: the reported metrics, the checkpoint
(loaded with `weights_only=True`, re-scored to the mR reported for it, evaluated from S3 by
`rsray evaluate`), and its MLflow record. A run stopped and resumed is test_storage_faults'; the
cached train split needs a run of its own; workers lost mid-run (with their node) are
tests/multinode/test_node_loss.py's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rsray.checkpoint import CONFIG_FILE, load_checkpoint_state
from rsray.config import load_config
from rsray.data.loader import read_split
from rsray.data.manifest import read_manifest, vocab_size
from rsray.eval.split import evaluate
from rsray.models import build_model, model_config
from rsray.train.records import best_checkpoint
from tests.credentials import PASSWORD, RAY_TOKEN, S3_SECRET_KEY
from tests.integration.conftest import ALIAS, EPOCHS, REGISTERED, RUNS_PREFIX

pytestmark = pytest.mark.integration


def s3_uri(checkpoint) -> str:
    """A Ray Train checkpoint on S3 names its path without the scheme."""
    return f"s3://{checkpoint.path}"


def test_every_epoch_reports_metrics_and_a_checkpoint(trained):
    cfg, result = trained
    history = result.return_value
    assert [int(m["epoch"]) for m in history] == list(range(EPOCHS))
    for m in history:
        print({k: round(v, 3) for k, v in m.items()})
        for key in ("train/loss", "lr", "pairs_per_s", "val/i2t_R1", "val/t2i_R10", "val/mR"):
            assert math.isfinite(m[key]), key
        assert m["pairs_per_s"] > 0
        assert 0 <= m["data_wait_seconds"] <= m["train_seconds"]
        # the largest worker's high-water mark: torch, Ray Train and the model are well over 100 MiB
        assert 100 < m["worker_peak_rss_mib"] < 8192
    assert len(result.best_checkpoints) == EPOCHS  # keep_checkpoints = 2
    assert result.metrics["epoch"] == EPOCHS - 1
    assert result.metrics["val/mR"] == pytest.approx(history[-1]["val/mR"])
    assert result.path.endswith("vsepp-tiny-test")


def test_checkpoint_loads_safely_and_reproduces_the_reported_recall(trained, prepared):
    _, result = trained
    checkpoint, reported = result.best_checkpoints[-1]
    state = load_checkpoint_state(checkpoint)  # torch.load(..., weights_only=True)
    assert set(state) >= {"model", "optimizer", "scheduler", "epoch", "rng", "history"}
    assert state["epoch"] == reported["epoch"]
    assert set(state["rng"]) >= {"torch", "numpy", "python"}

    with checkpoint.as_directory() as folder:
        cfg = load_config(f"{folder}/{CONFIG_FILE}")  # the resolved config travels with the weights
    manifest = read_manifest(prepared)
    model = build_model(cfg, vocab_size=vocab_size(manifest))
    model.load_state_dict(state["model"])
    scores = evaluate(model, read_split(prepared, "val"), model_config(cfg).augment)
    assert scores["mR"] == pytest.approx(reported["val/mR"], abs=1e-6)
    assert scores["i2t_R1"] == pytest.approx(reported["val/i2t_R1"], abs=1e-6)


def test_the_run_reads_its_shards_from_s3_and_checkpoints_to_s3(trained, s3_endpoint, s3_bucket):
    """The workers read the shards and rank 0 the validation split from S3; Ray Train's run folder
    (every checkpoint's state.pt and config.yaml) is on S3 too."""
    import boto3

    cfg, result = trained
    listing = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
        Bucket=s3_bucket, Prefix=f"{RUNS_PREFIX}/vsepp-tiny-test/"
    )
    keys = [o["Key"] for o in listing["Contents"]]
    for checkpoint, _ in result.best_checkpoints:
        folder = checkpoint.path.split("/", 1)[1]  # bucket/key
        assert {f"{folder}/state.pt", f"{folder}/config.yaml"} <= set(keys)
    with result.best_checkpoints[-1][0].as_directory() as folder:
        assert load_config(f"{folder}/{CONFIG_FILE}").train.data == cfg.train.data.rstrip("/")


def test_mlflow_holds_params_per_epoch_metrics_and_artifacts(trained, mlflow_server):
    """The real MLflow server (artifacts on moto's S3) has the run as a person would browse it."""
    from mlflow import MlflowClient

    cfg, result = trained
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "vsepp-tiny-test"
    assert run.data.params["model.name"] == "vsepp" and run.data.params["train.epochs"] == str(EPOCHS)
    assert run.data.tags["model"] == "vsepp" and run.data.tags["dataset"] == cfg.data.name
    for key in ("val/mR", "train/loss", "val/i2t_R1"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(EPOCHS)), key  # one value per epoch: no gaps, no duplicates
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "figures"} <= artifacts
    # on S3 the checkpoint is not uploaded again (tracking.log_checkpoint: auto): the run names it
    best = best_checkpoint(result, cfg)
    assert "best_checkpoint" not in artifacts and run.data.tags["best_checkpoint"] == f"s3://{best.path}"
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {
        f"figures/{name}"
        for name in ("loss_and_mr.png", "retrieval_t2i.png", "retrieval_i2t.png", "embedding_projection.png")
    } <= figures
    assert {"figures/test_retrieval_t2i.png", "figures/test_retrieval_i2t.png"} <= figures
    assert result.mlflow_link.endswith("?workflowType=machine_learning")
    # the prepared data as its dataset input: name, URI, the shards' digest, the split counts
    from rsray.data.manifest import read_manifest
    from rsray.data.verify import data_digest

    (data,) = run.inputs.dataset_inputs
    manifest = read_manifest(cfg.train.data)
    assert (data.dataset.name, data.dataset.digest) == (manifest["dataset"], data_digest(manifest))
    assert json.loads(data.dataset.source) == {"uri": cfg.train.data} and data.dataset.source_type == "s3"
    assert json.loads(data.dataset.profile)["splits"]["test"]["images"] == manifest["splits"]["test"]["images"]
    assert {t.key: t.value for t in data.tags} == {"mlflow.data.context": "training"}


def test_the_best_checkpoints_test_numbers_are_in_its_mlflow_run(trained, mlflow_server, tmp_path):
    """The table a paper reports, where the runs table shows it: test/* and test_smr/* at the best
    epoch, equal to scoring the best checkpoint again, and the per-query ranks as an artifact."""
    import mlflow.artifacts
    from mlflow import MlflowClient

    from rsray.eval.checkpoint import evaluate_checkpoint

    cfg, result = trained
    best = best_checkpoint(result, cfg)
    expected = evaluate_checkpoint(s3_uri(best), split="test")
    run = MlflowClient(mlflow_server).get_run(result.mlflow_run_id)
    for prefix, numbers in (("test/", expected["metrics"]), ("test_smr/", expected["smr_metrics"])):
        for key in ("i2t_R1", "t2i_R10", "mR", "i2t_medr", "t2i_meanr", "i2t_SR1"):
            assert run.data.metrics[prefix + key] == pytest.approx(numbers[key], abs=1e-6), prefix + key
    steps = [m.step for m in MlflowClient(mlflow_server).get_metric_history(run.info.run_id, "test/mR")]
    assert steps == [expected["epoch"]]  # logged once, at the best epoch
    ranks = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id,
                artifact_path="test/ranks.json",
                dst_path=str(tmp_path),
                tracking_uri=mlflow_server,
            )
        ).read_text()
    )
    assert ranks["ranks"] == expected["ranks"] and ranks["image_ids"] == expected["image_ids"]
    assert f"mR {expected['metrics']['mR']:.2f}; with SMR mR {expected['smr_metrics']['mR']:.2f}" in result.summary


def test_neither_the_mlflow_password_nor_the_s3_secret_is_printed_logged_or_written(
    trained, mlflow_server, s3_endpoint, s3_bucket, tmp_path
):
    """The run logged into the basic-auth server with the login from the environment, and neither
    that password, the S3 secret key nor the Ray token reaches a console line, an MLflow param, tag or artifact,
    the logged model, a file in Ray Train's run folder (checkpoints included), Ray's own logs or the
    commands' log files."""
    import boto3
    import mlflow.artifacts
    import ray
    from mlflow import MlflowClient

    cfg, result = trained
    printed = "\n".join(result.log_lines) + result.summary
    assert f"MLflow run {result.mlflow_run_id}: {mlflow_server}/#/experiments/" in result.summary
    assert (
        f"best checkpoint (val/mR): s3://{best_checkpoint(result, cfg).path}" in result.summary
    )  # rsray evaluate takes it
    run = MlflowClient(mlflow_server).get_run(result.mlflow_run_id)
    assert run.data.params["tracking.uri"] == mlflow_server
    recorded = [printed, json.dumps(run.data.params), json.dumps(run.data.tags)]
    artifacts = Path(
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path), tracking_uri=mlflow_server)
    )
    recorded += [file.read_bytes().decode("latin-1") for file in artifacts.rglob("*") if file.is_file()]
    location = MlflowClient(mlflow_server).get_logged_model(result.model_id).artifact_location
    model = Path(  # the logged model lives outside the run's artifacts (MLflow 3)
        mlflow.artifacts.download_artifacts(
            artifact_uri=location, dst_path=str(tmp_path / "model"), tracking_uri=mlflow_server
        )
    )
    model_files = [file for file in model.rglob("*") if file.is_file()]
    assert any(file.name == "preprocess.json" for file in model_files)
    recorded += [file.read_bytes().decode("latin-1") for file in model_files]
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    listing = client.list_objects_v2(Bucket=s3_bucket, Prefix=f"{RUNS_PREFIX}/vsepp-tiny-test/")["Contents"]
    for item in listing:
        recorded.append(client.get_object(Bucket=s3_bucket, Key=item["Key"])["Body"].read().decode("latin-1"))
    assert any("config.yaml" in item["Key"] for item in listing) and len(recorded) > 10
    ray_logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # driver, raylet, workers, Train
    recorded += [file.read_bytes().decode("latin-1") for file in ray_logs.rglob("*") if file.is_file()]
    command_log = result.command_log.read_text()  # rsray.console's: Ray's, Ray Data's and MLflow's lines of the run
    assert "ray.data" in command_log
    recorded.append(command_log)
    leaks = [
        text[max(0, text.find(secret) - 80) : text.find(secret) + 20]
        for secret in (PASSWORD, S3_SECRET_KEY, RAY_TOKEN)
        for text in recorded
        if secret in text
    ]
    assert not leaks


def test_rsray_evaluate_scores_the_checkpoint_with_and_without_smr(trained, tmp_path, capsys):
    import json

    from pipelines.cli import main

    _, result = trained
    checkpoint, reported = result.best_checkpoints[-1]
    out = tmp_path / "eval.json"
    assert main(["evaluate", s3_uri(checkpoint), "--split", "val", "-o", str(out), "--no-mlflow"]) == 0  # from S3
    printed = capsys.readouterr().out
    assert "without SMR" in printed and "with SMR (K=30" in printed
    report = json.loads(out.read_text())
    assert report["metrics"]["mR"] == pytest.approx(reported["val/mR"], abs=1e-6)
    assert set(report["smr_metrics"]) == set(report["metrics"])
    assert len(report["ranks"]["t2i"]) == 5 * len(report["ranks"]["i2t"]) == 5 * len(report["image_ids"])
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err


def test_rsray_evaluate_logs_into_the_checkpoints_run_or_a_child_of_it(trained, prepared, mlflow_server, capsys):
    """By default the numbers go where people look: the checkpoint's own MLflow run for its own
    data; a child run of it (linked, tagged) for other prepared data, never mixed with the run's."""
    from mlflow import MlflowClient

    from pipelines.cli import main

    _, result = trained
    client = MlflowClient(mlflow_server)
    checkpoint, reported = result.best_checkpoints[-1]
    before = len(client.get_metric_history(result.mlflow_run_id, "test/mR"))
    assert main(["evaluate", s3_uri(checkpoint)]) == 0
    assert f"logged to MLflow: its run {result.mlflow_run_id} (test/*, test_smr/*)" in capsys.readouterr().out
    history = client.get_metric_history(result.mlflow_run_id, "test/mR")
    assert len(history) == before + 1 and history[-1].step == int(reported["epoch"])

    assert main(["evaluate", s3_uri(checkpoint), "--data", prepared, "--split", "val"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("logged to MLflow: run ") and f"a child of {result.mlflow_run_id}" in line
    child = client.get_run(line.split()[4].rstrip(","))
    assert child.data.tags["mlflow.parentRunId"] == child.data.tags["rsray.evaluates"] == result.mlflow_run_id
    assert child.data.params["data"] == prepared
    # the same data as the run's (a copy on S3): the child's val numbers are the run's
    assert child.data.metrics["val/mR"] == pytest.approx(reported["val/mR"], abs=1e-6)


def test_the_best_checkpoint_is_a_logged_model_that_embeds_as_the_checkpoint_does(trained, prepared, mlflow_server):
    """MLflow 3's convention: the run's model (a pyfunc with its signature and code) loads with
    mlflow.pyfunc.load_model from the server (artifacts on S3) and embeds a raw caption and image
    file as the checkpoint embeds the prepared rows; the test numbers are linked to it and the data."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow import MlflowClient

    from rsray.eval.checkpoint import load_checkpoint
    from rsray.eval.split import encode_split

    cfg, result = trained
    client = MlflowClient(mlflow_server)
    logged = client.get_logged_model(result.model_id)
    assert logged.source_run_id == result.mlflow_run_id and logged.name == "model"
    linked = {m.key: m for m in logged.metrics or []}
    assert linked["test/mR"].value == pytest.approx(result.test_report["metrics"]["mR"], abs=1e-9)
    assert (
        linked["test_smr/mR"].dataset_digest
        == client.get_run(result.mlflow_run_id).inputs.dataset_inputs[0].dataset.digest
    )
    assert f"MLflow model: models:/{result.model_id}, registered as models:/{REGISTERED}@{ALIAS}" in result.summary

    mlflow.set_tracking_uri(mlflow_server)
    served = mlflow.pyfunc.load_model(f"models:/{result.model_id}")
    assert served.metadata.get_input_schema().input_names() == ["caption", "image"]
    model, checkpoint_cfg, _ = load_checkpoint(s3_uri(best_checkpoint(result, cfg)))
    table = read_split(prepared, "test")
    images, texts = encode_split(model, table, model_config(checkpoint_cfg).augment)
    caption = table["captions"][2].as_py()[1]  # image 2's second caption: row 2 * 5 + 1
    image_file = Path(table["source_path"][3].as_py()).read_bytes()  # the sample's own file, before prepare
    out = served.predict(pd.DataFrame({"caption": [caption, None], "image": [None, image_file]}))
    assert out.shape == (2, texts.shape[1])
    assert abs(out[0] - texts[11].numpy()).max() < 1e-5
    assert abs(out[1] - images[3].numpy()).max() < 1e-5


def test_rsray_evaluate_reads_a_registered_model_by_its_alias(trained, mlflow_server, capsys, tmp_path):
    """`tracking.register_as` registered the model with the alias <model>-<dataset>; `rsray evaluate
    models:/NAME@ALIAS` scores it as the checkpoint and logs into the run that trained it. The URI
    is resolved on --tracking-uri's server whatever the process's global MLflow URI is."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.cli import main

    _, result = trained
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")  # not the server: --tracking-uri must win
    version = MlflowClient(mlflow_server).get_model_version_by_alias(REGISTERED, ALIAS)
    assert version.source == f"models:/{result.model_id}" and version.run_id == result.mlflow_run_id
    uri = f"models:/{REGISTERED}@{ALIAS}"
    assert main(["evaluate", uri, "--tracking-uri", mlflow_server, "--no-mlflow"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{uri} (epoch {result.test_report['epoch']}) on test")
    assert f"{result.test_report['metrics']['mR']:.2f}" in printed
    assert main(["evaluate", f"models:/{result.model_id}", "--tracking-uri", mlflow_server, "--no-mlflow"]) == 0
    assert f"{result.test_report['metrics']['mR']:.2f}" in capsys.readouterr().out
    assert main(["evaluate", f"models:/{REGISTERED}@nowhere", "--tracking-uri", mlflow_server]) == 2
    assert f"models:/{REGISTERED}@nowhere: cannot be read from {mlflow_server}" in capsys.readouterr().err


@pytest.mark.parametrize("cache", ["always", "never"])
def test_a_cached_train_split_is_read_once_and_replayed(prepared, tmp_path, cache):
    """With the split cached, the epochs' pair stream no longer needs the shard files; without, it reads them.
    The shards are read by Ray Data's Parquet reader V1 (V2 lists files with 32 actors)."""
    import shutil

    from rsray.data.loader import read_split
    from rsray.data.pairs import image_number
    from rsray.data.stream import train_dataset
    from rsray.runtime import configure_data_context

    configure_data_context()
    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    cfg = load_config("train/cpu-tiny", [f"train.data={copy}", f"train.cache_train_split={cache}"])
    manifest = read_manifest(str(copy))
    pairs = train_dataset(cfg, manifest)
    expected = manifest["splits"]["train"]["captions"]
    assert pairs.count() == expected
    numbers = {row["image_index"] for row in pairs.select_columns(["image_index"]).take_all()}
    assert numbers == {image_number(i) for i in read_split(str(copy), "train")["image_id"].to_pylist()}
    if cache == "always":  # the read ran when the split was cached: its stats name the reader
        assert "ReadParquet" in pairs.stats() and "ListFiles" not in pairs.stats()
    shutil.rmtree(copy / "train")  # the shard files go away between epochs
    if cache == "always":
        assert pairs.count() == expected
        assert sorted(pairs.columns()) == ["caption", "image", "image_index", "scene_id", "tokens"]
    else:
        with pytest.raises(Exception, match="FileNotFound"):
            pairs.count()


def test_rsray_compare_prints_the_runs_own_test_numbers_and_logs_the_table(trained, mlflow_server, capsys):
    """The paper table from MLflow's records: the same numbers as the run's test/* metrics (the
    shared run alone, by --runs), in CSV; a compare run holds the three formats and two figures."""
    from mlflow import MlflowClient

    from pipelines.cli import main
    from rsray.compare import COLUMNS

    _, result = trained
    run_id = result.mlflow_run_id
    settings = [f"tracking.uri={mlflow_server}", "tracking.experiment=train-test"]
    assert main(["compare", "train/cpu-tiny", *settings, "--runs", run_id, "--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    header, row = out[0].split(","), out[1].split(",")
    assert row[:2] == ["vsepp", "1"]
    metrics = MlflowClient(mlflow_server).get_run(run_id).data.metrics
    for key, heading in COLUMNS:
        assert float(row[header.index(heading)]) == pytest.approx(metrics[key], abs=5e-5), key
    compare_id = out[-1].split()[4]
    client = MlflowClient(mlflow_server)
    assert client.get_run(compare_id).data.tags["rsray.kind"] == "compare"
    logged = {a.path for a in client.list_artifacts(compare_id, "compare")}
    assert logged == {"compare/table.md", "compare/table.csv", "compare/table.tex"}
    assert {a.path for a in client.list_artifacts(compare_id, "figures")} == {
        "figures/compare_mR.png",
        "figures/compare_recall.png",
    }
    assert main(["compare", "train/cpu-tiny", f"tracking.uri={mlflow_server}", "tracking.experiment=nope"]) == 2
    assert "MLflow has no experiment 'nope'" in capsys.readouterr().err
