"""rsray.logged_model: the MLflow model embeds a raw caption or image file exactly as evaluation
embeds the prepared shard row, loads from its own artifacts, and refuses bad rows by number."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from rsray.checkpoint import CONFIG_FILE, STATE_FILE
from rsray.config import load_config
from rsray.data.prepare import prepare_in_process
from rsray.data.synthetic import generate_sample
from rsray.eval.split import encode_split
from rsray.logged_model import (
    CHECKPOINT,
    FOLDER_PREFIX,
    EmbeddingModel,
    architecture_folders,
    preprocess_settings,
    registry_alias,
    write_artifacts,
)
from rsray.models import build_model, model_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A vsepp-tiny checkpoint over a prepared sample (in this process), its manifest's fields."""
    tmp = tmp_path_factory.mktemp("logged")
    generate_sample(tmp / "sample", n_images=30, image_size=48, seed=0, progress=False)
    cfg = load_config("model/vsepp-tiny", [f"data.root={tmp / 'sample'}", "prepare.image_size=40"])
    tables, vocab = prepare_in_process(cfg)
    manifest = {
        "dataset": "sample",
        "vocab": vocab.to_dict(),
        "tokenizer": None,
        "image_size": 40,
        "image_encoding": "jpeg",
        "config": cfg.public_dict(),
    }
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=len(vocab)).eval()
    folder = tmp / "checkpoint"
    folder.mkdir()
    torch.save(
        {"model": model.state_dict(), "epoch": 2, "optimizer": {"big": torch.zeros(3)}, "mlflow_run_id": "r1"},
        folder / STATE_FILE,
    )
    cfg.save(folder / CONFIG_FILE)
    return model, cfg, tables["test"], manifest, folder, tmp


def test_raw_caption_and_image_file_embed_as_evaluation_embeds_the_prepared_row(trained):
    model, cfg, table, manifest, folder, tmp = trained
    artifacts = write_artifacts(folder, manifest, tmp / "artifacts-a")
    served = EmbeddingModel()
    served.load(artifacts)
    images, texts = encode_split(model, table, model_config(cfg).augment)
    captions = [c for row in table["captions"].to_pylist() for c in row]
    files = [Path(p).read_bytes() for p in table["source_path"].to_pylist()]  # the original files
    assert len(files) >= 2
    frame = pd.DataFrame({"caption": captions[:7] + [None] * 2, "image": [None] * 7 + files[:2]})
    out = served.predict(None, frame)
    assert out.dtype == "float32" and out.shape == (9, texts.shape[1])
    torch.testing.assert_close(torch.from_numpy(out[:7]), texts[:7], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(out[7:]), images[:2], atol=1e-5, rtol=0)


def test_the_slim_checkpoint_keeps_weights_epoch_and_run_but_not_the_optimizer(trained):
    _, _, _, manifest, folder, tmp = trained
    artifacts = write_artifacts(folder, manifest, tmp / "artifacts-b")
    state = torch.load(Path(artifacts[CHECKPOINT]) / STATE_FILE, weights_only=True)
    assert set(state) == {"model", "epoch", "mlflow_run_id"} and state["epoch"] == 2
    settings = json.loads(Path(artifacts["preprocess"]).read_text())
    assert settings == preprocess_settings(manifest)
    assert (settings["image_size"], settings["jpeg_quality"], settings["vocab"]) == (40, 95, manifest["vocab"])


def test_rows_need_exactly_one_of_caption_or_image(trained):
    _, _, _, manifest, folder, tmp = trained
    served = EmbeddingModel()
    served.load(write_artifacts(folder, manifest, tmp / "artifacts-c"))
    with pytest.raises(ValueError, match="input row 1: give exactly one of caption or image, got none"):
        served.predict(None, pd.DataFrame({"caption": ["a river", None], "image": [None, None]}))
    with pytest.raises(ValueError, match=r"input row 0: .* got \['caption', 'image'\]"):
        served.predict(None, pd.DataFrame({"caption": ["a river"], "image": [b"x"]}))
    with pytest.raises(ValueError, match="expected `caption`"):
        served.predict(None, pd.DataFrame({"text": ["a river"]}))
    frame = pd.DataFrame({"caption": ["a river"] * 3 + [None], "image": [None] * 3 + [b"not an image file"]})
    with pytest.raises(ValueError, match=r"input row 3: "):  # a corrupt file names its row among many
        served.predict(None, frame)


def test_folders_that_define_the_model_travel_but_initial_weights_do_not(tmp_path):
    (tmp_path / "clip").mkdir()
    (tmp_path / "tok").mkdir()
    (tmp_path / "prior").mkdir()
    saved = {
        "model": {  # priorclip_open declares instruction_checkpoint an initial-weights key
            "name": "priorclip_open",
            "clip": {"checkpoint": str(tmp_path / "clip")},
            "instruction_checkpoint": str(tmp_path / "prior"),
            "lr": 1.0,
        },
        "data": {"tokenizer": str(tmp_path / "tok")},
    }
    assert architecture_folders(saved) == {
        "model.clip.checkpoint": str(tmp_path / "clip"),
        "data.tokenizer": str(tmp_path / "tok"),
    }
    assert FOLDER_PREFIX + "data.tokenizer" == "folder:data.tokenizer"


def test_each_model_declares_which_keys_are_initial_weights():
    from rsray.models.registry import initial_weight_keys

    assert initial_weight_keys("swan") == ("backbone_checkpoint", "glove_path")
    assert initial_weight_keys("priorclip") == ("backbone_checkpoint", "instruction_checkpoint")
    assert initial_weight_keys("priorclip_open") == ("instruction_checkpoint",)  # its CLIP folder is architecture
    assert initial_weight_keys("clip") == ()


def test_the_registry_alias_defaults_to_model_and_dataset():
    cfg = load_config("model/swan-tiny", ["data.name=rsicd"])
    assert registry_alias(cfg) == "swan-rsicd"
    cfg = load_config("model/swan-tiny", ["tracking.register_alias=best_fold0"])
    assert registry_alias(cfg) == "best_fold0"
    with pytest.raises(Exception, match="tracking.register_alias"):
        load_config("model/swan-tiny", ["tracking.register_alias=v3"])


def test_registration_on_a_local_store_moves_the_alias_to_each_new_version(trained, tmp_path):
    """The default store is a SQLite file: registering there must work too (MLflow checks a version's
    source against its global URI), and a second run's model becomes version 2 under the alias."""
    from mlflow import MlflowClient

    from rsray.logged_model import download_model, log_embedding_model
    from rsray.tracking import Tracker

    _, cfg, _, manifest, folder, _ = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for key, value in {"uri": uri, "register_as": "unit", "system_metrics": False}.items():
        setattr(cfg.tracking, key, value)
    ids = []
    for _ in range(2):
        tracker = Tracker.start(cfg.tracking, "run")
        model_id, registered = log_embedding_model(tracker, folder, manifest, cfg)
        tracker.end()
        assert registered == "models:/unit@vsepp-rsray_sample" and not tracker.not_logged
        ids.append(model_id)
    version = MlflowClient(uri).get_model_version_by_alias("unit", "vsepp-rsray_sample")
    assert str(version.version) == "2" and version.source == f"models:/{ids[1]}"
    checkpoint = download_model("models:/unit@vsepp-rsray_sample", uri, tmp_path / "down")
    assert torch.load(Path(checkpoint) / STATE_FILE, weights_only=True)["epoch"] == 2
