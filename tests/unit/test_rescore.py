"""rsray.eval.scoring.rescore_topk and the two-matrix metrics and SMR: the second stage re-orders
only each query's top k, keeps everything beyond k in first-stage order, scores each pair once,
and one matrix given twice gives exactly today's numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rsray.eval.metrics import caption_to_image, retrieval_metrics, retrieval_ranks, stable_topk
from rsray.eval.rerank import smr_rerank, smr_rerank_pair
from rsray.eval.scoring import rescore_topk

N_IMG, PER = 6, 5


class PairScorer:
    """A second-stage scorer: f(i, j) = sin(7i + 3j), from features that carry the row ids."""

    two_tower = False

    def __init__(self):
        self.pairs: list[tuple[int, int]] = []

    def pair_scores(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        assert images.shape[0] == texts.shape[0]
        i, j = images[:, 0].long(), texts[:, 0].long()
        self.pairs += list(zip(i.tolist(), j.tolist(), strict=True))
        return torch.sin(7 * i + 3 * j.double()).float()


def first_stage(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    itc = torch.randn(N_IMG, N_IMG * PER, generator=g)
    return itc, torch.arange(N_IMG).float()[:, None], torch.arange(N_IMG * PER).float()[:, None]


@pytest.mark.parametrize("k", [1, 3, 8])
def test_only_the_top_k_is_reordered_and_the_rest_keeps_itc_order(k):
    itc, images, texts = first_stage()
    scorer = PairScorer()
    s_i2t, s_t2i, scored = rescore_topk(scorer, itc, images, texts, k, pair_batch=7)
    f = lambda i, j: math.sin(7 * i + 3 * j)  # noqa: E731
    for name, first, second in (("i2t", itc, s_i2t), ("t2i", itc.t(), s_t2i.t())):
        top = stable_topk(first, min(k, first.shape[1]))[1]
        for q in range(first.shape[0]):
            kept = set(top[q].tolist())
            assert set(stable_topk(second[q : q + 1], len(kept))[1][0].tolist()) == kept, (name, q)  # same set
            for j in kept:
                i, c = (q, j) if name == "i2t" else (j, q)
                assert second[q, j].item() == pytest.approx(f(i, c), abs=1e-6)
            rest = [j for j in range(first.shape[1]) if j not in kept]
            by_itc = sorted(rest, key=lambda j: -first[q, j].item())
            assert sorted(rest, key=lambda j: -second[q, j].item()) == by_itc, (name, q)  # ITC order beyond k
            if rest:  # k beyond a 6-image gallery keeps every image
                assert max(second[q, j].item() for j in rest) < min(second[q, j].item() for j in kept)
    assert len(scorer.pairs) == len(set(scorer.pairs)) == scored  # each pair once
    union = {(i, j) for i in range(N_IMG) for j in stable_topk(itc, k)[1][i].tolist()}
    union |= {(i, j) for j in range(N_IMG * PER) for i in stable_topk(itc.t(), min(k, N_IMG))[1][j].tolist()}
    assert set(scorer.pairs) == union


def test_k_beyond_the_gallery_is_the_second_stage_alone_and_batches_agree():
    itc, images, texts = first_stage(1)
    full = torch.tensor([[math.sin(7 * i + 3 * j) for j in range(N_IMG * PER)] for i in range(N_IMG)])
    results = [rescore_topk(PairScorer(), itc, images, texts, 1000, pair_batch=b) for b in (1, 7, 1000)]
    ci = caption_to_image(N_IMG, PER)
    for s_i2t, s_t2i, _ in results:
        assert torch.equal(s_i2t, results[0][0]) and torch.equal(s_t2i, results[0][1])
        assert retrieval_ranks(s_i2t, ci, t2i_scores=s_t2i) == retrieval_ranks(full, ci)


def test_one_matrix_given_twice_gives_todays_numbers():
    itc, _, _ = first_stage(2)
    ci = caption_to_image(N_IMG, PER)
    scenes = ["a", "b", "a", None, "b", "c"]
    assert retrieval_metrics(itc, ci, scenes, t2i_scores=itc) == retrieval_metrics(itc, ci, scenes)
    one = smr_rerank(itc, k=3)
    pair = smr_rerank_pair(itc, itc.clone(), k=3)
    assert torch.equal(pair[0], one) and torch.equal(pair[1], one)


def test_each_direction_is_read_from_its_own_matrix():
    a, b = first_stage(3)[0], first_stage(4)[0]
    ci = caption_to_image(N_IMG, PER)
    both = retrieval_metrics(a, ci, t2i_scores=b)
    assert (
        both["i2t_R1"] == retrieval_metrics(a, ci)["i2t_R1"]
        and both["i2t_medr"] == retrieval_metrics(a, ci)["i2t_medr"]
    )
    assert (
        both["t2i_R5"] == retrieval_metrics(b, ci)["t2i_R5"]
        and both["t2i_meanr"] == retrieval_metrics(b, ci)["t2i_meanr"]
    )
    assert retrieval_ranks(a, ci, b)["t2i"] == retrieval_ranks(b, ci)["t2i"]
    # SMR's weight reads the forward ranks from a's rows and the backward ranks from b's columns
    # (plain Python below), and each direction keeps its own matrix, shifted positive
    k, w, beta = 4, 1.0, 0.1
    s_i2t, s_t2i = smr_rerank_pair(a, b, k=k, w=w, beta=beta)
    rows, cols = a.tolist(), b.tolist()

    def position(values: list[float], j: int) -> int:  # 0-based, descending, ties by index
        return sum(v > values[j] or (v == values[j] and i < j) for i, v in enumerate(values))

    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            r_f, r_b = position(rows[i], j), position([row[j] for row in cols], i)
            weight = 1.0 if r_f >= k and r_b >= k else 1.0 + w * math.exp(-beta * (r_f + r_b) / 2)
            assert float(s_i2t[i, j]) == pytest.approx((rows[i][j] - float(a.min()) + 1e-6) * weight, rel=1e-5)
            assert float(s_t2i[i, j]) == pytest.approx((cols[i][j] - float(b.min()) + 1e-6) * weight, rel=1e-5)
    with pytest.raises(ValueError, match="t2i_scores has shape"):
        retrieval_metrics(a, ci, t2i_scores=b[:, :3])
