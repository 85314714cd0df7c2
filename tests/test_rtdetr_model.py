"""The whole network on the tiny preset: deploy re-parameterisation, input sizes, batch independence."""

import pytest
import torch
from helpers import randomize_batch_norms
from torch import nn

from rtdetr.config import preset
from rtdetr.models.hybrid_encoder import RepVggBlock
from rtdetr.models.layers import FrozenBatchNorm2d
from rtdetr.models.rtdetr import RTDETRModel

# At 128x128 the tiny model has 16*16 + 8*8 + 4*4 tokens; selecting all of them as queries removes the top-k
# boundary, where float rounding (deploy, batch size) may swap two near-tied tokens in or out of the set.
ALL_TOKENS_128 = 336


def randomized_tiny_model(seed: int = 0, **overrides) -> RTDETRModel:
    """Tiny preset with every parameter and BN statistic moved off its init, in eval mode."""
    torch.manual_seed(seed)
    model = RTDETRModel(preset("rtdetr_tiny", **overrides))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    randomize_batch_norms(model, seed + 2)
    return model.eval()


def images(h: int, w: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def assert_same_queries(a: dict, b: dict, atol: float) -> None:
    """Outputs equal up to the order of the queries (the decoder is permutation-equivariant; near-tied
    encoder scores may come out of top-k in either order)."""
    qa = torch.cat([a["pred_logits"], a["pred_boxes"]], -1)
    qb = torch.cat([b["pred_logits"], b["pred_boxes"]], -1)
    assert qa.shape == qb.shape
    for x, y in zip(qa, qb):
        dist = (x[:, None, :] - y[None, :, :]).abs().amax(-1)  # [Q, Q] max-abs difference
        best, match = dist.min(1)
        assert best.max().item() <= atol
        assert torch.equal(match.sort().values, torch.arange(len(match)))  # a permutation


def test_deploy_keeps_eval_outputs():
    model = randomized_tiny_model(num_queries=ALL_TOKENS_128)
    x = images(128, 128)
    with torch.no_grad():
        before = model(x)
        before_maps = model.encoder(model.backbone(x))
        deployed = model.deploy()
        after = model(x)
        after_maps = model.encoder(model.backbone(x))
    assert deployed is model and not model.training
    for m0, m1 in zip(before_maps, after_maps):
        assert (m0 - m1).abs().max().item() <= 1e-4
    assert_same_queries(before, after, atol=1e-4)
    blocks = [m for m in model.modules() if isinstance(m, RepVggBlock)]
    assert blocks, "the tiny preset has RepVGG blocks"
    for block in blocks:
        assert not hasattr(block, "conv1") and not hasattr(block, "conv2")
        assert isinstance(block.conv, nn.Conv2d) and block.conv.bias is not None
    for csp in [*model.encoder.fpn_blocks, *model.encoder.pan_blocks]:
        assert not hasattr(csp, "conv1") and csp.conv_first.out_channels == csp.conv_second.out_channels
    # deploy promises every BatchNorm folded into its conv
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # a second deploy() changes nothing
    with torch.no_grad():
        again = model.deploy()(x)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(again[key], after[key]), key


def test_deploy_keeps_dtype():
    model = randomized_tiny_model().double()
    x = images(128, 128, batch=1).double()
    with torch.no_grad():
        before = model(x)
        model.deploy()
        assert all(p.dtype == torch.float64 for p in model.parameters())
        after = model(x)
    for key in ("pred_logits", "pred_boxes"):
        assert (before[key] - after[key]).abs().max().item() <= 1e-6, key  # float32 folding would give ~1e-5


def test_deploy_from_train_mode_switches_to_eval():
    model = randomized_tiny_model(num_queries=ALL_TOKENS_128).train()
    x = images(128, 128, batch=1)
    with torch.no_grad():
        expected = model.eval()(x)
        model.train()
        model.deploy()
        got = model(x)
    assert_same_queries(got, expected, atol=1e-4)


def test_non_square_eval_without_rebuilding():
    model = randomized_tiny_model()
    with torch.no_grad():
        square = model(images(320, 320, batch=1))
        wide = model(images(256, 320))
        tall = model(images(320, 256, batch=1))
    q, c = preset("rtdetr_tiny").num_queries, preset("rtdetr_tiny").num_classes
    assert square["pred_logits"].shape == (1, q, c)
    assert wide["pred_logits"].shape == (2, q, c) and wide["pred_boxes"].shape == (2, q, 4)
    assert tall["pred_boxes"].shape == (1, q, 4)
    for out in (square, wide, tall):
        assert torch.isfinite(out["pred_logits"]).all()
        assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    # No stale cache: a fresh model with the same weights that never saw 320x320 gives the same 256x320 output.
    fresh = RTDETRModel(preset("rtdetr_tiny")).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        again = fresh(images(256, 320))
    torch.testing.assert_close(again["pred_logits"], wide["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(again["pred_boxes"], wide["pred_boxes"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("hw", [(100, 128), (128, 100), (130, 130)])
def test_input_not_multiple_of_32_raises(hw):
    model = randomized_tiny_model()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, *hw))


def test_batch_elements_are_independent():
    model = randomized_tiny_model(num_queries=ALL_TOKENS_128)
    x = images(128, 128, batch=3)
    with torch.no_grad():
        together = model(x)
        for i in range(3):
            alone = model(x[i : i + 1])
            assert_same_queries(alone, {k: v[i : i + 1] for k, v in together.items()}, atol=1e-4)


def test_submodule_order_is_official():
    """backbone, decoder, encoder: the official attribute order, hence state_dict order."""
    model = RTDETRModel(preset("rtdetr_tiny"))
    assert [name for name, _ in model.named_children()] == ["backbone", "decoder", "encoder"]


def test_cached_anchors_and_position_embedding_survive_inference_mode():
    """Caches filled under torch.inference_mode() must still work in a later training step with backward."""
    model = randomized_tiny_model()
    x = images(128, 128)
    with torch.inference_mode():
        model(x)
    model.train()
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    out = model(x, targets)
    (out["pred_logits"].sum() + out["pred_boxes"].sum() + out["enc_outputs"]["pred_logits"].sum()).backward()
    assert model.decoder.enc_score_head.weight.grad is not None
    assert model.encoder.encoder[0].layers[0].linear1.weight.grad is not None


def test_an_input_too_small_for_the_queries_is_refused_with_the_smallest_size_that_works():
    """Regression: --img-size 64 used to end in `selected index k out of range` from top-K."""
    from rtdetr.config import encoder_tokens

    assert encoder_tokens((64, 64)) == 8 * 8 + 4 * 4 + 2 * 2 and encoder_tokens((96, 128)) == 12 * 16 + 6 * 8 + 3 * 4
    with pytest.raises(ValueError, match=r"64x64 gives 84 encoder tokens, fewer than the 300 queries.*128x128"):
        preset("rtdetr_r18vd", image_size=(64, 64))
    model = RTDETRModel(preset("rtdetr_tiny")).eval()  # 100 queries: 96x96 has 9 + 36 + 144 = 189 tokens
    with pytest.raises(ValueError, match=r"84 encoder tokens, fewer than the 100 queries.*96x96"):
        model(torch.rand(1, 3, 64, 64))
    assert model(torch.rand(1, 3, 96, 96))["pred_logits"].shape == (1, 100, 80)


def test_hgnetv2_deploy_folds_every_norm_and_keeps_outputs():
    """RT-DETR-L in deploy mode: the depthwise convs keep their groups and the stem's padded 2x2 convs fold too."""
    torch.manual_seed(0)
    model = RTDETRModel(preset("rtdetrv2_hgnetv2_l", num_queries=ALL_TOKENS_128, num_decoder_layers=2))
    randomize_batch_norms(model, 3)
    model.eval()
    x = images(128, 128, batch=1)
    with torch.no_grad():
        before = model(x)
        before_maps = model.backbone(x)
        model.deploy()
        after = model(x)
        after_maps = model.backbone(x)
    norms = (nn.BatchNorm2d, FrozenBatchNorm2d)
    assert not any(isinstance(m, norms) for m in model.modules())
    assert model.backbone.stages[1].downsample.conv.groups == 128  # depthwise, still
    for m0, m1 in zip(before_maps, after_maps):
        assert (m0 - m1).abs().max().item() <= 1e-4 * m0.abs().max().item()
    assert_same_queries(before, after, atol=1e-3)


def test_describe_names_the_version_backbone_and_sampling():
    from types import SimpleNamespace

    def describe(name: str, **overrides) -> str:
        return RTDETRModel.describe(SimpleNamespace(config=preset(name, **overrides)))

    assert describe("rtdetr_r18vd") == "R18 (256-d encoder, 3 decoder layers, 80 classes)"
    assert describe("rtdetrv2_hgnetv2_x", cross_attn_method="discrete", num_classes=3) == (
        "v2 HGNetv2-X (384-d encoder, 6 decoder layers, discrete sampling, 3 classes)")  # fmt: skip
