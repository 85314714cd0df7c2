"""ResNet-vd backbone: FrozenBatchNorm2d, freezing, output shapes and the variant-D shortcut (facts 3.1)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_batch_norms
from torch import nn

from rtdetr.models.backbone import BasicBlock, BottleNeck, PResNet
from rtdetr.models.layers import ConvNormLayer, FrozenBatchNorm2d, freeze_batch_norms

TINY = dict(stem_channels=16, stage_channels=(16, 32, 64, 128), stage_blocks=(1, 1, 1, 1))


def test_frozen_batch_norm_equals_batch_norm_in_eval():
    bn = nn.BatchNorm2d(6)
    randomize_batch_norms(bn)
    bn.eval()
    frozen = FrozenBatchNorm2d(6)
    # Loading the BatchNorm2d state dict (which holds num_batches_tracked) must work strictly: the extra
    # buffer is dropped, as the official FrozenBatchNorm2d does.
    sd = bn.state_dict()
    assert "num_batches_tracked" in sd
    frozen.load_state_dict(sd, strict=True)
    assert "num_batches_tracked" not in frozen.state_dict()
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    assert list(frozen.parameters()) == []  # everything is a buffer

    x = torch.randn(2, 6, 5, 7)
    torch.testing.assert_close(frozen(x), bn(x), atol=1e-6, rtol=1e-5)
    # And the documented formula, written out.
    scale = bn.weight / torch.sqrt(bn.running_var + 1e-5)
    ref = (x - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]
    torch.testing.assert_close(frozen(x), ref.detach(), atol=1e-6, rtol=1e-5)


def test_frozen_batch_norm_ignores_train_mode():
    frozen = FrozenBatchNorm2d(3)
    randomize_batch_norms(frozen)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = torch.randn(4, 3, 2, 2) * 5 + 3
    y_train = frozen.train()(x)
    y_eval = frozen.eval()(x)
    torch.testing.assert_close(y_train, y_eval)
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]), k


def _frozen_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def test_freeze_at_minus_one_freezes_nothing():
    model = PResNet(18, **TINY, freeze_at=-1)
    assert _frozen_names(model) == set()


def test_freeze_at_zero_freezes_only_stem():
    model = PResNet(18, **TINY, freeze_at=0)
    frozen = _frozen_names(model)
    stem = {n for n, _ in model.named_parameters() if n.startswith("conv1.")}
    assert stem and frozen == stem
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("res_layers."))


def test_freeze_at_one_freezes_stem_and_first_stage():
    model = PResNet(18, **TINY, freeze_at=1)
    expected = {n for n, _ in model.named_parameters() if n.startswith(("conv1.", "res_layers.0."))}
    assert _frozen_names(model) == expected


def test_freeze_norm_replaces_every_batch_norm():
    model = PResNet(50, stem_channels=16, stage_channels=(8, 16, 32, 64), stage_blocks=(1, 1, 1, 1), freeze_norm=True)
    kinds = [type(m) for m in model.modules()]
    assert nn.BatchNorm2d not in kinds
    assert kinds.count(FrozenBatchNorm2d) == sum(isinstance(m, ConvNormLayer) for m in model.modules())
    assert not any("num_batches_tracked" in k for k in model.state_dict())


def test_freeze_batch_norms_copies_values():
    torch.manual_seed(0)
    model = PResNet(18, **TINY)
    randomize_batch_norms(model, seed=1)
    model.eval()
    frozen = freeze_batch_norms(copy.deepcopy(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    ref_sd, got_sd = model.state_dict(), frozen.state_dict()
    assert set(got_sd) == {k for k in ref_sd if not k.endswith("num_batches_tracked")}
    for k, v in got_sd.items():
        assert torch.equal(v, ref_sd[k]), k
    x = torch.rand(1, 3, 64, 64)
    for a, b in zip(model(x), frozen(x)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "depth,channels",
    [(18, [128, 256, 512]), (50, [512, 1024, 2048])],
)
def test_output_channels_and_strides(depth, channels):
    torch.manual_seed(0)
    model = PResNet(depth).eval()
    assert model.out_channels == channels
    with torch.no_grad():
        outs = model(torch.rand(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, c, s, s) for c, s in zip(channels, (8, 4, 2))]


def test_stage_layout_of_official_depths():
    """Blocks per stage, projection in block 0 of every stage (also stage 2 of R18), stride placement."""
    for depth, counts in [(18, (2, 2, 2, 2)), (34, (3, 4, 6, 3)), (50, (3, 4, 6, 3)), (101, (3, 4, 23, 3))]:
        model = PResNet(depth)
        assert tuple(len(s.blocks) for s in model.res_layers) == counts
        for i, stage in enumerate(model.res_layers):
            first = stage.blocks[0]
            assert hasattr(first, "short") and not first.shortcut
            assert all(b.shortcut and not hasattr(b, "short") for b in stage.blocks[1:])
            if i == 0:  # stride 1: a plain 1x1 ConvNormLayer
                assert isinstance(first.short, ConvNormLayer) and first.short.conv.stride == (1, 1)
            else:  # variant D: AvgPool2d(2, 2, ceil_mode) then 1x1 conv with stride 1
                assert isinstance(first.short, nn.Sequential)
                assert list(first.short._modules) == ["pool", "conv"]
                pool = first.short.pool
                assert isinstance(pool, nn.AvgPool2d)
                assert (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode) == (2, 2, 0, True)
                assert first.short.conv.conv.kernel_size == (1, 1) and first.short.conv.conv.stride == (1, 1)
            strided = first.branch2b if depth >= 50 else first.branch2a  # variant D: stride on the 3x3
            assert strided.conv.kernel_size == (3, 3)
            assert strided.conv.stride == ((1, 1) if i == 0 else (2, 2))


# ---- hand-written reference computations of one block (eval-mode BN) ------------------------------------


def _conv_bn(x, layer: ConvNormLayer, stride: int, relu: bool):
    w = layer.conv.weight
    y = F.conv2d(x, w, stride=stride, padding=(w.shape[-1] - 1) // 2)
    n = layer.norm
    y = (y - n.running_mean[:, None, None]) / torch.sqrt(n.running_var[:, None, None] + n.eps)
    y = y * n.weight[:, None, None] + n.bias[:, None, None]
    return y.clamp(min=0) if relu else y


def _avg_pool_ceil(x):
    """2x2 stride-2 average over the valid pixels of each window, windows starting at 0, 2, 4, ... (ceil)."""
    b, c, h, w = x.shape
    oh, ow = -(-h // 2), -(-w // 2)
    out = torch.empty(b, c, oh, ow)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = x[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(dim=(-2, -1))
    return out


def test_vd_basic_block_by_value_with_odd_input():
    torch.manual_seed(0)
    block = BasicBlock(6, 8, stride=2, shortcut=False)
    randomize_batch_norms(block)
    block.eval()
    x = torch.randn(2, 6, 7, 9)  # odd sizes: the ceil-mode pool has partial windows
    with torch.no_grad():
        short = _conv_bn(_avg_pool_ceil(x), block.short.conv, 1, relu=False)
        main = _conv_bn(_conv_bn(x, block.branch2a, 2, relu=True), block.branch2b, 1, relu=False)
        ref = (main + short).clamp(min=0)
        got = block(x)
    assert got.shape == (2, 8, 4, 5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_vd_bottleneck_by_value():
    torch.manual_seed(0)
    block = BottleNeck(12, 4, stride=2, shortcut=False)
    randomize_batch_norms(block)
    block.eval()
    x = torch.randn(1, 12, 5, 6)
    with torch.no_grad():
        short = _conv_bn(_avg_pool_ceil(x), block.short.conv, 1, relu=False)
        y = _conv_bn(x, block.branch2a, 1, relu=True)
        y = _conv_bn(y, block.branch2b, 2, relu=True)
        y = _conv_bn(y, block.branch2c, 1, relu=False)
        ref = (y + short).clamp(min=0)
        got = block(x)
    assert got.shape == (1, 16, 3, 3)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_stem_and_max_pool_by_value():
    """Stem: three 3x3 ConvNormLayers (stride 2, 1, 1; ReLU each), then max_pool 3/2/1 -> stride 4."""
    torch.manual_seed(0)
    model = PResNet(18, **TINY)
    randomize_batch_norms(model)
    model.eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        y = _conv_bn(x, model.conv1.conv1_1, 2, relu=True)
        y = _conv_bn(y, model.conv1.conv1_2, 1, relu=True)
        y = _conv_bn(y, model.conv1.conv1_3, 1, relu=True)
        y = F.max_pool2d(y, 3, 2, 1)
        s2 = model.res_layers[0](y)
        ref_s3 = model.res_layers[1](s2)
        got_s3 = model(x)[0]
    assert y.shape[-2:] == (8, 8)
    torch.testing.assert_close(got_s3, ref_s3, atol=1e-5, rtol=1e-5)
