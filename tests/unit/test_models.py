"""Models: every registered model's tiny preset builds, trains and keeps the contract; SWAN's parts
and paper-size parameter counts; encoders (timm backbone, GloVe file, BiGRU); the registry."""

import math
import re
import time

import pytest
import timm
import torch

from rsray.config import ConfigError, load_config
from rsray.eval.scoring import take_rows
from rsray.models import build_model, model_config, registered_models
from rsray.models.base import RetrievalModel
from rsray.models.blocks import JRU, WSA
from rsray.models.encoders import BiGRU, TimmBackbone, WordEmbedding, read_word_vectors
from rsray.models.swan import SwanVisualEncoder

# each model's loss terms and the config key weighting each in `total` (None: weight 1)
TERM_WEIGHTS = {
    "vsepp": {"triplet": None},
    "swan": {"triplet": None},
    "clip": {"info_nce": None},
    "dove": {"triplet": None, "global": "lambda_g"},
    "priorclip": {"info_nce": None, "affiliation": "lambda_cs"},
    "priorclip_open": {"info_nce": None, "affiliation": "lambda_cs"},
    "scene_prior": {"image_ce": None, "caption_ce": "caption_weight"},
    "cmpagl": {"itc": "w_itc", "triplet": "w_triplet", "intra": "w_intra", "itm": "w_itm", "mlm": "w_mlm"},
}
UNTRAINED = "model.allow_random_frozen_backbone=true"  # paper-sized shapes without the weights: nothing downloads
VOCAB = 40
MODELS = registered_models()


def tiny(name: str, *overrides: str):
    return load_config(f"model/{name}-tiny", list(overrides))


def build_tiny(name: str, *overrides: str, seed: int = 0) -> RetrievalModel:
    torch.manual_seed(seed)
    return build_model(tiny(name, *overrides), vocab_size=VOCAB)


def random_batch(batch: int = 8, max_len: int = 9, size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch in base.py's format; pairs 0/1 and 4/5 show the same image."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    lengths[0], lengths[1] = 1, max_len  # the shortest and longest captions
    tokens = torch.randint(2, VOCAB, (batch, max_len), generator=g)
    tokens[torch.arange(max_len)[None, :] >= lengths[:, None]] = 0
    return {
        "images": torch.randn(batch, 3, size, size, generator=g),
        "tokens": tokens,
        "lengths": lengths,
        "image_ids": torch.tensor([0, 0, 1, 2, 3, 3, 4, 5][:batch]),
        "scene_ids": torch.tensor([0, 0, 1, -1, 2, 2, 1, 0][:batch]),
    }


# ----------------------------------------------------------------------------- every model


@pytest.mark.parametrize("name", MODELS)
def test_tiny_model_trains_a_step(name):
    model = build_tiny(name)
    assert isinstance(model, RetrievalModel)
    model.train()
    batch = random_batch()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for _ in range(3):  # timed for information only: the machine is shared, so no timed assertion
        start = time.perf_counter()
        losses = model.loss(batch)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        times.append(time.perf_counter() - start)
    print(f"{name} tiny: fastest of 3 training steps {min(times) * 1000:.0f} ms")
    weights = TERM_WEIGHTS[name]
    assert "total" in losses and set(losses) - {"total"} <= set(weights) and len(losses) >= 2, losses
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values()), losses
    cfg = model_config(tiny(name))  # total = the terms, each times its configured weight
    expected = sum(
        value * (getattr(cfg, weights[key]) if weights[key] else 1.0) for key, value in losses.items() if key != "total"
    )
    torch.testing.assert_close(losses["total"], expected)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainable) > 0.9 * len(trainable)


@pytest.mark.parametrize("name", MODELS)
def test_tiny_model_trains_under_bf16_autocast(name):
    """`train.amp: bf16` (the default on GPU), here on CPU: every op of every model has a bf16 path
    or is cast by autocast; the loss matches fp32's to bf16 precision and the same weights (kept
    in fp32) get gradients."""

    def one_step(amp: bool):
        model = build_tiny(name)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            losses = model.loss(random_batch())
        losses["total"].backward()
        learning = {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        assert all(p.dtype == torch.float32 for p in model.parameters())
        return losses["total"].item(), learning

    full_loss, full_learning = one_step(amp=False)
    bf16_loss, bf16_learning = one_step(amp=True)
    assert math.isfinite(bf16_loss) and bf16_loss == pytest.approx(full_loss, rel=0.05)
    assert bf16_learning == full_learning


@pytest.mark.parametrize("name", MODELS)
def test_scores_stay_fp32_under_bf16_autocast(name):
    """The similarity matrix the losses mine negatives from is computed in fp32 even when the
    encoders run in bf16 (`full_precision_scores`)."""
    model = build_tiny(name).eval()
    batch = random_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model.score(model.encode_images(batch), model.encode_texts(batch))
    assert scores.dtype == torch.float32 and scores.shape == (8, 8)


@pytest.mark.parametrize("name", MODELS)
def test_tiny_model_embeddings_and_scores(name):
    model = build_tiny(name).eval()
    if not model.two_tower:
        pytest.skip("pairwise score: test_tiny_pairwise_model_scores")
    batch = random_batch()
    with torch.no_grad():
        img, txt = model.encode_images(batch), model.encode_texts(batch)
        scores = model.score(img, txt[:5])
    d = model_config(tiny(name)).embed_dim
    assert img.shape == (8, d) and txt.shape == (8, d)
    assert torch.allclose(img.norm(dim=-1), torch.ones(8), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(8), atol=1e-5)
    assert scores.shape == (8, 5) and torch.allclose(scores, img @ txt[:5].t())
    # a caption's embedding does not depend on how much padding its batch has
    longer = dict(batch, tokens=torch.nn.functional.pad(batch["tokens"], (0, 4)))
    with torch.no_grad():
        assert torch.allclose(model.encode_texts(longer), txt, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_tiny_pairwise_model_scores(name):
    """Pairwise models: score has the block's shape, and is the same whatever the captions' padding."""
    model = build_tiny(name).eval()
    if model.two_tower:
        pytest.skip("two-tower: test_tiny_model_embeddings_and_scores")
    batch = random_batch()
    longer = dict(batch, tokens=torch.nn.functional.pad(batch["tokens"], (0, 4)))
    with torch.no_grad():
        img, txt = model.encode_images(batch), model.encode_texts(batch)
        scores = model.score(img, take_rows(txt, 0, 5))
        padded = model.score(img, take_rows(model.encode_texts(longer), 0, 5))
    assert scores.shape == (8, 5) and torch.isfinite(scores).all()
    assert torch.allclose(padded, scores, atol=1e-5)


# What must fall to 60% in 30 steps on one random batch: the total, except CMPAGL's, whose MLM
# predicts random tokens, whose ITM matches noise to random captions and whose ITC floor rises as
# its queue fills: there the hinge must (it sits at 2 x margin if the embeddings collapse).
LEARNED_TERM = {"cmpagl": "triplet"}


@pytest.mark.parametrize("name", MODELS)
def test_tiny_model_loss_decreases(name):
    model = build_tiny(name).train()
    batch = random_batch(seed=1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=model.config.lr)
    history = []
    for _ in range(30):
        losses = model.loss(batch)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        history.append(losses[LEARNED_TERM.get(name, "total")].item())
    assert sum(history[-5:]) / 5 < 0.6 * history[0], history


@pytest.mark.parametrize("name", MODELS)
def test_frozen_backbone_gets_no_grad(name):
    if not hasattr(model_config(tiny(name)), "freeze_backbone"):
        pytest.skip("no timm backbone to freeze")
    meant = [UNTRAINED] if hasattr(model_config(tiny(name)), "allow_random_frozen_backbone") else []
    model = build_tiny(name, "model.freeze_backbone=true", *meant).train()
    backbone = [m for m in model.modules() if isinstance(m, TimmBackbone)]
    assert backbone
    model.loss(random_batch())["total"].backward()
    for b in backbone:
        assert not b.body.training  # BatchNorm keeps its running statistics
        assert all(not p.requires_grad and p.grad is None for p in b.parameters())


def test_trainable_backbone_gets_grad():
    model = build_tiny("vsepp", "model.freeze_backbone=false").train()
    model.loss(random_batch())["total"].backward()
    assert model.backbone.body.training
    assert all(p.grad is not None for p in model.backbone.parameters())


# ----------------------------------------------------------------------------- switches


def test_text_pool_switch_changes_caption_embeddings():
    batch = random_batch()
    with torch.no_grad():
        mean = build_tiny("swan", "model.text_pool=mean").eval().encode_texts(batch)
        last = build_tiny("swan", "model.text_pool=last").eval().encode_texts(batch)
    assert not torch.allclose(mean, last, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_max_violation_switch_changes_loss(name):
    if not hasattr(model_config(tiny(name)), "max_violation"):
        pytest.skip("no max_violation switch")
    batch = random_batch()
    with torch.no_grad():
        hardest = build_tiny(name, "model.max_violation=true").eval().loss(batch)["total"]
        summed = build_tiny(name, "model.max_violation=false").eval().loss(batch)["total"]
    assert hardest.item() < summed.item()  # the hardest negative is one of the summed ones


def test_mask_padding_switch_changes_caption_embeddings():
    batch = random_batch()
    with torch.no_grad():
        masked = build_tiny("swan", "model.mask_padding=true").eval().encode_texts(batch)
        release = build_tiny("swan", "model.mask_padding=false").eval().encode_texts(batch)
    assert not torch.allclose(masked, release, atol=1e-4)


# ----------------------------------------------------------------------------- registry and config


def test_unknown_model_names_key_and_file(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("model:\n  name: transformerzilla\n")
    with pytest.raises(ConfigError) as err:
        build_model(load_config(f), vocab_size=VOCAB)
    message = str(err.value)
    assert str(f.resolve()) in message and "model.name" in message and "swan" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="model.name: missing"):
        build_model(load_config(None), vocab_size=VOCAB)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.text_pool=max", "model.text_pool: must be mean or last"),
        ("model.gru_hidden=64", "model.gru_hidden: must equal embed_dim"),
        ("model.backbone=resnet_nope", "model.backbone: not a timm model name"),
        ("model.sfgs_branches=[8,8]", "model.sfgs_branches: needs one channel count per kernel"),
        ("model.wsa_heads=5", "model.wsa_heads: must divide embed_dim"),
        ("model.augment.crop=100", "model.augment.crop: must not exceed train_resize"),
        ("model.colour=red", "model.colour: unknown key"),
    ],
)
def test_bad_model_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        build_model(tiny("swan", override), vocab_size=VOCAB)
    assert needle in str(err.value) and "command line" in str(err.value)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.lr=-1", "model.lr: must be positive"),
        ("model.betas=[0.9]", "model.betas: expected [beta1, beta2]"),
        ("model.schedule=cosine", "model.schedule: must be one of step, linear_warmup, cosine_warmup"),
        ("model.optimizer=sgd", "model.optimizer: must be adam or adamw"),
    ],
)
def test_every_model_checks_its_optimiser_fields(name, override, needle):
    """All model configs share rsray.optim's fields and checks (each calls super().check())."""
    with pytest.raises(ConfigError, match=re.escape(needle)):
        model_config(tiny(name, override))


def test_the_optimiser_defaults_follow_each_paper():
    def optimiser(name):
        cfg = model_config(load_config(f"model/{name}", [UNTRAINED] if name in ("swan", "dove") else []))
        return cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.schedule, cfg.lr_decay, cfg.decay_every

    assert optimiser("vsepp") == ("adam", 2e-4, 0.0, "step", 0.1, 15)
    assert optimiser("swan") == optimiser("dove") == ("adam", 2e-4, 0.0, "step", 0.7, 20)
    assert optimiser("priorclip") == ("adamw", 6e-5, 0.01, "linear_warmup", 1.0, 1)
    assert optimiser("clip")[:4] == ("adamw", 1e-5, 0.2, "linear_warmup")


def test_typed_config_reaches_the_model():
    cfg = model_config(load_config("model/swan-tiny"))
    assert (cfg.embed_dim, cfg.grid, cfg.augment.crop, cfg.augment.rotation, cfg.lr_decay) == (32, 4, 64, 90.0, 0.7)
    paper = model_config(load_config("model/swan", [UNTRAINED]))
    assert (paper.embed_dim, paper.grid, paper.text_pool, paper.max_violation, paper.decay_every) == (
        512,
        16,
        "mean",
        True,
        20,
    )


# ----------------------------------------------------------------------------- encoders


def test_glove_file_is_loaded_for_known_words(tmp_path):
    vectors = tmp_path / "glove.txt"
    # 16-d vectors: "river" = 0.5s, "beach" = -1s, ". . ." a token with spaces (GloVe 840B has some)
    vectors.write_text(
        "river " + " ".join(["0.5"] * 16) + "\n"
        "notinvocab " + " ".join(["9"] * 16) + "\n"
        ". . . " + " ".join(["2"] * 16) + "\n"
        "beach " + " ".join(["-1"] * 16) + "\n"
        "river " + " ".join(["7"] * 16) + "\n"
    )  # a repeat: the first wins
    itos = ["<pad>", "<unk>", "river", "beach", ". . .", "harbour"] + [f"w{i}" for i in range(VOCAB - 6)]
    assert set(read_word_vectors(vectors, itos, 16)) == {2, 3, 4}
    torch.manual_seed(0)
    model = build_model(tiny("vsepp", f"model.glove_path={vectors}"), vocab=itos)
    weight = model.embed.weight.detach()
    assert torch.equal(weight[2], torch.full((16,), 0.5)) and torch.equal(weight[3], torch.full((16,), -1.0))
    assert torch.equal(weight[4], torch.full((16,), 2.0))
    assert torch.equal(weight[0], torch.zeros(16))  # <pad> stays zero
    assert weight[5].abs().max() <= 0.1 and weight[5].abs().sum() > 0  # unknown word: random U(-0.1, 0.1)
    with pytest.raises(ConfigError, match="model.glove_path"):
        build_model(tiny("vsepp", f"model.glove_path={vectors}"), vocab_size=VOCAB)
    with pytest.raises(ValueError, match="expected a word and 300 numbers"):
        WordEmbedding(VOCAB, 300).load_vectors(vectors, itos)


def test_backbone_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=7)  # e.g. a scene classifier: its head is dropped
    path = tmp_path / "test_resnet.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    loaded = TimmBackbone("test_resnet", out_indices=(4,), checkpoint=path)
    for key, value in loaded.body.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    # and through a model's config
    model = build_tiny("swan", f"model.backbone_checkpoint={path}")
    assert torch.equal(model.visual.backbone.body.layer4[0].conv1.weight, source.layer4[0].conv1.weight)
    # a file with other keys is refused, naming what is missing
    torch.save({"backbone.conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="weights missing"):
        TimmBackbone("test_resnet", checkpoint=tmp_path / "bad.pth")


def test_pooled_stem_is_layer1_input():
    torch.manual_seed(0)
    backbone = TimmBackbone("resnet10t", out_indices=(0, 2, 3, 4), freeze=True, pool_stem=True)
    x = torch.randn(2, 3, 64, 64)
    body = backbone.body
    with torch.no_grad():
        stem, l2, l3, l4 = backbone(x)
        expected = body.maxpool(body.act1(body.bn1(body.conv1(x))))  # what layer1 receives
        assert torch.equal(stem, expected)
        assert torch.equal(l2, body.layer2(body.layer1(expected)))
    assert backbone.reductions == [4, 8, 16, 32] and backbone.channels == [64, 128, 256, 512]
    assert [t.shape[-1] for t in (stem, l2, l3, l4)] == [16, 8, 4, 2]


def test_bigru_directions_and_padding():
    torch.manual_seed(0)
    gru = BiGRU(6, 5, merge="separate")
    x = torch.randn(3, 7, 6)
    lengths = torch.tensor([7, 3, 1])
    x[1, 3:], x[2, 1:] = 0, 0
    forward, backward = gru(x, lengths)
    assert forward.shape == backward.shape == (3, 7, 5)
    assert forward[1, 3:].abs().sum() == 0 and backward[2, 1:].abs().sum() == 0  # padding stays zero
    # the backward direction starts at the last valid word: row 1 alone (no padding) gives the same
    alone_f, alone_b = gru(x[1:2, :3], lengths[1:2])
    assert torch.allclose(alone_b, backward[1:2, :3], atol=1e-6) and torch.allclose(
        alone_f, forward[1:2, :3], atol=1e-6
    )
    gru.merge = "mean"
    assert torch.allclose(gru(x, lengths), (forward + backward) / 2)


# ----------------------------------------------------------------------------- SWAN blocks


def test_wsa_mean_of_weighted_tokens_equals_explicit_form():
    torch.manual_seed(0)
    wsa = WSA(num_tokens=6, dim=8, heads=2, ffn_dim=16).eval()
    x = torch.randn(3, 6, 8)
    with torch.no_grad():
        assert torch.allclose(wsa(x), wsa(x, explicit=True), atol=1e-5)


def test_jru_lengths_and_valid_windows():
    jru = JRU(4).eval()
    y, valid = jru(torch.randn(3, 7, 4), torch.tensor([7, 4, 1]))
    assert y.shape == (3, 7 // 2 + 7 // 3, 4)  # 3 + 2 windows
    assert valid.sum(dim=1).tolist() == [3 + 2, 2 + 1, 0]
    y, valid = jru(torch.randn(2, 1, 4), torch.tensor([1, 1]))  # padded to 3 first
    assert y.shape == (2, 2, 4) and not valid.any()


def test_swan_parts_scale_with_input():
    torch.manual_seed(0)
    encoder = SwanVisualEncoder.from_config(model_config(tiny("swan"))).eval()
    with torch.no_grad():
        out = encoder(torch.randn(2, 3, 64, 64))
    assert out.fine.shape == out.multi_scale.shape == (2, 32)
    assert out.tokens.shape == (2, 4 * 4, 32)  # layer3 is 4x4 at 64 px
    assert [m.shape[-1] for m in out.maps] == [16, 8, 4, 2]
    assert (
        SwanVisualEncoder.from_config(model_config(tiny("swan")), fine_grained=False)(torch.randn(1, 3, 64, 64)).fine
        is None
    )


# ----------------------------------------------------------------------------- SWAN at paper size


def conv(cin, cout, k=1, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def conv1d(cin, cout, k):
    return cin * cout * k + cout


def linear(i, o):
    return i * o + o


def bn(c):  # weight and bias (running statistics are buffers)
    return 2 * c


def layer_norm(c):
    return 2 * c


def mha(d):  # q, k, v and output projections with biases
    return 4 * linear(d, d)


def gru(i, h):  # per direction: 3 gates x (input weights, hidden weights, two biases)
    return 3 * (h * i + h * h + 2 * h)


def bottleneck(cin, mid, downsample):
    out = 4 * mid
    return (
        conv(cin, mid, 1, False)
        + bn(mid)
        + conv(mid, mid, 3, False)
        + bn(mid)
        + conv(mid, out, 1, False)
        + bn(out)
        + ((conv(cin, out, 1, False) + bn(out)) if downsample else 0)
    )


def resnet50_without_fc():
    total = conv(3, 64, 7, False) + bn(64)  # stem
    cin = 64
    for mid, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            total += bottleneck(cin, mid, downsample=b == 0)
            cin = 4 * mid
    return total


def swan_paper_trainable(vocab, d=512, word=300, grid=16):
    sfgs = (
        conv(64, 32, 1, False)
        + bn(32)  # 1x1 reduce
        + conv(32, 32, 1, False)
        + bn(32)
        + conv(32, 32, 3, False)
        + bn(32)
        + conv(32, 64, 5, False)
        + bn(64)
        + linear(grid * grid, d)  # 256 -> 512 token projection
        + mha(d)
        + linear(d, 1024)
        + linear(1024, d)
        + 2 * layer_norm(d)  # WSA's attention block
        + 128 * d
    )  # WSA's token weights W (128 tokens x 512)
    vmsf = (
        conv(512, d)
        + conv(1024, d)
        + conv(2048, 2 * d)  # 1x1 laterals with bias
        + conv(4 * d, d, 1, False)
        + bn(d)  # fuse
        + linear(d, 1024)
        + linear(1024, d)
    )  # MLP
    aggregation = linear(2 * d, d) + linear(d, d)
    text = (
        vocab * word
        + 2 * gru(word, d)
        + 3 * linear(d, d)
        + 2 * linear(d // 2, d // 2)
        + linear(d // 2, d)
        + bn(d)  # GSA (2 heads of 256)
        + conv1d(d, d, 2)
        + bn(d)
        + conv1d(d, d, 3)
        + bn(d)  # JRU
        + linear(d, 1024)
        + linear(1024, d)
    )  # TCGE MLP
    return sfgs + vmsf + aggregation + text


def test_swan_paper_parameter_counts():
    torch.manual_seed(0)
    model = build_model(load_config("model/swan", [UNTRAINED]), vocab_size=1350)  # no weights: nothing downloads
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(f"SWAN paper config, vocab 1350: trainable {trainable:,}, frozen {frozen:,}")
    reference = timm.create_model("resnet50")
    timm_frozen = sum(p.numel() for p in reference.parameters()) - sum(p.numel() for p in reference.fc.parameters())
    assert resnet50_without_fc() == timm_frozen == 23_508_032
    assert frozen == timm_frozen
    assert trainable == swan_paper_trainable(1350) == 14_458_184
    # spatial sizes at 256 px: stem 64x64, layer2/3/4 32/16/8, VMSF grid 16x16 of 512-d tokens
    model.eval()
    with torch.no_grad():
        out = model.visual(torch.randn(1, 3, 256, 256))
    assert [m.shape[-1] for m in out.maps] == [64, 32, 16, 8]
    assert out.tokens.shape == (1, 256, 512) and out.fine.shape == out.multi_scale.shape == (1, 512)
    with torch.no_grad():
        fine = model.visual.sfgs(out.maps[0])  # V_s comes from the max-pooled stem map alone
    torch.testing.assert_close(out.fine, fine)


@pytest.mark.parametrize("name", ["swan", "dove", "vsepp"])
def test_a_frozen_backbone_without_weights_is_refused_unless_meant(name):
    overrides = ["model.freeze_backbone=true"]
    with pytest.raises(ConfigError, match=r"model.backbone_checkpoint: is null while freeze_backbone is true"):
        model_config(load_config(f"model/{name}", overrides))
    assert model_config(load_config(f"model/{name}", [*overrides, UNTRAINED])).allow_random_frozen_backbone
