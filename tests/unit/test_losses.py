"""Losses on hand-computed cases: triplet (sum / hardest), InfoNCE, intra-class, affiliation."""

import math

import pytest
import torch

from rsray.losses import LogitScale, affiliation_loss, info_nce_loss, intra_class_loss, positive_mask, triplet_loss

# Row i = image of pair i, column j = caption of pair j; matched pairs on the diagonal.
S = torch.tensor([[0.80, 0.70, 0.10], [0.50, 0.60, 0.30], [0.20, 0.65, 0.40]], dtype=torch.float64)

# margin 0.2. Image-to-text, cost[i, j] = max(0, 0.2 + S[i, j] - S[i, i]) for j != i:
#   row 0 (diag .8): j1 .2+.7-.8 = .10, j2 .2+.1-.8 < 0 -> 0
#   row 1 (diag .6): j0 .2+.5-.6 = .10, j2 .2+.3-.6 < 0 -> 0
#   row 2 (diag .4): j0 .2+.2-.4 = 0,   j1 .2+.65-.4 = .45
# Text-to-image, cost[i, j] = max(0, 0.2 + S[i, j] - S[j, j]) for i != j:
#   col 0 (diag .8): i1 .2+.5-.8 < 0, i2 .2+.2-.8 < 0 -> 0, 0
#   col 1 (diag .6): i0 .2+.7-.6 = .30, i2 .2+.65-.6 = .25
#   col 2 (diag .4): i0 .2+.1-.4 < 0 -> 0, i1 .2+.3-.4 = .10
# sum:  i2t .1+.1+.45 = .65, t2i .3+.25+.1 = .65            -> 1.30
# max:  i2t .1+.1+.45 = .65, t2i 0+.3+.1 = .40               -> 1.05


def test_triplet_sum_over_negatives():
    assert triplet_loss(S, margin=0.2, max_violation=False).item() == pytest.approx(1.30)


def test_triplet_hardest_negative():
    assert triplet_loss(S, margin=0.2, max_violation=True).item() == pytest.approx(1.05)


def test_triplet_same_image_is_never_a_negative():
    # Pairs 0 and 1 show the same image: (0, 1) and (1, 0) are not negatives.
    #   i2t: row 0 keeps j2 -> 0; row 1 keeps j2 -> 0; row 2: j0 0, j1 .45      -> .45 (sum and max)
    #   t2i: col 0 keeps i2 -> 0; col 1 keeps i2 .25; col 2: i0 0, i1 .10       -> sum .35, max .25+.10 = .35
    ids = torch.tensor([0, 0, 1])
    assert triplet_loss(S, ids, 0.2, max_violation=False).item() == pytest.approx(0.80)
    assert triplet_loss(S, ids, 0.2, max_violation=True).item() == pytest.approx(0.80)
    # every row the same image: nothing to push apart
    assert triplet_loss(S, torch.zeros(3, dtype=torch.long), 0.2).item() == 0.0


def test_positive_mask():
    assert positive_mask(torch.tensor([3, 5, 3]), 3).tolist() == [
        [True, False, True],
        [False, True, False],
        [True, False, True],
    ]
    assert positive_mask(None, 2).tolist() == [[True, False], [False, True]]


def test_logit_scale_init_and_clamp():
    scale = LogitScale(0.07)
    assert scale().item() == pytest.approx(1 / 0.07)  # 14.2857
    with torch.no_grad():
        scale.log_scale.fill_(10.0)  # e^10 > 100
    assert scale().item() == pytest.approx(100.0)


def test_info_nce_one_positive_per_row():
    # scores = I (2x2), scale 1: each row's logits are [1, 0] with target the 1:
    #   -log(e / (e + 1)) = log(1 + e^-1) = 0.313262, in both directions -> 0.313262
    loss = info_nce_loss(torch.eye(2, dtype=torch.float64), 1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)


def test_info_nce_multi_positive_targets():
    # scores = I (3x3), scale 1, image_ids [0, 0, 1]: rows 0 and 1 are positives of each other.
    # Every row's log-sum-exp is log(e + 2) = 1.551445.
    #   row 0: logits [1, 0, 0], targets {0: .5, 1: .5}: 1.551445 - .5*(1 + 0) = 1.051445
    #   row 1: logits [0, 1, 0], targets {0: .5, 1: .5}: 1.551445 - .5*(0 + 1) = 1.051445
    #   row 2: logits [0, 0, 1], target 2:              1.551445 - 1           = 0.551445
    # mean 2.654335 / 3 = 0.884778; the transpose is the same matrix -> 0.884778
    loss = info_nce_loss(torch.eye(3, dtype=torch.float64), 1.0, torch.tensor([0, 0, 1]))
    assert loss.item() == pytest.approx(0.884778, abs=1e-6)
    # the learnable scale multiplies the scores: gradient reaches it
    scale = LogitScale(1.0)  # scale e^0 = 1
    info_nce_loss(torch.eye(3, dtype=torch.float64), scale(), torch.tensor([0, 0, 1])).backward()
    assert scale.log_scale.grad is not None and scale.log_scale.grad.item() != 0


def test_intra_class():
    # cos([1,0],[1,0]) = 1 -> 0; cos([0,1],[0.6,0.8]) = .8 -> .2; mean .1
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    assert intra_class_loss(img, txt).item() == pytest.approx(0.1)


def test_affiliation():
    # rows: scenes [0, 1, 0, -1]; the -1 row is skipped. scale 1.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.8, 0.6]], dtype=torch.float64)
    scenes = torch.tensor([0, 1, 0, -1])
    # image centres: c0 = mean([1,0],[1,0]) = [1,0], c1 = [0,1]
    # text centres:  c0 = mean([1,0],[0,1]) = [.5,.5], c1 = [0,1]
    # image -> text centres:
    #   [1,0]: logits [.5, 0], target 0: log(e^.5 + 1) - .5 = 0.974077 - .5 = 0.474077
    #   [0,1]: logits [.5, 1], target 1: log(e^.5 + e) - 1 = 1.474077 - 1 = 0.474077
    #   [1,0]: as the first                                                 0.474077   mean 0.474077
    # text -> image centres:
    #   [1,0] (c0): logits [1, 0], target 0: log(e + 1) - 1 = 0.313262
    #   [0,1] (c1): logits [0, 1], target 1:                  0.313262
    #   [0,1] (c0): logits [0, 1], target 0: log(e + 1) - 0 = 1.313262   mean 1.939786 / 3 = 0.646595
    # loss = (0.474077 + 0.646595) / 2 = 0.560336
    assert affiliation_loss(img, txt, scenes, 1.0).item() == pytest.approx(0.560336, abs=1e-6)
    # scene labels are what matters, not their values
    assert affiliation_loss(img, txt, torch.tensor([7, 3, 7, -1]), 1.0).item() == pytest.approx(0.560336, abs=1e-6)


def test_affiliation_with_per_sample_centres_and_the_releases_transposed_term():
    """PIR's release, transcribed with plain Python: row i's centre is the mean of the rows sharing
    its scene, its own centre the target (rows i -> centres j); the release's text->image term
    takes the softmax down column i of M[j][i] = t_j . c_i instead of along row i (transposed)."""
    images = [[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]
    texts = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    scenes = [0, 1, 0]

    def centre(rows, i):
        same = [rows[j] for j in range(3) if scenes[j] == scenes[i]]
        return [sum(v[k] for v in same) / len(same) for k in range(2)]

    def dot(a, b):
        return a[0] * b[0] + a[1] * b[1]

    image_centres, text_centres = [centre(images, i) for i in range(3)], [centre(texts, i) for i in range(3)]
    i2t_logits = [[2.0 * dot(images[i], text_centres[j]) for j in range(3)] for i in range(3)]
    t2i_logits = [[2.0 * dot(texts[i], image_centres[j]) for j in range(3)] for i in range(3)]

    def ce(row, target):
        return math.log(sum(math.exp(v) for v in row)) - row[target]

    i2t = sum(ce(i2t_logits[i], i) for i in range(3)) / 3
    t2i = sum(ce(t2i_logits[i], i) for i in range(3)) / 3
    t2i_transposed = sum(ce([t2i_logits[j][i] for j in range(3)], i) for i in range(3)) / 3
    assert abs(t2i - t2i_transposed) > 1e-3  # the example tells the two apart

    args = (torch.tensor(images, dtype=torch.float64), torch.tensor(texts, dtype=torch.float64), torch.tensor(scenes))
    assert affiliation_loss(*args, 2.0, centres="sample").item() == pytest.approx((i2t + t2i) / 2, abs=1e-12)
    release = affiliation_loss(*args, 2.0, centres="sample", transposed_t2i=True)
    assert release.item() == pytest.approx((i2t + t2i_transposed) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="transposed_t2i needs sample centres"):
        affiliation_loss(*args, 2.0, transposed_t2i=True)


def test_affiliation_without_labels_is_zero_with_grad():
    img = torch.randn(3, 4, requires_grad=True)
    loss = affiliation_loss(img, torch.randn(3, 4), torch.full((3,), -1), 1.0)
    loss.backward()
    assert loss.item() == 0.0 and img.grad is not None


@pytest.mark.parametrize("clamp", ["forward", "after_step"])
def test_logit_scale_clamp_forward_or_in_place_after_each_step(clamp):
    """forward (ours): the scale used is min(exp(log), 100), the stored log passes ln 100 and gets
    no gradient back; after_step (open_clip): exp(log) as stored, clamped in place to [0, ln 100]."""
    scale = LogitScale(1 / 99.0, clamp=clamp)
    optimizer = torch.optim.SGD(scale.parameters(), lr=1.0)
    (-scale()).backward()  # d/dlog of -exp(log) = -99: one step moves the log up by 99
    optimizer.step()
    scale.after_optimizer_step()
    if clamp == "forward":
        assert float(scale.log_scale.detach()) == pytest.approx(math.log(99.0) + 99.0)
        assert float(scale().detach()) == pytest.approx(100.0)
        optimizer.zero_grad()
        (-scale()).backward()
        assert float(scale.log_scale.grad) == 0.0  # stuck above ln 100
    else:
        assert float(scale.log_scale.detach()) == pytest.approx(math.log(100.0), abs=1e-6)  # float32's ln 100
        with torch.no_grad():
            scale.log_scale.fill_(-3.0)
        assert float(scale().detach()) == pytest.approx(math.exp(-3.0))  # no clamp where it is used
        scale.after_optimizer_step()
        assert float(scale.log_scale.detach()) == 0.0  # the lower bound: a scale of at least 1
