"""DOVE: each block against its formula written out (RoI cells, DTGA, IFA, the pairwise IGA
score), every switch changes the computation, the blocked pairwise score equals the unblocked one,
and the score of (image i, caption j) is what the loss sees."""

import pytest
import torch

from rsray.config import ConfigError, load_config
from rsray.eval.metrics import retrieval_metrics
from rsray.eval.scoring import concat_rows, score_matrix, streaming_topk, take_rows
from rsray.losses import triplet_loss
from rsray.models import build_model, model_config
from rsray.models.dove import DOVE, DoveImageFeatures, DoveTextFeatures, grid_boxes
from tests.unit.transcriptions import layer_norm, multihead_attention

VOCAB = 40


def build(*overrides: str, seed: int = 0) -> DOVE:
    torch.manual_seed(seed)
    return build_model(load_config("model/dove-tiny", list(overrides)), vocab_size=VOCAB)


def random_batch(batch: int = 6, max_len: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Pairs 0 and 1 show the same image; caption lengths from 1 to max_len."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    lengths[0], lengths[1] = 1, max_len
    tokens = torch.randint(2, VOCAB, (batch, max_len), generator=g)
    tokens[torch.arange(max_len)[None, :] >= lengths[:, None]] = 0
    return {
        "images": torch.randn(batch, 3, 64, 64, generator=g),
        "tokens": tokens,
        "lengths": lengths,
        "image_ids": torch.tensor([0, 0] + list(range(1, batch - 1))),
    }


def rows(batch: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    """A sub-batch, captions trimmed to their own longest (less padding than the full batch)."""
    out = {k: v[index] for k, v in batch.items()}
    out["tokens"] = out["tokens"][:, : int(out["lengths"].max())]
    return out


@torch.no_grad()
def encode(model: DOVE, batch) -> tuple[DoveImageFeatures, DoveTextFeatures]:
    return model.encode_images(batch), model.encode_texts(batch)


# ----------------------------------------------------------------------------- switches


def test_dtga_inputs_switch_changes_caption_features():
    batch = random_batch()
    sentences = {}
    for inputs in ("[f,b]", "[f,f]", "[b,b]"):
        model = build(f"model.dtga_inputs={inputs}").eval()  # same seed: same weights, other wiring
        sentences[inputs] = encode(model, batch)[1].sentence
    assert not torch.allclose(sentences["[f,b]"], sentences["[f,f]"], atol=1e-4)
    assert not torch.allclose(sentences["[f,b]"], sentences["[b,b]"], atol=1e-4)
    assert not torch.allclose(sentences["[f,f]"], sentences["[b,b]"], atol=1e-4)
    # with one stream on both inputs the gate has nothing to choose: the other stream is ignored
    forward, backward, other = torch.randn(3, 3, 5, 32).unbind(0)
    valid = torch.ones(3, 5, dtype=torch.bool)
    with torch.no_grad():
        ff = build("model.dtga_inputs=[f,f]").eval().dtga
        assert torch.equal(ff(forward, backward, valid), ff(forward, other, valid))
        fb = build("model.dtga_inputs=[f,b]").eval().dtga
        assert not torch.allclose(fb(forward, backward, valid), fb(forward, other, valid), atol=1e-4)


@pytest.mark.parametrize("heads", ["[linear,mlp]", "[mlp,linear]", "[linear,linear]"])
def test_roam_heads_switch_changes_heads_and_scores(heads):
    batch = random_batch()
    reference = build("model.roam_heads=[mlp,mlp]").eval()
    model = build(f"model.roam_heads={heads}").eval()
    kinds = heads.strip("[]").split(",")
    for head, kind in zip((model.visual_head, model.text_head), kinds, strict=True):
        assert isinstance(head.rest, torch.nn.Identity) == (kind == "linear")
        assert head.first.out_features == (32 if kind == "linear" else 64)
    with torch.no_grad():
        assert not torch.allclose(
            model.score(*encode(model, batch)), reference.score(*encode(reference, batch)), atol=1e-4
        )


def test_lambda_g_weights_the_global_term():
    batch = random_batch()
    losses = {}
    for lam in (0.0, 1.0, 10.0):
        model = build(f"model.lambda_g={lam}").train()
        torch.manual_seed(1)  # same dropout masks
        losses[lam] = model.loss(batch)
        losses[lam]["total"].backward()
        vd_grad = model.visual.vmsf.mlp.net[0].weight.grad  # V_d's MLP feeds only the global term
        assert (vd_grad is not None and vd_grad.abs().sum() > 0) == (lam > 0)
    for lam, terms in losses.items():
        assert set(terms) == {"total", "triplet", "global"}
        assert torch.isclose(terms["total"], terms["triplet"] + lam * terms["global"])
        assert torch.isclose(terms["triplet"], losses[0.0]["triplet"]) and terms["global"] > 0
    assert losses[10.0]["total"] > losses[1.0]["total"] > losses[0.0]["total"]


def test_iga_query_switch_changes_scores():
    batch = random_batch()
    with torch.no_grad():
        a = build("model.iga_query=regions").eval()
        b = build("model.iga_query=fused").eval()
        assert torch.equal(encode(a, batch)[0].embedding, encode(b, batch)[0].embedding)
        assert not torch.allclose(a.score(*encode(a, batch)), b.score(*encode(b, batch)), atol=1e-5)


# ----------------------------------------------------------------------------- regions


def test_grid_boxes_are_the_multi_scale_grid():
    boxes = grid_boxes([1, 2, 3])
    assert boxes.shape == (14, 4)
    assert boxes[0].tolist() == [0, 0, 1, 1] and boxes[1].tolist() == [0, 0, 0.5, 0.5]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert torch.allclose(areas[1:5].sum(), torch.tensor(1.0)) and torch.allclose(areas[5:].sum(), torch.tensor(1.0))


def test_regions_are_the_grid_cells_of_the_map():
    """roi_align with aligned boxes on a 4x4 map at 2x2 bins: the 1x1 level's bins each average a
    2x2 block of pixels (2x2 samples at the pixel centres), the 2x2 level's cell (r, c) is exactly
    map[2r:2r+2, 2c:2c+2] (one sample per bin); with an identity projection the regional features
    are those numbers, level by level, row-major."""
    from rsray.models.dove import RoIEncoder

    channels = 3
    encoder = RoIEncoder(channels, channels * 4, levels=[1, 2], output_size=2)
    with torch.no_grad():
        encoder.project.weight.copy_(torch.eye(channels * 4))
        encoder.project.bias.zero_()
        feature_map = torch.randn(2, channels, 4, 4)
        regions = encoder(feature_map)
    whole = torch.nn.functional.avg_pool2d(feature_map, 2).flatten(1)
    cells = [feature_map[:, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].flatten(1) for r in range(2) for c in range(2)]
    torch.testing.assert_close(regions, torch.stack([whole, *cells], dim=1))


def test_dtga_is_its_formula():
    """H = g*A + (1-g)*B, g = sigmoid(W[A; B] + b); then LayerNorm(H + single-head attention over the
    valid words), zero at padding."""
    model = build().eval()
    dtga = model.dtga
    torch.manual_seed(2)
    forward, backward = torch.randn(2, 3, 5, 32).unbind(0)
    valid = torch.tensor([[True] * 5, [True, True, False, False, False], [True] * 3 + [False] * 2])
    with torch.no_grad():
        g = torch.sigmoid(torch.cat([forward, backward], -1) @ dtga.gate.weight.t() + dtga.gate.bias)
        h = g * forward + (1 - g) * backward
        expected = layer_norm(h + multihead_attention(dtga.attn, h, h, valid), dtga.norm) * valid[..., None]
        torch.testing.assert_close(dtga(forward, backward, valid), expected)
    assert dtga.attn.num_heads == 1


def test_ifa_is_its_formula():
    """IFA: mean over regions of LayerNorm(R + MultiHead(R, T, T))."""
    model = build().eval()
    torch.manual_seed(3)
    regions, tokens = torch.randn(2, 14, 32), torch.randn(2, 16, 32)
    with torch.no_grad():
        expected = layer_norm(regions + multihead_attention(model.ifa.attn, regions, tokens), model.ifa.norm)
        torch.testing.assert_close(model.ifa(regions, tokens), expected.mean(dim=1))


def test_pairwise_score_is_the_iga_formula_pair_by_pair():
    """s_ij = v_i . L2norm(text_head(sum_l a_ijl w_jl)), a_ij = softmax over caption j's valid words
    of q_i . key(w_jl) / sqrt(D): written out for every pair, the head applied after pooling."""
    model = build().eval()
    batch = random_batch()
    with torch.no_grad():
        images, texts = encode(model, batch)
        scores = model.score(images, texts)
        all_words, valid = model.word_features(batch)
        for i in range(6):
            for j in range(6):
                words = all_words[j][valid[j]]  # [L_j, D]
                attention = torch.softmax(model.iga_key(words) @ images.query[i] / 32**0.5, dim=0)
                caption = torch.nn.functional.normalize(model.text_head(attention @ words), dim=-1)
                torch.testing.assert_close(scores[i, j], images.embedding[i] @ caption, msg=f"pair {i}, {j}")


# ----------------------------------------------------------------------------- pairwise score


def test_score_of_a_pair_is_what_the_loss_sees():
    model = build().eval()  # no dropout: the loss's scores are deterministic
    batch = random_batch()
    with torch.no_grad():
        final, global_ = model.batch_scores(batch)
        for i in range(6):
            image = model.encode_images(rows(batch, [i]))
            for j in range(6):
                caption = model.encode_texts(rows(batch, [j]))  # alone: no padding at all
                assert torch.allclose(model.score(image, caption), final[i, j], atol=1e-5), (i, j)
        losses = model.loss(batch)
    assert torch.isclose(losses["triplet"], triplet_loss(final, batch["image_ids"], 0.2, False))
    assert torch.isclose(losses["global"], triplet_loss(global_, batch["image_ids"], 0.2, False))
    assert not torch.allclose(final, final[:, :1].expand(-1, 6), atol=1e-4)  # depends on the caption
    assert not torch.allclose(final, final[:1].expand(6, -1), atol=1e-4)  # and on the image


def test_blocked_score_equals_unblocked():
    batch = random_batch(batch=7)
    model = build().eval()
    chunked = build("model.score_chunk_pairs=5").eval()  # same weights, internal chunks of <= 5 pairs
    with torch.no_grad():
        images, texts = encode(model, batch)
        full = model.score(images, texts)
        assert torch.allclose(chunked.score(images, texts), full, atol=1e-6)
        for block in (1, 3, 4):
            assert torch.allclose(score_matrix(model, images, texts, block=block), full, atol=1e-6)
        # captions encoded in two batches with different padding, concatenated as evaluation does
        parts = [model.encode_texts(rows(batch, slice(0, 1))), model.encode_texts(rows(batch, slice(1, 7)))]
        assert parts[0].keys.shape[1] != parts[1].keys.shape[1]
        joined = concat_rows(parts)
        assert isinstance(joined, DoveTextFeatures) and isinstance(take_rows(images, 0, 2), DoveImageFeatures)
        assert torch.allclose(score_matrix(model, images, joined, block=2), full, atol=1e-5)
        # the top-k stream sees the same scores
        values, idx, _, _ = streaming_topk(model, images, joined, k=3, block=2)
        top = full.topk(3, dim=1)
        assert torch.allclose(values, top.values, atol=1e-5) and torch.equal(idx, top.indices)


def test_evaluation_metrics_from_blocked_scores():
    model = build().eval()
    batch = random_batch(batch=6)
    batch["image_ids"] = torch.arange(6)
    with torch.no_grad():
        images, texts = encode(model, batch)
        scores = score_matrix(model, images, texts, block=4)
        full = model.score(images, texts)
    metrics = retrieval_metrics(scores, torch.arange(6))
    # one caption per image: R@1 is the share of rows (columns) whose best score is the diagonal
    own = torch.arange(6)
    i2t_r1 = 100 * (full.argmax(dim=1) == own).float().mean().item()
    t2i_r1 = 100 * (full.argmax(dim=0) == own).float().mean().item()
    assert (metrics["i2t_R1"], metrics["t2i_R1"]) == (pytest.approx(i2t_r1), pytest.approx(t2i_r1))
    assert metrics == retrieval_metrics(full, own)  # blocked or whole, the same numbers
    assert metrics["i2t_R10"] == 100.0  # 6 candidates: all within 10


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.roam_heads=[mlp,conv]", "model.roam_heads: expected [visual, text], each linear or mlp"),
        ("model.dtga_inputs=[f]", "model.dtga_inputs: expected two of f (forward) / b (backward)"),
        ("model.ifa_heads=5", "model.ifa_heads: must divide embed_dim"),
        ("model.lambda_g=-1", "model.lambda_g: must not be negative"),
        ("model.roi_grid=[]", "model.roi_grid: needs at least one positive grid size"),
        ("model.iga_query=words", "model.iga_query: must be regions or fused"),
        ("model.score_chunk_pairs=0", "model.score_chunk_pairs: must be positive"),
    ],
)
def test_bad_dove_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        build(override)
    assert needle in str(err.value) and "command line" in str(err.value) and "\n" not in str(err.value)


def test_paper_config_shapes():
    cfg = model_config(load_config("model/dove", ["model.allow_random_frozen_backbone=true"]))
    assert (cfg.embed_dim, cfg.lr, cfg.margin, cfg.roam_heads, cfg.dtga_inputs) == (
        512,
        2e-4,
        0.2,
        ["mlp", "mlp"],
        ["f", "b"],
    )
    torch.manual_seed(0)
    model = build_model(load_config("model/dove", ["model.allow_random_frozen_backbone=true"]), vocab_size=100).eval()
    assert model.roi.project.in_features == 1024 * 2 * 2  # layer 3 of ResNet-50, 2x2 bins
    with torch.no_grad():
        visual = model.visual(torch.randn(1, 3, 256, 256))
        regions = model.roi(visual.maps[2])
    assert visual.tokens.shape == (1, 256, 512) and visual.maps[2].shape[-1] == 16 and regions.shape == (1, 14, 512)
    assert visual.fine is None  # SWAN's encoder without SFGS: no unused parameters
