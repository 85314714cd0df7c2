"""Efficient hybrid encoder: position embedding, RepVGG fusion, CSP layer, AIFI and CCFF (facts 3.2)."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_batch_norms
from torch import nn

from rtdetr.models.layers import ConvNormLayer
from rtdetr.models.hybrid_encoder import (
    CSPRepLayer,
    HybridEncoder,
    RepVggBlock,
    build_2d_sincos_position_embedding,
)


def official_position_embedding(w: int, h: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The official v1 `build_2d_sincos_position_embedding(w, h, ...)`, written from facts 3.2."""
    grid_w = torch.arange(int(w), dtype=torch.float32)
    grid_h = torch.arange(int(h), dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1.0 / (temperature**omega)
    out_w = grid_w.flatten()[..., None] @ omega[None]
    out_h = grid_h.flatten()[..., None] @ omega[None]
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None, :, :]


def natural_position_embedding(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Token k of a row-major h x w map sits at (k // w, k % w): [sin(r w_k), cos(r w_k), sin(c w_k), cos(c w_k)]."""
    rows = torch.arange(h, dtype=torch.float32).repeat_interleave(w)[:, None]
    cols = torch.arange(w, dtype=torch.float32).repeat(h)[:, None]
    omega = temperature ** -(torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    return torch.cat([(rows * omega).sin(), (rows * omega).cos(), (cols * omega).sin(), (cols * omega).cos()], 1)[None]


def test_position_embedding_hand_checked_2x3():
    # dim 8 -> pos_dim 2, w_k = 1 / 10000^(k/2): w_0 = 1, w_1 = 1/100.
    # Token k of a row-major flattened 2x3 map is (row, col) = (k // 3, k % 3).
    expected = []
    for row in range(2):
        for col in range(3):
            expected.append(
                [
                    math.sin(row * 1.0), math.sin(row / 100.0),
                    math.cos(row * 1.0), math.cos(row / 100.0),
                    math.sin(col * 1.0), math.sin(col / 100.0),
                    math.cos(col * 1.0), math.cos(col / 100.0),
                ]
            )  # fmt: skip
    got = build_2d_sincos_position_embedding(2, 3, 8)
    assert got.shape == (1, 6, 8)
    torch.testing.assert_close(got[0], torch.tensor(expected), atol=1e-6, rtol=0)


def test_position_embedding_temperature_is_used():
    got = build_2d_sincos_position_embedding(1, 2, 8, temperature=4.0)
    # col 1, w_1 = 1/4^(1/2) = 0.5
    assert got[0, 1, 5].item() == pytest.approx(math.sin(0.5), abs=1e-6)


@pytest.mark.parametrize("n,dim", [(1, 8), (4, 16), (5, 32), (20, 256)])
def test_position_embedding_equals_official_on_square_maps(n, dim):
    assert torch.equal(build_2d_sincos_position_embedding(n, n, dim), official_position_embedding(n, n, dim))


def test_position_embedding_rejects_dim_not_divisible_by_4():
    with pytest.raises(ValueError):
        build_2d_sincos_position_embedding(2, 2, 6)


def tiny_encoder(**kw) -> HybridEncoder:
    args = dict(
        in_channels=[8, 16, 32], hidden_dim=16, nhead=4, dim_feedforward=32, expansion=0.5, depth_mult=0.34
    )
    args.update(kw)
    return HybridEncoder(**args)


def test_position_embedding_is_cached_per_size():
    enc = tiny_encoder()
    like = torch.zeros(1)
    a = enc.position_embedding(3, 3, like)
    assert enc.position_embedding(3, 3, like) is a
    b = enc.position_embedding(2, 5, like)
    assert b is not a and b.shape == (1, 10, 16)
    torch.testing.assert_close(b, natural_position_embedding(2, 5, 16), atol=1e-5, rtol=0)
    assert enc.position_embedding(3, 3, like) is a
    # not persistent: never in the state dict
    assert not any("pos" in k for k in enc.state_dict())


def test_repvgg_fuse_equals_two_branches():
    torch.manual_seed(0)
    block = RepVggBlock(6, 6)
    randomize_batch_norms(block)
    block.eval()
    x = torch.randn(2, 6, 7, 5)
    with torch.no_grad():
        before = block(x)
        block.fuse()
        assert isinstance(block.conv, nn.Conv2d) and block.conv.kernel_size == (3, 3) and block.conv.bias is not None
        after = block(x)
    assert (before - after).abs().max().item() < 1e-5
    # and the fused conv alone reproduces it (forward really uses self.conv)
    with torch.no_grad():
        torch.testing.assert_close(F.silu(block.conv(x)), before, atol=1e-5, rtol=0)


def test_repvgg_block_by_value():
    torch.manual_seed(0)
    block = RepVggBlock(4, 4)
    randomize_batch_norms(block)
    block.eval()
    x = torch.randn(1, 4, 5, 5)

    def bn(y, n):
        return (y - n.running_mean[:, None, None]) / torch.sqrt(n.running_var[:, None, None] + n.eps) * n.weight[
            :, None, None
        ] + n.bias[:, None, None]

    with torch.no_grad():
        a = bn(F.conv2d(x, block.conv1.conv.weight, padding=1), block.conv1.norm)
        b = bn(F.conv2d(x, block.conv2.conv.weight), block.conv2.norm)
        torch.testing.assert_close(block(x), F.silu(a + b), atol=1e-5, rtol=0)


def test_csp_rep_layer_conv3_depends_on_expansion():
    full = CSPRepLayer(32, 16, num_blocks=3, expansion=1.0)
    assert isinstance(full.conv3, nn.Identity)
    assert len(full.bottlenecks) == 3
    assert full.conv1.conv.out_channels == 16
    half = CSPRepLayer(32, 16, num_blocks=1, expansion=0.5)
    assert isinstance(half.conv3, ConvNormLayer)
    assert (half.conv3.conv.in_channels, half.conv3.conv.out_channels) == (8, 16)
    assert half.conv1.conv.out_channels == half.conv2.conv.out_channels == 8


def test_csp_rep_layer_by_value():
    torch.manual_seed(0)
    layer = CSPRepLayer(8, 8, num_blocks=2, expansion=0.5)
    randomize_batch_norms(layer)
    layer.eval()
    first, second = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    x = torch.cat([first, second], 1)
    with torch.no_grad():
        x1 = layer.bottlenecks[1](layer.bottlenecks[0](layer.conv1(x)))
        ref = layer.conv3(x1 + layer.conv2(x))
        torch.testing.assert_close(layer(first, second), ref)


@pytest.mark.parametrize("first_hw", [(3, 5), (6, 10)])  # half size (upsampled inside) and same size
def test_csp_rep_layer_fuse_equals_unfused(first_hw):
    torch.manual_seed(0)
    layer = CSPRepLayer(12, 8, num_blocks=2, expansion=0.5)
    randomize_batch_norms(layer)
    layer.eval()
    first, second = torch.randn(2, 6, *first_hw), torch.randn(2, 6, 6, 10)
    with torch.no_grad():
        up = F.interpolate(first, size=(6, 10), mode="nearest")
        x = torch.cat([up, second], 1)
        ref = layer.conv3(layer.bottlenecks(layer.conv1(x)) + layer.conv2(x))
        layer.fuse()
        assert not hasattr(layer, "conv1") and not hasattr(layer, "conv2")
        assert layer.conv_first.in_channels == layer.conv_second.in_channels == 6
        got = layer(first, second)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ---- AIFI + CCFF against a reference written from the facts pseudo-code ----------------------------------


def reference_aifi(enc: HybridEncoder, s5: torch.Tensor) -> torch.Tensor:
    b, c, h, w = s5.shape
    layer = enc.encoder[0].layers[0]
    src = s5.flatten(2).permute(0, 2, 1)
    pos = natural_position_embedding(h, w, c)
    attn = layer.self_attn
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    heads = attn.num_heads

    def split(t):
        return t.reshape(b, -1, heads, c // heads).transpose(1, 2)

    q = split(F.linear(src + pos, wq, bq))
    k = split(F.linear(src + pos, wk, bk))
    v = split(F.linear(src, wv, bv))  # the position embedding is NOT added to the values
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), -1) @ v
    a = attn.out_proj(a.transpose(1, 2).reshape(b, -1, c))
    src = layer.norm1(src + a)
    src = layer.norm2(src + layer.linear2(F.gelu(layer.linear1(src))))
    return src.permute(0, 2, 1).reshape(b, c, h, w)


def reference_csp(block: CSPRepLayer, x: torch.Tensor) -> torch.Tensor:
    return block.conv3(block.bottlenecks(block.conv1(x)) + block.conv2(x))


def reference_ccff(enc: HybridEncoder, feats):
    proj = [enc.input_proj[i](f) for i, f in enumerate(feats)]
    proj[2] = reference_aifi(enc, proj[2])
    inner = [proj[2]]
    for idx in (2, 1):
        hi = enc.lateral_convs[2 - idx](inner[0])
        inner[0] = hi
        up = F.interpolate(hi, scale_factor=2.0, mode="nearest")
        inner.insert(0, reference_csp(enc.fpn_blocks[2 - idx], torch.cat([up, proj[idx - 1]], 1)))
    outs = [inner[0]]
    for idx in (0, 1):
        d = enc.downsample_convs[idx](outs[-1])
        outs.append(reference_csp(enc.pan_blocks[idx], torch.cat([d, inner[idx + 1]], 1)))
    return outs


@pytest.mark.parametrize("image_hw", [(256, 320), (128, 128)])
def test_encoder_forward_matches_reference(image_hw):
    torch.manual_seed(0)
    enc = tiny_encoder()
    randomize_batch_norms(enc)
    enc.eval()
    h, w = image_hw
    feats = [torch.randn(2, c, h // s, w // s) for c, s in zip([8, 16, 32], [8, 16, 32])]
    with torch.no_grad():
        outs = enc(feats)
        ref = reference_ccff(enc, feats)
    assert [tuple(o.shape) for o in outs] == [(2, 16, h // s, w // s) for s in (8, 16, 32)]
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_encoder_structure_counts():
    enc = tiny_encoder(depth_mult=1.0, expansion=1.0, num_encoder_layers=2)
    assert len(enc.encoder) == 1 and len(enc.encoder[0].layers) == 2
    for block in [*enc.fpn_blocks, *enc.pan_blocks]:
        assert len(block.bottlenecks) == 3 and isinstance(block.conv3, nn.Identity)
    assert all(c.conv.stride == (2, 2) and c.conv.kernel_size == (3, 3) for c in enc.downsample_convs)
    assert all(c.conv.kernel_size == (1, 1) for c in enc.lateral_convs)
    # v1 naming of the input projections: Sequential(conv, bn) -> keys .0 / .1
    keys = set(enc.state_dict())
    assert {"input_proj.0.0.weight", "input_proj.0.1.running_var"} <= keys
