"""Retrieval metrics on hand-made matrices whose answers are worked out in the comments."""

import pytest
import torch

from rsray.eval.metrics import caption_to_image, ranks_i2t, ranks_t2i, retrieval_metrics, retrieval_ranks, stable_topk

KEYS = [
    "i2t_R1",
    "i2t_R5",
    "i2t_R10",
    "t2i_R1",
    "t2i_R5",
    "t2i_R10",
    "mR",
    "i2t_medr",
    "i2t_meanr",
    "t2i_medr",
    "t2i_meanr",
]
SCENE_KEYS = ["i2t_SR1", "i2t_SR5", "i2t_SR10", "t2i_SR1", "t2i_SR5", "t2i_SR10"]


def test_caption_to_image_any_count():
    assert caption_to_image(2).tolist() == [0] * 5 + [1] * 5
    assert caption_to_image(3, 2).tolist() == [0, 0, 1, 1, 2, 2]


# Two images, two captions each (c0, c1 -> image 0; c2, c3 -> image 1), ties both ways.
TIES = torch.tensor([[0.9, 0.1, 0.9, 0.8], [0.8, 0.2, 0.3, 0.8]])
# i2t  image 0: c0 .9, c2 .9 (tie: c0 first), c3, c1 -> own c0 at 0        -> rank 0
#      image 1: c0 .8, c3 .8 (tie: c0 first), c2, c1 -> own c3 at 1        -> rank 1
# t2i  c0 [.9 .8] own 0 -> 0;  c1 [.1 .2] own 0 -> 1;  c2 [.9 .3] own 1 -> 1
#      c3 [.8 .8] own 1, tied with image 0 which comes first               -> 1


def test_ties_are_broken_by_index():
    ci = caption_to_image(2, 2)
    assert ranks_i2t(TIES, ci).tolist() == [0, 1]
    assert ranks_t2i(TIES, ci).tolist() == [0, 1, 1, 1]
    assert retrieval_ranks(TIES, ci) == {"i2t": [0, 1], "t2i": [0, 1, 1, 1]}


def test_metrics_with_ties():
    m = retrieval_metrics(TIES, caption_to_image(2, 2))
    assert list(m) == KEYS
    # R@1: i2t 1 of 2 images, t2i 1 of 4 captions; every rank is < 5
    assert m["i2t_R1"] == 50 and m["t2i_R1"] == 25
    assert m["i2t_R5"] == m["i2t_R10"] == m["t2i_R5"] == m["t2i_R10"] == 100
    assert m["mR"] == pytest.approx((50 + 100 + 100 + 25 + 100 + 100) / 6)
    # 1-based ranks: i2t [1, 2] -> median 1.5, mean 1.5; t2i [1, 2, 2, 2] -> median 2, mean 1.75
    assert (m["i2t_medr"], m["i2t_meanr"], m["t2i_medr"], m["t2i_meanr"]) == (1.5, 1.5, 2.0, 1.75)


def test_uneven_captions_per_image_in_any_order():
    # image 0 has captions c1 c3 c5, image 1 has c2, image 2 has c0 c4
    ci = torch.tensor([2, 0, 1, 0, 2, 0])
    S = torch.tensor([[0.5, 0.2, 0.9, 0.1, 0.3, 0.4], [0.6, 0.7, 0.8, 0.0, 0.1, 0.2], [0.3, 0.9, 0.2, 0.4, 0.1, 0.5]])
    # i2t image 0: c2 c0 c5 c4 c1 c3 -> first own c5 at 2; image 1: c2 first -> 0;
    #     image 2: c1 c5 c3 c0 ... -> first own c0 at 3
    assert ranks_i2t(S, ci).tolist() == [2, 0, 3]
    # t2i c0 [.5 .6 .3] own 2 -> 2; c1 [.2 .7 .9] own 0 -> 2; c2 [.9 .8 .2] own 1 -> 1;
    #     c3 [.1 .0 .4] own 0 -> 1; c4 [.3 .1 .1] own 2, tied with image 1 before it -> 2;
    #     c5 [.4 .2 .5] own 0 -> 1
    assert ranks_t2i(S, ci).tolist() == [2, 2, 1, 1, 2, 1]
    m = retrieval_metrics(S, ci, ks=(1, 3))
    assert list(m)[:5] == ["i2t_R1", "i2t_R3", "t2i_R1", "t2i_R3", "mR"]
    assert m["i2t_R1"] == pytest.approx(100 / 3) and m["i2t_R3"] == pytest.approx(200 / 3)
    assert m["t2i_R1"] == 0 and m["t2i_R3"] == 100
    # 1-based i2t [3 1 4] -> median 3, mean 8/3; t2i [3 3 2 2 3 2] -> median 2.5, mean 2.5
    assert m["i2t_medr"] == 3 and m["i2t_meanr"] == pytest.approx(8 / 3)
    assert m["t2i_medr"] == 2.5 and m["t2i_meanr"] == 2.5


def test_all_scores_equal():
    # everything tied: lists are in index order. Image i's first own caption is c(2i) at 2i;
    # caption j's image j // 2 sits at j // 2.
    S, ci = torch.zeros(3, 6), caption_to_image(3, 2)
    assert ranks_i2t(S, ci).tolist() == [0, 2, 4]
    assert ranks_t2i(S, ci).tolist() == [0, 0, 1, 1, 2, 2]


def own_mask(n_images: int, cpi: int) -> torch.Tensor:
    ci = caption_to_image(n_images, cpi)
    return (ci[None, :] == torch.arange(n_images)[:, None]).float()


def test_perfect_matrix():
    m = retrieval_metrics(own_mask(20, 5), caption_to_image(20))
    assert all(m[key] == 100 for key in KEYS[:7])
    assert m["i2t_medr"] == m["i2t_meanr"] == m["t2i_medr"] == m["t2i_meanr"] == 1


def test_worst_matrix():
    # own pairs score -1, all others 0: an image's first own caption comes after the 95 others
    # (rank 96, 1-based); a caption's image after the 19 others (rank 20)
    m = retrieval_metrics(-own_mask(20, 5), caption_to_image(20))
    assert all(m[key] == 0 for key in KEYS[:7])
    assert m["i2t_medr"] == m["i2t_meanr"] == 96 and m["t2i_medr"] == m["t2i_meanr"] == 20


def test_scene_recall_skips_queries_without_scene():
    # images 0 and 1 are scene "a", image 2 has none; captions c(2i), c(2i+1) -> image i
    S = torch.tensor([[0.1, 0.2, 0.3, 0.9, 0.8, 0.0], [0.5, 0.5, 0.1, 0.2, 0.6, 0.7], [0.0, 0.0, 0.3, 0.95, 0.0, 0.0]])
    m = retrieval_metrics(S, caption_to_image(3, 2), ["a", "a", None], ks=(1, 2))
    # i2t (image 2 skipped): image 0 lists c3 (a), c4 (none) -> SR1 1, SR2 1/2;
    #     image 1 lists c5, c4 (both none)                   -> SR1 0, SR2 0
    assert m["i2t_SR1"] == 50 and m["i2t_SR2"] == 25
    # t2i (c4, c5 skipped): c0 [.1 .5 0] -> images 1, 0: 1, 1;  c1 [.2 .5 0] -> 1, 0: 1, 1;
    #     c2 [.3 .1 .3] -> 0, then 2 (tie, higher index): 1, 1/2;  c3 [.9 .2 .95] -> 2, 0: 0, 1/2
    assert m["t2i_SR1"] == 75 and m["t2i_SR2"] == 75
    assert list(m)[-4:] == ["i2t_SR1", "i2t_SR2", "t2i_SR1", "t2i_SR2"]


def test_scene_keys_and_values_on_a_perfect_matrix():
    scenes = ["a", "b", None, "a"] * 5
    m = retrieval_metrics(own_mask(20, 5), caption_to_image(20), scenes)
    assert list(m) == KEYS + SCENE_KEYS
    # top 1 is always an own caption / own image; top 5 of an image are its 5 own captions
    assert m["i2t_SR1"] == m["i2t_SR5"] == m["t2i_SR1"] == 100
    # The rest follow in index order (all tied at 0): a caption of image i lists i, then images
    # 0, 1, 2, ... without i. Images 0-4 are a, b, -, a, a. The 10 "a" images (0, 3, 4, 7, 8, ...)
    # get a,b,-,a,a in some order = 3/5; "b" image 1 gets 1,0,2,3,4 = b,a,-,a,a = 1/5, the other
    # four "b" images i,0,1,2,3 = b,a,b,-,a = 2/5. Every image has 5 captions: equal weights.
    assert m["t2i_SR5"] == pytest.approx(100 * (10 * 3 / 5 + 1 / 5 + 4 * 2 / 5) / 15)


def test_scenes_all_missing_or_wrong_length():
    S, ci = own_mask(4, 2), caption_to_image(4, 2)
    assert list(retrieval_metrics(S, ci, [None, "", None, None])) == KEYS
    with pytest.raises(ValueError, match="3 scenes for 4 images"):
        retrieval_metrics(S, ci, ["a", "b", "c"])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(torch.zeros(4), caption_to_image(4, 1))
    with pytest.raises(ValueError, match="image 1 has no caption"):
        retrieval_metrics(torch.zeros(2, 2), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0, 0]))


def reference_ranks(S: torch.Tensor, ci: torch.Tensor) -> tuple[list[int], list[int]]:
    """Plain Python: sort every list by (-score, index) and look the positives up."""
    rows, n_img, n_txt = S.tolist(), *S.shape
    i2t = [
        min(pos for pos, j in enumerate(sorted(range(n_txt), key=lambda j: (-rows[i][j], j))) if ci[j] == i)
        for i in range(n_img)
    ]
    t2i = [sorted(range(n_img), key=lambda i: (-rows[i][j], i)).index(int(ci[j])) for j in range(n_txt)]
    return i2t, t2i


def test_vectorised_ranks_match_plain_sorting():
    g = torch.Generator().manual_seed(0)
    for n_img in (1, 4, 9):
        ci = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (2 * n_img,), generator=g)])
        S = torch.randint(0, 3, (n_img, len(ci)), generator=g).float()  # many ties
        assert (ranks_i2t(S, ci).tolist(), ranks_t2i(S, ci).tolist()) == reference_ranks(S, ci)


def test_stable_topk_breaks_ties_by_index():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 3, (50, 40), generator=g).float()
    for k in (1, 5, 40, 100):
        values, idx = stable_topk(x, k)
        expected = x.argsort(dim=1, descending=True, stable=True)[:, :k]
        assert torch.equal(idx, expected) and torch.equal(values, x.gather(1, expected))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_same_numbers_on_gpu():
    g = torch.Generator().manual_seed(2)
    S, ci = torch.randint(0, 4, (30, 150), generator=g).float(), caption_to_image(30)
    scenes = ["a", "b", None] * 10
    assert retrieval_metrics(S.cuda(), ci.cuda(), scenes) == retrieval_metrics(S, ci, scenes)
