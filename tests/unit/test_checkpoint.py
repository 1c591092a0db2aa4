"""rsray.eval.checkpoint: a saved run loads safely, without the files that gave it its initial weights."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from rsray.checkpoint import CONFIG_FILE, STATE_FILE
from rsray.config import load_config
from rsray.eval.checkpoint import load_checkpoint
from rsray.models import build_model

WORDS = ["<pad>", "<unk>", "river", "beach"] + [f"w{i}" for i in range(36)]


def save_run(tmp_path, *overrides: str):
    """A model built as training builds it, saved the way `rsray train` saves a checkpoint."""
    data = tmp_path / "prepared"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"vocab": {"words": WORDS}, "splits": {}}))
    cfg = load_config("model/vsepp-tiny", [f"train.data={data}", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, vocab=WORDS)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save({"model": model.state_dict(), "epoch": 3}, folder / STATE_FILE)
    cfg.save(folder / CONFIG_FILE)
    return model, folder


def test_a_checkpoint_loads_without_its_pretrained_backbone_and_word_vectors(tmp_path):
    backbone = tmp_path / "test_resnet.pth"
    torch.manual_seed(1)
    torch.save(timm.create_model("test_resnet").state_dict(), backbone)
    vectors = tmp_path / "glove.txt"
    vectors.write_text("river " + " ".join(["0.5"] * 16) + "\n")
    trained, folder = save_run(tmp_path, f"model.backbone_checkpoint={backbone}", f"model.glove_path={vectors}")
    backbone.unlink()  # e.g. a cluster's /mnt/weights, evaluated on a laptop
    vectors.unlink()
    model, cfg, state = load_checkpoint(str(folder))
    assert cfg.model["backbone_checkpoint"] == str(backbone)  # the run's config is reported as it was
    assert state["epoch"] == 3 and not model.training
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_folder_without_state_is_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="state.pt: not found .* an rsray checkpoint folder"):
        load_checkpoint(str(tmp_path))


def test_other_data_must_tokenize_as_the_checkpoints_did(tmp_path):
    """`rsray evaluate --data`: the same word vocabulary and stop-word rule, or a one-line refusal."""
    import json

    from rsray.config import load_config
    from rsray.eval.checkpoint import check_same_tokens

    def prepared(name: str, words: list[str], stopwords: str | None) -> str:
        folder = tmp_path / name
        folder.mkdir()
        vocab = {"min_count": 5, "words": words, **({"stopwords": stopwords} if stopwords else {})}
        (folder / "manifest.json").write_text(json.dumps({"vocab": vocab}))
        return str(folder)

    words = ["<pad>", "<unk>", "airport", "plane"]
    cfg = load_config("model/swan-tiny", [f"train.data={prepared('trained', words, None)}"])
    check_same_tokens(cfg, prepared("same", words, "drop"))  # an old manifest dropped stop words too
    with pytest.raises(ValueError, match=r"unk: prepared with data.stopwords=unk, the checkpoint trained on drop"):
        check_same_tokens(cfg, prepared("unk", words, "unk"))
    with pytest.raises(ValueError, match=r"its word vocabulary \(3 entries\) is not the one the checkpoint trained"):
        check_same_tokens(cfg, prepared("other", words[:3], "drop"))


def test_an_untracked_checkpoint_is_evaluated_without_mlflow():
    from rsray.config import load_config
    from rsray.eval.record import log_to_checkpoint_run

    report = {"mlflow_run_id": None, "data": "d", "split": "test"}
    line = log_to_checkpoint_run(load_config("model/swan-tiny", ["tracking.enabled=false"]), report)
    assert line == "not logged to MLflow: the checkpoint's run was not tracked"
    line = log_to_checkpoint_run(load_config("model/swan-tiny"), report)  # tracked config, no run recorded
    assert line == "not logged to MLflow: the checkpoint's run was not tracked"


def test_an_unreachable_tracking_server_is_a_warning_at_once():
    import socket
    import time

    from rsray.config import load_config
    from rsray.eval.record import log_to_checkpoint_run

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config("model/swan-tiny", [f"tracking.uri=http://user:secret@127.0.0.1:{port}"])
    started = time.monotonic()
    line = log_to_checkpoint_run(cfg, {"mlflow_run_id": "abc", "data": cfg.train.data, "split": "test"})
    assert line.startswith("warning: not logged to MLflow:") and "secret" not in line
    assert time.monotonic() - started < 10


def test_rsray_evaluate_ends_a_run_left_running_by_a_dead_driver_and_no_other(tmp_path, monkeypatch):
    """Evaluating a checkpoint in its run's folder logs into that run; when the run is still RUNNING
    and no live driver holds the folder's lock, its driver died (a driver holds the lock until it
    has ended the run), so the run is marked KILLED. A live holder, or a checkpoint copied out of
    its run folder, leaves the run as it is."""
    import json
    import socket
    import subprocess
    import sys
    import time

    from mlflow import MlflowClient

    from rsray.checkpoint import RUN_LOCK_FILE, SNAPSHOT_FILE
    from rsray.config import load_config
    from rsray.eval.record import log_to_checkpoint_run
    from rsray.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config("model/vsepp-tiny", [f"tracking.uri={uri}", "tracking.system_metrics=false", "train.run_name=r"])
    client = MlflowClient(uri)
    run_folder = tmp_path / "runs" / "r"
    checkpoint = run_folder / "checkpoint_2026-12-06_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    (run_folder / SNAPSHOT_FILE).write_text("{}")
    copied_out = tmp_path / "elsewhere" / "r" / checkpoint.name  # named like its run, no snapshot beside it
    copied_out.mkdir(parents=True)

    def evaluate(folder) -> tuple[str, str]:
        run_id = Tracker.start(cfg.tracking, "r").run_id  # RUNNING: its driver never ends it
        report = {"mlflow_run_id": run_id, "checkpoint": str(folder), "data": cfg.train.data, "split": "test"}
        report.update(epoch=1, metrics={"mR": 50.0}, smr_metrics={}, smr={}, ranks={}, image_ids=[])
        line = log_to_checkpoint_run(cfg, report)
        return line, client.get_run(run_id).info.status

    line, status = evaluate(checkpoint)
    assert status == "KILLED" and line.endswith("; it was left RUNNING by a driver that died: marked KILLED"), line
    assert evaluate(copied_out)[1] == "RUNNING"

    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live driver's process
    try:
        record = {"host": socket.gethostname(), "pid": driver.pid, "started": time.time(), "heartbeat": time.time()}
        (run_folder / RUN_LOCK_FILE).write_text(json.dumps(record))
        line, status = evaluate(checkpoint)
        assert status == "RUNNING" and "KILLED" not in line, line
    finally:
        driver.kill()
        driver.wait()
    line, status = evaluate(checkpoint)  # the lock's process is gone now
    assert status == "KILLED", line


def test_write_checkpoint_writes_what_read_checkpoint_reads(tmp_path):
    """The layout both ways in one module: a training checkpoint written by `write_checkpoint` loads
    with weights_only (tensors and plain data) and its config.yaml names the run's settings."""
    from rsray.checkpoint import read_checkpoint, write_checkpoint
    from rsray.train.rng import rng_state

    cfg = load_config("model/vsepp-tiny", ["train.seed=7"])
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    history = [{"epoch": 0, "val/mR": 12.5}]
    write_checkpoint(
        tmp_path,
        cfg,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        epoch=0,
        rng=rng_state(),
        lr_scale=0.5,
        metrics=history[0],
        history=history,
        mlflow_run_id="abc",
    )
    state, config = read_checkpoint(str(tmp_path))
    assert set(state) == {
        "model",
        "optimizer",
        "scheduler",
        "epoch",
        "rng",
        "lr_scale",
        "metrics",
        "history",
        "mlflow_run_id",
    }
    assert torch.equal(state["model"]["weight"], model.weight.detach())
    assert (state["epoch"], state["lr_scale"], state["mlflow_run_id"], state["history"]) == (0, 0.5, "abc", history)
    assert config["train"]["seed"] == 7 and config["model"]["name"] == "vsepp"


def _mapped_from(path, tensor: torch.Tensor) -> bool:
    """Whether the tensor's memory lies in a mapping of `path` (/proc/self/maps)."""
    address = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)  # range, permissions, offset, device, inode[, path]
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return len(fields) == 6 and fields[5].strip() == str(path)
    return False


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_checkpoint_maps_the_state_file_instead_of_holding_it_twice(where, tmp_path, request):
    """A scoring command reads the weights only: the state file is memory-mapped (from S3, after a
    download to a file), so the optimizer's moments are never in memory. Held as bytes and then
    as tensors, CMPAGL's 2.1 GiB checkpoint put the driver at 5.3 GB (make bench-paper-size)."""
    from rsray import storage
    from rsray.checkpoint import read_checkpoint

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    weights = {"weight": torch.arange(1 << 20, dtype=torch.float32)}  # 4 MiB: its own mapping
    torch.save({"model": weights, "epoch": 3}, folder / STATE_FILE)
    (folder / CONFIG_FILE).write_text("model: {name: vsepp}\n")
    uri = str(folder)
    if where == "s3":
        uri = f"s3://{request.getfixturevalue('s3_bucket')}/mapped/checkpoint"
        for name in (STATE_FILE, CONFIG_FILE):
            storage.write_bytes(storage.resolve(f"{uri}/{name}"), (folder / name).read_bytes())
    state, config = read_checkpoint(uri)
    assert torch.equal(state["model"]["weight"], weights["weight"]) and state["epoch"] == 3
    assert config["model"]["name"] == "vsepp"
    if where == "local":
        assert _mapped_from(folder / STATE_FILE, state["model"]["weight"])
    else:  # the downloaded file's name is gone; its mapping stays
        maps = open("/proc/self/maps").read()
        assert f"{STATE_FILE} (deleted)" in maps
