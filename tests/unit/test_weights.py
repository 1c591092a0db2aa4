"""Initial weights by the ecosystem's names, offline: a Hugging Face cache written by the test in the
layout huggingface_hub keeps (refs/main naming a commit, snapshots/<commit>/ holding the files),
read through huggingface_hub itself with HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at it (both are
read when huggingface_hub is imported, so each check runs in a process of its own, as a command would)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsray.pretrained import minilm_path
from rsray.weights import WeightsError, resolve, sha256_of, split_digest

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TIMM = "timm/resnet10t.c3_in1k"


def _cached_repo(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """`repo` in the Hub cache at `cache`, its files linked as huggingface_hub links its blobs."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    for name, source in files.items():
        (snapshot / name).symlink_to(source)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """MiniLM (the packaged folder) as `sentence-transformers/all-MiniLM-L6-v2`, and a resnet10t's
    weights as timm's `timm/resnet10t.c3_in1k`, in a Hub cache of their own."""
    import timm
    from safetensors.torch import save_file

    cache = tmp_path_factory.mktemp("hf-cache")
    packaged = minilm_path()
    _cached_repo(cache, MINILM, {p.name: p for p in packaged.iterdir() if p.is_file()})
    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("blobs") / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()}, str(weights))
    config = weights.with_name("config.json")
    config.write_text(json.dumps({"architecture": "resnet10t", "num_classes": 1000}))
    _cached_repo(cache, TIMM, {"model.safetensors": weights, "config.json": config})
    return cache


def _resolve_offline(cache: Path, script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)


def test_hub_names_resolve_from_the_cache_offline_and_build_the_models_with_them(hub_cache):
    weights_file = hub_cache / f"models--{TIMM.replace('/', '--')}" / "snapshots" / COMMIT / "model.safetensors"
    digest = sha256_of(weights_file.resolve())
    script = f"""
import json, torch
from rsray.weights import resolve
from rsray.models.encoders import TimmBackbone, TransformerTextEncoder
text = resolve({MINILM!r}, fetch=True)  # the driver's call: offline, the cache is all it may use
image = resolve("hf-hub:{TIMM}#sha256={digest}", fetch=True, want_file=True)
encoder = TransformerTextEncoder({MINILM!r})
backbone = TimmBackbone("resnet10t", checkpoint="hf-hub:{TIMM}")
print(json.dumps(dict(text=str(text.path), text_revision=text.revision, image=str(image.path),
                      image_record=image.record(), width=encoder.model.config.hidden_size,
                      conv1=float(backbone.body.conv1[0].weight.sum()))))
"""
    done = _resolve_offline(hub_cache, script)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["text"] == str(hub_cache / f"models--{MINILM.replace('/', '--')}" / "snapshots" / COMMIT)
    assert found["text_revision"] == COMMIT and found["width"] == 384  # MiniLM-L6's width
    assert found["image"] == str(weights_file)
    assert found["image_record"] == f"hf-hub:{TIMM}; revision {COMMIT}; sha256 {digest}"
    torch.manual_seed(0)
    import timm

    expected = timm.create_model("resnet10t").state_dict()["conv1.0.weight"].sum()
    assert found["conv1"] == pytest.approx(float(expected))  # the cached weights, not a fresh init


def test_a_name_the_cache_lacks_offline_is_one_line_naming_it(tmp_path):
    done = _resolve_offline(tmp_path, f"from rsray.weights import resolve\nresolve({MINILM!r}, fetch=True)")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rsray.weights.WeightsError: {MINILM}: not in the Hugging Face cache ({tmp_path})")
    assert "offline (HF_HUB_OFFLINE)" in last


def test_a_wrong_sha256_is_refused_naming_both_digests(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save({"w": torch.ones(2)}, weights)
    actual = sha256_of(weights)
    assert resolve(f"{weights}#sha256={actual}").sha256 == actual
    wrong = "0" * 64
    with pytest.raises(WeightsError, match=rf"^{weights}: sha256 {actual}, but the config asks for {wrong}$"):
        resolve(f"{weights}#sha256={wrong}")
    with pytest.raises(WeightsError, match="64 hex digits"):
        split_digest(f"{weights}#sha256=abc")


def test_local_paths_and_aliases_come_first_and_anything_else_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()  # a relative local folder shaped like a Hub id
    assert resolve("org/name").source == "local"
    assert resolve("minilm").source == "package" and resolve("minilm").path == minilm_path()
    with pytest.raises(WeightsError, match=r"^not a name: no such local file or folder, and not a Hub name"):
        resolve("not a name")


def test_the_driver_resolves_every_initial_weights_value_of_a_model_section_once(tmp_path):
    from rsray.weights import fetch_all

    weights, folder = tmp_path / "w.pth", tmp_path / "clip"
    torch.save({"w": torch.ones(2)}, weights)
    folder.mkdir()
    digest = sha256_of(weights)
    section = {
        "backbone_checkpoint": f"{weights}#sha256={digest}",
        "clip": {"checkpoint": str(folder)},  # nested sections too
        "instruction_checkpoint": "train",  # an earlier stage rsray trains first
        "text_checkpoint": None,
        "glove_path": str(weights),  # word vectors: not a checkpoint key
        "remote_checkpoint": "s3://bucket/stage-1/checkpoint_000",  # a checkpoint folder: its own code reads it
    }
    found = {key: resolved.record() for key, resolved in fetch_all(section).items()}
    assert found == {"model.backbone_checkpoint": f"{weights}; sha256 {digest}", "model.clip.checkpoint": str(folder)}
    with pytest.raises(WeightsError, match="but the config asks for"):
        fetch_all({"backbone_checkpoint": f"{weights}#sha256={'1' * 64}"})


def test_a_wrong_sha256_refuses_the_run_in_one_line_naming_the_key_exit_2(tmp_path, capsys):
    from rsray.cli import run_cli
    from rsray.config import ConfigError, load_config
    from rsray.train.plan import fetch_initial_weights

    weights = tmp_path / "w.pth"
    torch.save({"w": torch.ones(2)}, weights)
    cfg = load_config("train/cpu-tiny", [f"model.backbone_checkpoint={weights}#sha256={'0' * 64}"])
    with pytest.raises(ConfigError) as refused:
        fetch_initial_weights(cfg)
    message = str(refused.value)
    assert message.startswith(f"command line: model.backbone_checkpoint: {weights}: sha256 ") and "\n" not in message
    assert run_cli(lambda: fetch_initial_weights(cfg)) == 2
    assert capsys.readouterr().err.strip() == f"rsray: error: {message}"
    named = load_config("train/cpu-tiny", [f"model.backbone_checkpoint={weights}#sha256={sha256_of(weights)}"])
    assert fetch_initial_weights(named) == {"model.backbone_checkpoint": f"{weights}; sha256 {sha256_of(weights)}"}


def test_rsray_weights_fetch_places_a_hub_folder_from_the_cache(hub_cache, tmp_path):
    """`rsray weights fetch minilm` (a catalog name whose source is a Hub name) goes through the Hub
    cache, offline here, and writes the model's folder under its own name with a .json record."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "rsray.pipelines.weights", "fetch", "minilm", "--to", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    placed = out / "all-MiniLM-L6-v2"
    packaged = minilm_path()
    assert sorted(p.name for p in placed.iterdir()) == sorted(p.name for p in packaged.iterdir() if p.is_file())
    assert (placed / "model.safetensors").read_bytes() == (packaged / "model.safetensors").read_bytes()
    record = json.loads((out / "all-MiniLM-L6-v2.json").read_text())
    assert record["source"] == MINILM and record["bytes"] == sum(p.stat().st_size for p in placed.iterdir())


def test_an_s3_weights_file_is_copied_once_per_machine_and_builds_the_model(
    s3_bucket, s3_endpoint, tmp_path, monkeypatch
):
    """Two processes (as two Train workers on one node) resolve the same s3:// weights file at
    once: one copies it into the shared cache under the file lock, the other reads that copy; the
    digest is checked, the driver's record names it, and the backbone built from it holds its weights."""
    import boto3
    import timm
    from safetensors.torch import save_file

    from rsray.models.encoders import TimmBackbone
    from rsray.weights import fetch_all

    torch.manual_seed(3)
    state = {k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()}
    local = tmp_path / "resnet10t.safetensors"
    save_file(state, str(local))
    digest = sha256_of(local)
    boto3.client("s3", endpoint_url=s3_endpoint).upload_file(str(local), s3_bucket, "weights/resnet10t.safetensors")
    value = f"s3://{s3_bucket}/weights/resnet10t.safetensors#sha256={digest}"
    env = {**os.environ, "RSRAY_WEIGHTS_CACHE": str(tmp_path / "cache")}
    script = f"""
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
from rsray.weights import resolve
print(resolve({value!r}, want_file=True).path)
"""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in outputs]
    cached = tmp_path / "cache" / "s3" / s3_bucket / "weights" / "resnet10t.safetensors"
    assert {out.strip() for out, _ in outputs} == {str(cached)} and cached.read_bytes() == local.read_bytes()
    assert sum(err.count("rsray.weights " + f"s3://{s3_bucket}") for _, err in outputs) == 1  # one copy
    monkeypatch.setenv("RSRAY_WEIGHTS_CACHE", str(tmp_path / "cache"))
    found = fetch_all({"backbone": "resnet10t", "backbone_checkpoint": value})
    backbone = TimmBackbone("resnet10t", checkpoint=value)
    assert (
        found["model.backbone_checkpoint"].record()
        == f"s3://{s3_bucket}/weights/resnet10t.safetensors; sha256 {digest}"
    )
    assert torch.equal(backbone.body.conv1[0].weight, state["conv1.0.weight"])
    with pytest.raises(WeightsError, match="an s3:// weights value names one file"):
        resolve(f"s3://{s3_bucket}/weights/")


def test_a_torchvision_weights_name_resolves_from_torchs_cache_and_builds_a_timm_backbone(tmp_path, monkeypatch):
    """`torchvision:ResNet18_Weights.IMAGENET1K_V1` is the file torch.hub keeps for that enum member
    (written here as a timm ResNet-18's weights, which share torchvision's names): the backbone
    built from the name holds them. Without it in the cache and without fetch, one line naming it."""
    import timm

    from rsray.models.encoders import TimmBackbone

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    name = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    with pytest.raises(WeightsError, match=f"{name}: not in torch's hub cache .* not fetched on this machine"):
        resolve(name)
    torch.manual_seed(5)
    state = timm.create_model("resnet18").state_dict()
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"  # the enum's URL's file name
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    found = resolve(name, fetch=True)  # in the cache: nothing to download
    assert found.path == cached and found.source == "torchvision"
    backbone = TimmBackbone("resnet18", checkpoint=name)
    assert torch.equal(backbone.body.conv1.weight, state["conv1.weight"])
    with pytest.raises(WeightsError, match="torchvision:ResNet18_Weights.NOPE: not a torchvision weights name"):
        resolve("torchvision:ResNet18_Weights.NOPE")
