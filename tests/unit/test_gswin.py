"""rsray.models.gswin: the global-window branch is exactly what cmpagl.md says, starts as a no-op
on a pretrained Swin, and is the only way a distant window reaches a token."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch

from rsray.models.gswin import GlobalWindowAttention, Gswin, GswinBlock

TINY = dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)


def tiny_swin(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, **TINY).eval()


def test_with_its_zero_projection_a_gswin_block_computes_the_timm_block_exactly():
    swin = tiny_swin()
    for block in swin.layers[0].blocks:  # the second block is a shifted one
        x = torch.randn(2, 16, 16, 16)
        reference = block(x)
        adopted = GswinBlock.adopt(copy.deepcopy(block))
        assert isinstance(adopted, GswinBlock) and adopted.global_attn.window == 4
        assert torch.equal(adopted(x), reference)
    images = torch.randn(2, 3, 64, 64)
    gswin = Gswin(global_stages=(0, 1), **TINY)
    gswin.swin.load_state_dict(swin.state_dict(), strict=False)
    gswin.eval()
    tokens = gswin(images)
    patches = swin.forward_features(images).flatten(1, 2)
    assert tokens.shape == (2, 1 + 64, 32)  # 8x8 patches of 32 channels after the last stage, mean first
    assert torch.equal(tokens[:, 1:], patches) and torch.allclose(tokens[:, 0], patches.mean(1))


def test_a_distant_window_reaches_a_token_only_through_the_global_branch():
    block = tiny_swin().layers[0].blocks[0]  # 16x16 map, 4x4 windows, no shift
    x = torch.randn(1, 16, 16, 16)
    far = x.clone()
    far[:, 12:, 12:] += torch.randn(1, 4, 4, 16)  # the bottom-right window only (not a constant: LayerNorm)
    assert torch.equal(block(x)[:, :4, :4], block(far)[:, :4, :4])  # Swin: the top-left window cannot see it
    gswin = GswinBlock.adopt(copy.deepcopy(block))
    assert torch.equal(gswin(x)[:, :4, :4], gswin(far)[:, :4, :4])  # zero projection: still nothing
    torch.nn.init.normal_(gswin.global_attn.proj.weight)
    assert not torch.allclose(gswin(x)[:, :4, :4], gswin(far)[:, :4, :4])  # through the global window


def test_global_window_attention_equals_the_formula():
    torch.manual_seed(3)
    attention = GlobalWindowAttention(dim=8, heads=2, window=2)
    for p in attention.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 4, 6, 8)  # B, H, W, C: pooled 2x2 over a 4x6 map = means of 2x3 blocks
    pooled = torch.stack(
        [x[:, i * 2 : i * 2 + 2, j * 3 : j * 3 + 3].mean(dim=(1, 2)) for i in range(2) for j in range(2)], dim=1
    )

    def layer_norm(t, norm):
        mean, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias

    q = layer_norm(x.reshape(2, 24, 8), attention.norm_q) @ attention.q.weight.T + attention.q.bias
    kv = layer_norm(pooled, attention.norm_kv) @ attention.kv.weight.T + attention.kv.bias
    k, v = kv[..., :8], kv[..., 8:]
    heads = []
    for h in range(2):
        part = slice(4 * h, 4 * h + 4)
        weights = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(4), dim=-1)
        heads.append(weights @ v[..., part])
    expected = torch.cat(heads, -1) @ attention.proj.weight.T + attention.proj.bias
    torch.testing.assert_close(attention(x), expected.reshape(2, 4, 6, 8), atol=1e-5, rtol=1e-5)


def test_after_one_step_every_global_parameter_gets_a_gradient():
    gswin = Gswin(global_stages=(0, 1), **TINY).train()
    optimizer = torch.optim.SGD(gswin.parameters(), lr=0.1)
    images = torch.randn(2, 3, 64, 64)
    global_params = {n: p for n, p in gswin.named_parameters() if ".global_attn." in n}
    assert len(global_params) == 4 * 10  # 4 blocks x (2 norms x 2, q x 2, kv x 2, proj x 2)
    for _ in range(2):  # first step: only the zero projection moves; then everything has a gradient
        optimizer.zero_grad()
        gswin(images).square().mean().backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in global_params.values())


def test_swin_weights_load_from_a_local_file_and_only_global_keys_are_new(tmp_path):
    swin = tiny_swin(seed=5)
    path = tmp_path / "swin.pth"
    torch.save(swin.state_dict(), path)
    gswin = Gswin(checkpoint=path, global_stages=(0,), **TINY)
    timm_keys, own = set(swin.state_dict()), gswin.swin.state_dict()
    assert set(own) - timm_keys == {k for k in own if ".global_attn." in k} and set(own) >= timm_keys
    assert all(torch.equal(own[k], v) for k, v in swin.state_dict().items())
    partial = {k: v for k, v in swin.state_dict().items() if not k.startswith("layers.1.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial.pth: \d+ Swin weights missing \(first: layers.1."):
        Gswin(checkpoint=tmp_path / "partial.pth", **TINY, global_stages=(0,))
    with pytest.raises(ValueError, match="global stage 2 does not exist"):
        Gswin(global_stages=(2,), **TINY)


def test_the_paper_sized_global_branch_adds_the_counted_parameters():
    with torch.device("meta"):
        gswin = Gswin("swin_tiny_patch4_window7_224", global_stages=(0, 1, 2))
    added = sum(p.numel() for n, p in gswin.named_parameters() if ".global_attn." in n)
    # per block at width C: two LayerNorms (4C), q (C^2 + C), kv (2C^2 + 2C), proj (C^2 + C)
    per_block = {c: 4 * c * c + 8 * c for c in (96, 192, 384)}
    assert added == 2 * per_block[96] + 2 * per_block[192] + 6 * per_block[384] == 3_930_624
    swin_only = sum(p.numel() for n, p in gswin.named_parameters() if ".global_attn." not in n)
    assert swin_only == 27_519_354  # timm's Swin-T without its head: 27.52 M (cmpagl.md §4)


def test_global_window_attention_runs_under_bf16_autocast():
    attention = GlobalWindowAttention(dim=16, heads=4, window=2)
    torch.nn.init.normal_(attention.proj.weight)
    x = torch.randn(1, 4, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attention(x)
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), attention(x), atol=0.1)


def test_the_global_branch_sits_between_window_attention_and_the_mlp():
    """x1 = x + W-MSA(LN1(x)); x2 = x1 + GlobalAttn(x1) (the branch normalises its own inputs);
    out = x2 + MLP(LN2(x2)), in eval mode (no drop path), with a non-zero global projection."""
    block = GswinBlock.adopt(copy.deepcopy(tiny_swin().layers[0].blocks[1])).eval()  # a shifted block
    with torch.no_grad():
        torch.nn.init.normal_(block.global_attn.proj.weight, std=0.5)
        x = torch.randn(2, 16, 16, 16)
        x1 = x + block._attn(block.norm1(x))
        x2 = x1 + block.global_attn(x1)
        expected = x2 + block.mlp(block.norm2(x2))
        torch.testing.assert_close(block(x), expected)
        assert not torch.allclose(expected, x1 + block.mlp(block.norm2(x1)), atol=1e-3)  # the branch counts
