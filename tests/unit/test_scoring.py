"""Scoring: blocked matrices equal the full one, and streaming top-k equals the full-matrix path exactly.

Features are small integers, so every score is exact in float32 whatever order a kernel adds in,
and ties are frequent.
"""

import pytest
import torch

from rsray.eval.metrics import caption_to_image, retrieval_metrics, stable_topk
from rsray.eval.scoring import metrics_from_topk, score_matrix, streaming_topk
from rsray.models.base import RetrievalModel


class L1Model(RetrievalModel):
    """A pairwise model: minus the L1 distance of features (not a dot product), and (images,
    lengths) tuples as image features, to exercise non-tensor features."""

    two_tower = False

    def encode_images(self, batch):
        return batch["images"]

    def encode_texts(self, batch):
        return batch["tokens"]

    def score(self, image_features, text_features):
        images, scale = image_features
        return -(images[:, None, :] - text_features[None, :, :]).abs().sum(-1) * scale[:, None]

    def loss(self, batch):
        return {"total": torch.zeros(())}


def features(n: int, dim: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(-2, 3, (n, dim), generator=torch.Generator().manual_seed(seed)).float()


def test_blocked_equals_full_two_tower():
    img, txt = features(10), features(37, seed=1)
    for block in (1, 3, 10, 1024):
        assert torch.equal(score_matrix(None, img, txt, block=block), img @ txt.t())


def test_blocked_equals_full_pairwise():
    model = L1Model()
    img, scale, txt = features(9), torch.arange(1.0, 10.0), features(23, seed=1)
    full = model.score((img, scale), txt)
    for block in (1, 4, 100):
        assert torch.equal(score_matrix(model, (img, scale), txt, block=block), full)


def check_streaming(model, img, txt, ci, scenes, k, block):
    S = score_matrix(model, img, txt)
    i2t_v, i2t_i, t2i_v, t2i_i = streaming_topk(model, img, txt, k=k, block=block)
    kk = min(k, S.shape[1])
    expected_i2t = S.argsort(dim=1, descending=True, stable=True)[:, :kk]
    expected_t2i = S.t().argsort(dim=1, descending=True, stable=True)[:, : min(k, S.shape[0])]
    assert torch.equal(i2t_i, expected_i2t) and torch.equal(i2t_v, S.gather(1, expected_i2t))
    assert torch.equal(t2i_i, expected_t2i) and torch.equal(t2i_v, S.t().gather(1, expected_t2i))
    ks = tuple(sorted({1, min(5, k), k}))
    full = retrieval_metrics(S, ci, scenes, ks=ks)
    streamed = metrics_from_topk(i2t_i, t2i_i, ci, scenes, ks=ks)
    assert streamed == {key: full[key] for key in streamed}  # exactly, for every key it gives
    assert "mR" in streamed and ("i2t_SR1" in streamed) == (scenes is not None)


@pytest.mark.parametrize("block", [1, 3, 8, 1000])
def test_streaming_topk_equals_full_two_tower(block):
    img, txt = features(13), features(39, seed=1)  # 3 captions per image
    check_streaming(None, img, txt, caption_to_image(13, 3), ["a", "b", None, "c"] * 3 + ["a"], k=5, block=block)


def test_streaming_any_matrix_and_uneven_captions():
    # image features = S and text features = identity give back exactly S: arbitrary matrices
    g = torch.Generator().manual_seed(3)
    S = torch.randint(0, 4, (11, 30), generator=g).float()
    ci = torch.cat([torch.arange(11), torch.randint(0, 11, (19,), generator=g)])
    for k, block in ((1, 4), (7, 2), (40, 5)):  # k above the block, k above both sizes
        check_streaming(None, S, torch.eye(30), ci, None, k=k, block=block)


@pytest.mark.parametrize("block", [2, 5, 64])
def test_streaming_topk_equals_full_pairwise(block):
    img, scale, txt = features(8, seed=4), torch.tensor([1.0, 2.0] * 4), features(24, seed=5)
    check_streaming(L1Model(), (img, scale), txt, caption_to_image(8, 3), list("aabbccdd"), k=4, block=block)


def test_topk_needs_k_at_least_max_ks():
    S = features(6) @ features(12, seed=1).t()
    _, i2t, _, t2i = streaming_topk(None, features(6), features(12, seed=1), k=3, block=4)
    with pytest.raises(ValueError, match="k >= 5"):
        metrics_from_topk(i2t, t2i, caption_to_image(6, 2), ks=(1, 5))
    assert stable_topk(S, 3)[1].shape == (6, 3)


def test_pairwise_score_of_the_wrong_shape_is_named():
    class Broken(L1Model):
        def score(self, image_features, text_features):
            return torch.zeros(2, 2)

    with pytest.raises(ValueError, match="Broken.score returned shape"):
        score_matrix(Broken(), (features(4), torch.ones(4)), features(6), block=3)
