"""SWAN's blocks against direct transcriptions of their formulas, written here with loops over
heads, tokens and windows, on small float64 tensors: a changed detail (activation, mask, division,
axis of a mean, pooling index) makes one of these fail, not only "the outputs differ"."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rsray.models.blocks import GSA, JRU, WSA, GatedSelfAttention, SelfAttentionBlock, masked_batch_norm
from rsray.models.encoders import last_valid, masked_mean

pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture
def float64():
    """Modules and tensors made in a test are float64: the hand transcriptions compare closely."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """y = W x + b for one vector."""
    return layer.weight @ x + layer.bias


def gated_attention_by_hand(
    attn: GatedSelfAttention, x: torch.Tensor, valid: torch.Tensor | None, floor: bool = False
) -> torch.Tensor:
    """The GSA formula, one sample, head and query at a time:
    G = gate_q(q_h) * gate_k(k_h); [M_Q, M_K] = sigmoid(gate(G)); q_h, k_h scaled by them;
    a_ij = softmax_j over valid keys of (q_i . k_j) / sqrt(d); out_i = sum_j a_ij v_j; heads concatenated."""
    batch, length, dim = x.shape
    d = attn.head_dim
    out = torch.zeros_like(x)
    for b in range(batch):
        q = [linear(attn.q, x[b, t]) for t in range(length)]
        k = [linear(attn.k, x[b, t]) for t in range(length)]
        v = [linear(attn.v, x[b, t]) for t in range(length)]
        for h in range(attn.heads):
            part = slice(h * d, (h + 1) * d)
            gated_q, gated_k = [], []
            for t in range(length):
                g = linear(attn.gate_q, q[t][part]) * linear(attn.gate_k, k[t][part])
                masks = torch.sigmoid(linear(attn.gate, g))
                gated_q.append(q[t][part] * masks[:d])
                gated_k.append(k[t][part] * masks[d:])
            keys = [j for j in range(length) if valid is None or bool(valid[b, j])]
            for i in range(length):
                divide = (lambda a, b: torch.floor(a / b)) if floor else (lambda a, b: a / b)
                logits = torch.stack([divide(gated_q[i] @ gated_k[j], math.sqrt(d)) for j in keys])
                weights = torch.softmax(logits, dim=0)
                out[b, i, part] = sum(w * v[j][part] for w, j in zip(weights, keys, strict=True))
    return out


@pytest.mark.parametrize("heads", [1, 2])
def test_gated_self_attention_is_its_formula(heads):
    torch.manual_seed(0)
    attn = GatedSelfAttention(8, heads)
    x = torch.randn(2, 5, 8)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        torch.testing.assert_close(attn(x), gated_attention_by_hand(attn, x, None))
        torch.testing.assert_close(attn(x, key_padding_mask=~valid), gated_attention_by_hand(attn, x, valid))


def test_the_releases_floor_division_is_reproduced_and_starves_the_gates():
    torch.manual_seed(5)
    attn = GatedSelfAttention(8, 2, floor_divide=True)
    x = torch.randn(2, 4, 8) * 3
    out = attn(x)
    torch.testing.assert_close(out, gated_attention_by_hand(attn, x, None, floor=True))
    out.sum().backward()
    for layer in (attn.q, attn.k, attn.gate_q, attn.gate_k, attn.gate):
        assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))  # floor: zero gradient
    assert attn.v.weight.grad.abs().sum() > 0


def test_gsa_block_adds_batch_normed_attention_from_valid_tokens_and_zeroes_padding():
    torch.manual_seed(1)
    block = GSA(8, heads=2, dropout=0.0).train()
    x = torch.randn(3, 4, 8)
    valid = torch.tensor([[True] * 4, [True, True, False, False], [True, True, True, False]])
    with torch.no_grad():
        attended = gated_attention_by_hand(block.attn, x, valid)
        rows = attended[valid]  # BatchNorm statistics over the valid tokens only (biased variance)
        normed = (attended - rows.mean(0)) / torch.sqrt(rows.var(0, unbiased=False) + block.norm.eps)
        expected = (x + normed * block.norm.weight + block.norm.bias) * valid.unsqueeze(-1)
        torch.testing.assert_close(block(x, valid), expected)
        release = block(x)  # valid=None: every position attends and is normalised, as the release
        everything = gated_attention_by_hand(block.attn, x, None).reshape(-1, 8)
        normed = (everything - everything.mean(0)) / torch.sqrt(everything.var(0, unbiased=False) + block.norm.eps)
        torch.testing.assert_close(release, x + (normed * block.norm.weight + block.norm.bias).reshape(3, 4, 8))


def test_wsa_pools_the_row_mean_of_w_transposed_x():
    """WSA(X) = mean over the rows of W^T X ([D, D]): element d is (1/D) sum_k sum_t W[t, k] X[t, d]."""
    torch.manual_seed(2)
    wsa = WSA(num_tokens=3, dim=4, heads=2, ffn_dim=8)
    wsa.block = nn.Identity()  # the self-attention block is tested as torch's; the pooling is WSA's own
    x = torch.randn(2, 3, 4)
    expected = torch.zeros(2, 4)
    for b in range(2):
        for d in range(4):
            expected[b, d] = sum(wsa.token_weight[t, k] * x[b, t, d] for t in range(3) for k in range(4)) / 4
    with torch.no_grad():
        torch.testing.assert_close(wsa(x), expected)
        torch.testing.assert_close(wsa(x, explicit=True), expected)


@pytest.mark.parametrize("ffn_norm, activation", [(False, "gelu"), (True, "gelu"), (False, "relu")])
def test_self_attention_block_is_post_ln_with_its_feed_forward(ffn_norm, activation):
    """x = LN(x + MHA(x)); x = LN(x + W2 GELU(W1 x)), or W2 GELU(LN(W1 x)) with PIR's inner
    LayerNorm, or ReLU for SWAN's paper WSA."""
    torch.manual_seed(3)
    block = SelfAttentionBlock(4, heads=2, ffn_dim=8, dropout=0.0, ffn_norm=ffn_norm, activation=activation)
    block.eval()
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        attended, _ = block.attn(x, x, x, need_weights=False)
        h = nn.functional.layer_norm(x + attended, (4,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
        first = block.ffn[0](h)
        if ffn_norm:
            inner = block.ffn[1]
            assert isinstance(inner, nn.LayerNorm) and inner.normalized_shape == (8,)
            first = nn.functional.layer_norm(first, (8,), inner.weight, inner.bias, inner.eps)
        act = nn.functional.gelu if activation == "gelu" else nn.functional.relu
        ffn = block.ffn[-1](act(first))
        expected = nn.functional.layer_norm(h + ffn, (4,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
        torch.testing.assert_close(block(x), expected)


def test_jru_is_two_strided_convolutions_batch_norm_relu_concatenated_along_the_sequence():
    """Window j of kernel k covers words jk..jk+k-1: y_j = ReLU(BN(sum_i W_i x_{jk+i} + b)); the
    k=2 windows come first, then the k=3 ones; a window is valid when it lies inside the caption,
    and windows past it are 0."""
    torch.manual_seed(4)
    jru = JRU(3).eval()
    for norm in jru.norms:  # eval BatchNorm with non-trivial running statistics
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    x, lengths = torch.randn(2, 7, 3), torch.tensor([7, 5])
    expected_rows, expected_valid = [], []
    for k, conv, norm in zip((2, 3), jru.convs, jru.norms, strict=True):
        for j in range(7 // k):
            pre = sum(conv.weight[:, :, i] @ x[:, j * k + i].t() for i in range(k)).t() + conv.bias
            bn = (pre - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
            inside = (j + 1) * k <= lengths
            expected_rows.append(torch.relu(bn) * inside[:, None])  # windows past the caption stay 0
            expected_valid.append(inside)
    with torch.no_grad():
        y, valid = jru(x, lengths)
    torch.testing.assert_close(y, torch.stack(expected_rows, dim=1))
    assert torch.equal(valid, torch.stack(expected_valid, dim=1))


def test_masked_batch_norm_takes_statistics_from_valid_tokens_and_leaves_padding_at_zero():
    bn = nn.BatchNorm1d(2, affine=False).train()
    x = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]], [[5.0, 4.0], [0.0, 0.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    out = masked_batch_norm(bn, x, valid)
    rows = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 4.0]])  # the 100s are padding: no influence
    expected = (rows - rows.mean(0)) / torch.sqrt(rows.var(0, unbiased=False) + bn.eps)
    torch.testing.assert_close(out[valid], expected)
    assert torch.equal(out[~valid], torch.zeros(3, 2))


def test_text_pooling_last_is_the_last_valid_token_and_mean_skips_padding():
    x = torch.arange(2 * 4 * 1, dtype=torch.float64).reshape(2, 4, 1)  # row 0: 0..3, row 1: 4..7
    lengths = torch.tensor([4, 2])
    assert last_valid(x, lengths).flatten().tolist() == [3.0, 5.0]  # positions 3 and 1
    mask = torch.arange(4)[None, :] < lengths[:, None]
    assert masked_mean(x, mask).flatten().tolist() == [1.5, 4.5]  # (0+1+2+3)/4, (4+5)/2
