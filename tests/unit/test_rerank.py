"""SMR re-ranking: a hand-computed case, each knob matters, w=0 is a no-op, and a plain-loop reference."""

import math

import pytest
import torch

from rsray.eval.metrics import caption_to_image, ranks_i2t
from rsray.eval.rerank import SHIFT_EPS, SMRConfig, smr_rerank, stable_ranks

# 3 images x 3 captions, caption j belongs to image j
S = torch.tensor([[0.50, 0.48, 0.10], [0.70, 0.20, 0.30], [0.60, 0.10, 0.40]])
HALVING = 2 * math.log(2)  # beta with exp(-beta * s / 2) = 2 ** -s: weights by hand


def test_stable_ranks():
    # rows (r_f): image 0 lists c0 c1 c2, image 1 c0 c2 c1, image 2 c0 c2 c1
    assert stable_ranks(S, dim=1).tolist() == [[0, 1, 2], [0, 2, 1], [0, 2, 1]]
    # columns (r_b): c0 lists images 1 2 0, c1 lists 0 1 2, c2 lists 2 1 0
    assert stable_ranks(S, dim=0).tolist() == [[2, 0, 2], [0, 1, 1], [1, 2, 0]]
    assert stable_ranks(torch.zeros(2, 3), dim=1).tolist() == [[0, 1, 2], [0, 1, 2]]  # ties: by index


def test_hand_computed_case():
    # K=1: a pair is re-weighted when r_f = 0 or r_b = 0; W = 1 + 2 ** -(r_f + r_b).
    # shifted scores S - 0.10:   (0,0) r_f 0 r_b 2 -> W 1.25: 0.40 -> 0.50
    #   (0,1) 1+0 -> 1.5: 0.38 -> 0.57   (0,2) 2, 2 -> outside: 0.00
    #   (1,0) 0+0 -> 2:   0.60 -> 1.20   (1,1) 2, 1 -> outside: 0.10   (1,2) 1, 1 -> outside: 0.20
    #   (2,0) 0+1 -> 1.5: 0.50 -> 0.75   (2,1) 2, 2 -> outside: 0.00   (2,2) 1+0 -> 1.5: 0.30 -> 0.45
    expected = torch.tensor([[0.50, 0.57, 0.00], [1.20, 0.10, 0.20], [0.75, 0.00, 0.45]])
    out = smr_rerank(S, k=1, w=1.0, beta=HALVING)
    assert torch.allclose(out, expected, atol=1e-5)
    # image 0 now prefers c1 over its own c0: its i2t rank goes from 0 to 1
    ci = caption_to_image(3, 1)
    assert ranks_i2t(S, ci).tolist() == [0, 2, 1] and ranks_i2t(out, ci).tolist() == [1, 2, 1]


def test_every_knob_changes_the_output():
    base = smr_rerank(S, k=1, w=1.0, beta=HALVING)
    for kwargs in ({"k": 3}, {"w": 2.0}, {"beta": 0.1}):
        assert not torch.allclose(smr_rerank(S, **{"k": 1, "w": 1.0, "beta": HALVING, **kwargs}), base)
    # K=3 re-weights every pair: (1,1), r_f 2 and r_b 1, gets W = 1 + 2 ** -3 on its shifted 0.10
    assert smr_rerank(S, k=3, w=1.0, beta=HALVING)[1, 1] == pytest.approx(0.10 * (1 + 2**-3), abs=1e-5)


def test_w_zero_only_shifts():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 18, generator=g)
    out = smr_rerank(x, k=30, w=0.0)
    assert torch.equal(out, x - x.min() + SHIFT_EPS)
    assert torch.equal(stable_ranks(out, 1), stable_ranks(x, 1)) and torch.equal(
        stable_ranks(out, 0), stable_ranks(x, 0)
    )


def reference_smr(x: torch.Tensor, k: int, w: float, beta: float) -> torch.Tensor:
    """Pair by pair, with Python lists and sorting."""
    rows, (n_img, n_txt) = x.tolist(), x.shape
    fwd = [sorted(range(n_txt), key=lambda j: (-rows[i][j], j)) for i in range(n_img)]
    bwd = [sorted(range(n_img), key=lambda i: (-rows[i][j], i)) for j in range(n_txt)]
    low = min(min(r) for r in rows)
    out = torch.empty(n_img, n_txt)
    for i in range(n_img):
        for j in range(n_txt):
            r_f, r_b = fwd[i].index(j), bwd[j].index(i)
            weight = 1 + w * math.exp(-beta * (r_f + r_b) / 2) if r_f < k or r_b < k else 1.0
            out[i, j] = (rows[i][j] - low + SHIFT_EPS) * weight
    return out


def test_matches_a_pair_by_pair_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 5, (7, 21), generator=g).float() / 4  # with ties
    for k, w, beta in ((1, 1.0, 0.1), (3, 0.5, 0.7), (30, 1.0, 0.1)):
        assert torch.allclose(smr_rerank(x, k, w, beta), reference_smr(x, k, w, beta), atol=1e-6)


def test_config_check_and_bad_arguments():
    assert list(SMRConfig().check()) == []
    assert SMRConfig() == SMRConfig(k=30, w=1.0, beta=0.1)
    problems = dict(SMRConfig(k=0, w=-1.0, beta=float("nan")).check())
    assert set(problems) == {"k", "w", "beta"} and "got 0" in problems["k"]
    with pytest.raises(ValueError, match="smr.k"):
        smr_rerank(S, k=0)
    with pytest.raises(ValueError, match="finite"):
        smr_rerank(torch.tensor([[0.0, float("inf")]]))
