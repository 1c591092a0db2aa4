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
