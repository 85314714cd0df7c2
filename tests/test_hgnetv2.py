"""HGNetv2 backbone (RT-DETR-L/X/H): official names and counts, parity with Hugging Face's HGNetV2, gradients, freezing.

The independent reference is transformers' `HGNetV2Backbone` (its D-FINE port of PP-HGNetV2). Read against the
official `rtdetrv2_pytorch/src/nn/backbone/hgnetv2.py`, it computes the same function:
- stem: HF pads stem1's output by one zero row/column on the right/bottom (`F.pad(x, (0, 1, 0, 1))`) once and
  feeds that both to stem2a (a 2x2 conv without padding) and to the 2x2/1 max pool, and pads stem2a's output the
  same way before stem2b; the official pads inside each `padding='same'` conv (`ZeroPad2d([0, 1, 0, 1])`) and
  before the pool. Same numbers, zero (not -inf) padding for the pool in both.
- the affine block (LAB) sits only after an activation in both, so light blocks' 1x1 conv1 and the stage
  downsample convs have none.
- differences that do not change the eval function: HF's default init draws convs from N(0, 0.02) (official:
  kaiming normal), its `drop_path` is an `nn.Dropout` (0 by default), and its names differ (`embedder`,
  `encoder.stages`, `convolution`/`normalization`, `aggregation.0/1`), mapped below.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import randomize_batch_norms
from torch import Tensor, nn

from rtdetr.models.hgnetv2 import ConvBNAct, HGNetv2, LearnableAffineBlock
from rtdetr.models.layers import FrozenBatchNorm2d

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data"

# Official full-detector parameter counts (all / trainable, v2 configs with freeze_at 0, freeze_norm True):
# the difference is the frozen stem's conv weights (its FrozenBatchNorm2d tensors are buffers).
OFFICIAL_FROZEN_STEM = {"L": 32_925_036 - 32_900_108, "X": 67_374_188 - 67_348_748, "H": 125_584_348 - 125_527_756}

# The official `arch_configs` written out again as HF config fields, so that a typo in our table shows.
HF_STAGES = {
    "L": dict(
        stem_channels=[3, 32, 48],
        stage_in_channels=[48, 128, 512, 1024],
        stage_mid_channels=[48, 96, 192, 384],
        stage_out_channels=[128, 512, 1024, 2048],
        stage_num_blocks=[1, 1, 3, 1],
    ),
    "X": dict(
        stem_channels=[3, 32, 64],
        stage_in_channels=[64, 128, 512, 1024],
        stage_mid_channels=[64, 128, 256, 512],
        stage_out_channels=[128, 512, 1024, 2048],
        stage_num_blocks=[1, 2, 5, 2],
    ),
    "H": dict(
        stem_channels=[3, 48, 96],
        stage_in_channels=[96, 192, 512, 1024],
        stage_mid_channels=[96, 192, 384, 768],
        stage_out_channels=[192, 512, 1024, 2048],
        stage_num_blocks=[2, 3, 6, 3],
    ),
}


def official_backbone_entries(arch: str) -> list[tuple[str, list[int]]]:
    """[key, shape] of the official detector's `backbone.` tensors, prefix stripped, in state-dict order."""
    entries = json.loads((DATA / f"official_keys_v2_hgnetv2_{arch.lower()}.json").read_text())
    return [(key.removeprefix("backbone."), shape) for key, shape in entries if key.startswith("backbone.")]


@pytest.mark.parametrize("arch", ["L", "X", "H"])
def test_state_dict_equals_official_names_and_shapes(arch):
    model = HGNetv2(arch, freeze_at=0, freeze_norm=True)
    ours = [(key, list(value.shape)) for key, value in model.state_dict().items()]
    official = official_backbone_entries(arch)
    assert len(ours) == len(official)
    assert ours == official  # order included
    assert model.out_channels == [512, 1024, 2048]


@pytest.mark.parametrize("arch", ["L", "X", "H"])
def test_parameter_counts_equal_official(arch):
    model = HGNetv2(arch, freeze_at=0, freeze_norm=True)
    # With frozen norms the official parameters are the conv weights: every entry but the `bn.*` buffers.
    official = sum(math.prod(shape) for key, shape in official_backbone_entries(arch) if ".bn." not in key)
    assert sum(p.numel() for p in model.parameters()) == official
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == OFFICIAL_FROZEN_STEM[arch]
    assert frozen == sum(p.numel() for p in model.stem.parameters())


def test_init_matches_official():
    model = HGNetv2("L", use_lab=True)
    conv = model.stages[3].blocks[0].aggregation_squeeze_conv.conv
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)  # kaiming normal, ReLU gain
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)
    labs = [m for m in model.modules() if isinstance(m, LearnableAffineBlock)]
    assert labs and all(m.scale.item() == 1 and m.bias.item() == 0 for m in labs)


def hf_backbone(arch: str, use_lab: bool, seed: int) -> nn.Module:
    """A random HF HGNetV2 with the official `arch` table: official (kaiming) conv init, O(1) BatchNorm
    statistics and affines, and LAB scales U(0.5, 1.5), biases N(0, 0.5)."""
    from transformers import HGNetV2Backbone, HGNetV2Config

    stages = HF_STAGES[arch]
    config = HGNetV2Config(
        **stages,
        stage_downsample=[False, True, True, True],
        stage_light_block=[False, False, True, True],
        stage_kernel_size=[3, 3, 5, 5],
        stage_numb_of_layers=[6, 6, 6, 6],
        use_learnable_affine_block=use_lab,
        embedding_size=stages["stem_channels"][2],
        depths=stages["stage_num_blocks"],
        hidden_sizes=stages["stage_out_channels"],
        out_features=["stage2", "stage3", "stage4"],
    )
    torch.manual_seed(seed)
    model = HGNetV2Backbone(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, generator=g)
            elif type(m).__name__ == "HGNetV2LearnableAffineBlock":
                m.scale.copy_(torch.rand(1, generator=g) + 0.5)
                m.bias.copy_(torch.randn(1, generator=g) * 0.5)
        if use_lab:
            # Negative, so that stem1's output has negative values where the max pool's zero padding (not -inf)
            # decides the border.
            model.embedder.stem1.lab.bias.fill_(-0.5)
    randomize_batch_norms(model, seed=seed)
    return model


def hf_to_ours(key: str) -> str:
    key = key.replace("embedder.", "stem.", 1).replace("encoder.stages.", "stages.", 1)
    key = key.replace(".convolution.", ".conv.").replace(".normalization.", ".bn.")
    key = key.replace(".aggregation.0.", ".aggregation_squeeze_conv.")
    key = key.replace(".aggregation.1.", ".aggregation_excitation_conv.")
    # The official 2x2 stem convs sit behind their padding: conv = Sequential(ZeroPad2d, Conv2d).
    return re.sub(r"^stem\.(stem2[ab])\.conv\.", r"stem.\1.conv.1.", key)


def assert_features_close(ours: list[Tensor], ref: list[Tensor]) -> None:
    assert [o.shape for o in ours] == [r.shape for r in ref]
    for o, r in zip(ours, ref):
        scale = r.abs().max()
        assert scale > 0 and (r != 0).float().mean() > 0.2  # a non-trivial map
        assert ((o - r).abs().max() / scale).item() <= 1e-4


@pytest.mark.parametrize(
    "arch, use_lab, freeze_norm, sizes",
    [
        ("L", False, True, [(640, 640), (320, 480)]),
        ("L", True, False, [(320, 480), (161, 243)]),
        ("X", False, False, [(161, 243)]),
        ("H", True, True, [(161, 243)]),
    ],
)
def test_features_equal_hugging_face(arch, use_lab, freeze_norm, sizes):
    pytest.importorskip("transformers")
    hf = hf_backbone(arch, use_lab, seed=0)
    model = HGNetv2(arch, use_lab=use_lab, freeze_at=0, freeze_norm=freeze_norm).eval()
    # strict: every HF tensor lands on one of ours and none of ours is left over (num_batches_tracked, which
    # FrozenBatchNorm2d drops, aside).
    model.load_state_dict({hf_to_ours(k): v for k, v in hf.state_dict().items()}, strict=True)
    g = torch.Generator().manual_seed(0)
    for height, width in sizes:
        x = torch.randn(1, 3, height, width, generator=g)
        with torch.no_grad():
            ref = list(hf(x).feature_maps)
            ours = model(x)
        assert [o.shape[1] for o in ours] == model.out_channels
        assert [o.shape[-2:] for o in ours] == [
            (math.ceil(height / s), math.ceil(width / s)) for s in (8, 16, 32)
        ]
        assert_features_close(ours, ref)


@pytest.mark.parametrize("use_lab, train", [(False, True), (True, False)])
def test_gradients_reach_every_parameter(use_lab, train):
    # With LAB in train mode some LAB biases get exactly zero gradient, in the official model too: a constant
    # shift that reaches a BatchNorm only through 1x1 convs (a block's last layer, the squeeze conv's output)
    # is removed by the batch mean. BatchNorm in eval mode keeps them.
    model = HGNetv2("L", use_lab=use_lab, freeze_at=-1, freeze_norm=False).train(train)
    outs = model(torch.randn(2, 3, 128, 128))
    sum(o.square().mean() for o in outs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert any(".lab." in n for n, _ in model.named_parameters()) == use_lab


def test_frozen_stem_gets_no_gradient():
    model = HGNetv2("L", freeze_at=0, freeze_norm=True).train()
    outs = model(torch.randn(1, 3, 128, 128))
    sum(o.square().mean() for o in outs).backward()
    for name, p in model.named_parameters():
        if name.startswith("stem."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("freeze_at", [-1, 0, 1, 2, 3, 4, 6])
def test_freeze_at_freezes_stem_and_first_stages(freeze_at):
    model = HGNetv2("L", freeze_at=freeze_at)
    prefixes = () if freeze_at < 0 else ("stem.", *(f"stages.{i}." for i in range(min(freeze_at, 4))))
    expected = {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    assert bool(expected) == (freeze_at >= 0)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == expected
    if freeze_at < 4:
        assert any(p.requires_grad for p in model.stages[3].parameters())


def test_freeze_norm_replaces_every_batch_norm():
    model = HGNetv2("L", freeze_norm=True)
    kinds = [type(m) for m in model.modules()]
    assert nn.BatchNorm2d not in kinds
    assert kinds.count(FrozenBatchNorm2d) == kinds.count(ConvBNAct)


def test_unknown_arch_raises():
    with pytest.raises(ValueError, match="'B4'.*L, X, H"):
        HGNetv2("B4")
