"""VSE++, SWAN and CMPAGL (tiny presets) learn retrieval on the embedded sample: one process, no Ray.

The shards are made in-process by the prepare stage's own per-batch code; training is the plain
PyTorch core that Ray Train wraps. A trained model must reach at least 3x the test mR of the
same model untrained. 500 images (400 to train on, 50 to test) and 2 epochs keep a clear margin
(measured with resnet10t: VSE++ 9.2 -> 51.5, SWAN 10.3 -> 44.0; CMPAGL's ITC stage 10.1 -> 42.4; with seed 1,
5.7x and 5.6x for the first two) in under a minute;
1,000 images and 4 epochs took three and a half.
"""

from __future__ import annotations

import pytest
import torch

from rsray.config import load_config
from rsray.data.loader import make_train_loader
from rsray.data.prepare import prepare_in_process
from rsray.data.synthetic import generate_sample
from rsray.eval.split import evaluate
from rsray.models import build_model, model_config
from rsray.optim import make_optimizer
from rsray.train.loop import train_epoch

pytestmark = pytest.mark.integration

EPOCHS = 2
IMAGES = 500


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    generate_sample(root, n_images=IMAGES, image_size=64, seed=0, progress=False)
    cfg = load_config("presets/cpu-tiny", [f"data.root={root}", "prepare.image_size=64"])
    return prepare_in_process(cfg)


@pytest.mark.parametrize("name", ["vsepp", "swan", "cmpagl"])
def test_tiny_model_learns_retrieval_on_the_sample(name, shards):
    tables, vocab = shards
    torch.manual_seed(0)
    cfg = load_config(f"model/{name}-tiny")
    model, model_cfg = build_model(cfg, vocab_size=len(vocab)), model_config(cfg)
    before = evaluate(model, tables["test"], model_cfg.augment)

    optimizer, schedule = make_optimizer(model, model_cfg)
    loader = make_train_loader(tables["train"], model_cfg.augment, batch_size=32, seed=0)
    for epoch in range(EPOCHS):
        stats = train_epoch(model, loader, optimizer)
        schedule.step()
        print(f"{name} epoch {epoch}: loss {stats.losses['total']:.3f}, {stats.pairs_per_second:.0f} pairs/s")
    after = evaluate(model, tables["test"], model_cfg.augment)
    print(
        f"{name}: test mR untrained {before['mR']:.2f} -> trained {after['mR']:.2f} "
        f"(i2t R@1 {after['i2t_R1']:.1f}, t2i R@1 {after['t2i_R1']:.1f}, t2i SR@1 {after['t2i_SR1']:.1f})"
    )
    assert after["mR"] >= 3 * before["mR"]
    if name == "cmpagl":  # its ITM stage re-scores the top k (measured: 10.5 -> 42.1; seed 1 10.1 -> 31.9)
        assert after["itm_mR"] >= 3 * before["itm_mR"]
