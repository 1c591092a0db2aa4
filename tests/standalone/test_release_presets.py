"""The authors'-release presets train end to end through `rsray train`, as a user runs them: the
tiny forms of model/swan-release and model/priorclip-release (sizes/*-tiny.yaml under the release's
switches) on real Ray Train with 2 DDP workers. Each test checks that the release's switches
reached the run (its saved config) and that the one with a visible side effect had it: both
releases keep a frozen CNN's BatchNorm in train mode, so its running statistics move although its
weights take no gradient."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipelines.cli import main
from rsray.checkpoint import CONFIG_FILE, STATE_FILE
from rsray.config import load_config
from tests.unit.test_swan_release import SWITCHES

pytestmark = pytest.mark.integration


def train_preset(name: str, prepared: str, storage: Path, *extra: str, epochs: int = 1) -> tuple[dict, dict]:
    """`rsray train model/<name>` on 2 workers for `epochs` (the presets say 2; one shows every
    switch but the per-step schedule); (the last checkpoint's saved config, its state)."""
    code = main(
        [
            "train",
            f"model/{name}",
            f"train.data={prepared}",
            f"train.storage_path={storage}",
            f"train.run_name={name}",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            "tracking.enabled=false",
            f"train.epochs={epochs}",
            *extra,
        ]
    )
    assert code == 0
    checkpoints = sorted(p for p in (storage / name).glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == epochs  # every epoch's checkpoint is kept (keep_checkpoints 2)
    state = torch.load(checkpoints[-1] / STATE_FILE, weights_only=True)
    saved = load_config(checkpoints[-1] / CONFIG_FILE)
    assert all(math.isfinite(v) for k, v in state["metrics"].items() if k.startswith(("train/", "val/")))
    return saved.model, state


def frozen_bn_statistics(model_state: dict, prefix: str) -> dict[str, torch.Tensor]:
    stats = {k: v for k, v in model_state.items() if k.startswith(prefix) and k.endswith("running_mean")}
    assert stats, f"no BatchNorm under {prefix}"
    return stats


@pytest.fixture(scope="module")
def prepared_keeping_stopwords(ray_cluster, tmp_path_factory) -> str:
    """A tiny sample prepared as SWAN's release tokenizes: stop words kept as <unk>."""
    from rsray.data.manifest import read_manifest
    from rsray.data.prepare import prepare
    from rsray.data.synthetic import generate_sample

    root = tmp_path_factory.mktemp("sample-unk")
    generate_sample(root, n_images=60, image_size=64, seed=1, progress=False)
    output = tmp_path_factory.mktemp("prepared-unk") / "sample"
    overrides = [f"data.root={root}", f"prepare.output={output}", "data.stopwords=unk"]
    prepare(load_config("presets/cpu-tiny", overrides))
    assert read_manifest(str(output))["vocab"]["stopwords"] == "unk"
    return str(output)


def test_swan_release_refuses_data_prepared_with_stop_words_dropped(prepared, tmp_path, capsys):
    runs = tmp_path / "runs"
    code = main(["train", "model/swan-release-tiny", f"train.data={prepared}", f"train.storage_path={runs}"])
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "data.stopwords: is unk, but" in line and "prepared with stopwords drop" in line
    assert not list(runs.rglob("checkpoint_*"))  # refused before any worker started


def test_swan_release_tiny_trains_with_every_release_switch(prepared_keeping_stopwords, tmp_path):
    """Also starts from a backbone weights file named with its sha256 (`rsray.weights`): the frozen
    weights in the checkpoint are the file's, and the checkpoint records what it started from."""
    import timm

    from rsray.weights import sha256_of

    weights = tmp_path / "test_resnet.pth"
    torch.manual_seed(7)
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    digest = sha256_of(weights)
    named = f"model.backbone_checkpoint={weights}#sha256={digest}"
    model, saved = train_preset("swan-release-tiny", prepared_keeping_stopwords, tmp_path, named)
    state = saved["model"]
    expected = {**SWITCHES, "wsa_activation": "gelu", "freeze_backbone": True}
    assert {k: model[k] for k in expected} == expected
    assert saved["initial_weights"] == {"model.backbone_checkpoint": f"{weights}; sha256 {digest}"}
    started_from = torch.load(weights, weights_only=True)
    frozen = {k: v for k, v in state.items() if k.startswith("visual.backbone.") and k.endswith("conv1.weight")}
    assert frozen
    assert all(torch.equal(v, started_from[k.split("visual.backbone.body.", 1)[1]]) for k, v in frozen.items())
    # timm starts BatchNorm at mean 0: batch statistics moved it although the backbone is frozen
    stats = frozen_bn_statistics(state, "visual.backbone.")
    assert all(v.abs().max() > 0 for v in stats.values())


def test_priorclip_release_tiny_trains_with_every_release_switch(prepared, tmp_path):
    model, saved = train_preset("priorclip-release-tiny", prepared, tmp_path)
    state = saved["model"]
    expected = {
        "belief": "hard",
        "pae_ffn_norm": True,
        "affiliation_centres": "sample",
        "affiliation_t2i_transposed": True,
        "affiliation_local_centres": True,
        "instruction_bn": "train",
        "decay_exempt": "pir",
    }
    assert {k: model[k] for k in expected} == expected
    assert model["augment"]["rand_augment_impl"] == "blip" and model["augment"]["rand_augment"] == [2, 7]
    # the PAE feed-forward LayerNorm the release adds is in the trained state
    # (Linear, LayerNorm, GELU, Linear): without the switch, position 1 is the GELU and has no weight
    assert any(k.endswith(".ffn.1.weight") and v.dim() == 1 for k, v in state.items())
    stats = frozen_bn_statistics(state, "instruction.backbone.")
    assert all(v.abs().max() > 0 for v in stats.values())


def test_priorclip_open_release_tiny_trains_with_every_release_switch(prepared, tmp_path):
    model, saved = train_preset("priorclip_open-release-tiny", prepared, tmp_path, epochs=2)
    expected = {
        "belief": "token_norm_index",
        "freeze_text": False,
        "shared_logit_scale": True,
        "affiliation_centres": "sample",
        "affiliation_local_centres": True,
        "contrastive_positives": "pair",
        "weight_decay": 0.5,
        "betas": [0.9, 0.999],
        "schedule": "cosine_warmup",
    }
    assert {k: model[k] for k in expected} == expected
    assert not any(k.startswith("affiliation_scale.") for k in saved["model"])  # CLIP's scale only
    # 480 pairs / 2 workers / 16 = 15 steps an epoch; 10 warm-up steps, then a cosine to 0 at step 30:
    # the lr logged as epoch 1 starts (step 15) is lr * (1 + cos(pi * 5 / 20)) / 2
    lrs = [m["lr"] for m in saved["history"]]
    assert lrs[0] == 0 and lrs[1] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 5 / 20)) / 2)
