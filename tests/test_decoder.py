"""Decoder: anchors, query selection, eval_idx truncation, training outputs and gradient paths (facts 3.3)."""

import inspect
import math

import pytest
import torch
from torch import nn

from rtdetr.config import preset
from rtdetr.models.decoder import RTDETRDecoder, generate_anchors
from rtdetr.models.rtdetr import RTDETRModel
from rtdetr.ops.boxes import inverse_sigmoid

IMAGE = 128  # tiny preset: 16x16 + 8x8 + 4x4 = 336 tokens >= 100 queries


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# ---- anchors --------------------------------------------------------------------------------------------


def test_generate_anchors_hand_checked():
    anchors, valid = generate_anchors([(2, 2), (1, 1)])
    expected = torch.tensor(
        [
            [logit(0.25), logit(0.25), logit(0.05), logit(0.05)],  # level 0, row 0, col 0
            [logit(0.75), logit(0.25), logit(0.05), logit(0.05)],  # row 0, col 1 (x varies fastest)
            [logit(0.25), logit(0.75), logit(0.05), logit(0.05)],  # row 1, col 0
            [logit(0.75), logit(0.75), logit(0.05), logit(0.05)],
            [0.0, 0.0, logit(0.1), logit(0.1)],  # level 1: size 0.05 * 2
        ]
    )
    assert anchors.shape == (1, 5, 4) and valid.shape == (1, 5, 1) and valid.dtype == torch.bool
    torch.testing.assert_close(anchors[0], expected, atol=1e-5, rtol=0)
    assert valid.all()


def test_generate_anchors_sizes_per_level_and_non_square():
    anchors, valid = generate_anchors([(1, 2), (1, 1), (1, 1)])
    boxes = torch.sigmoid(anchors[0])
    torch.testing.assert_close(boxes[:, 2], torch.tensor([0.05, 0.05, 0.1, 0.2]))
    torch.testing.assert_close(boxes[:2, :2], torch.tensor([[0.25, 0.5], [0.75, 0.5]]))
    anchors, _ = generate_anchors([(3, 1)])  # H=3, W=1: y varies
    torch.testing.assert_close(torch.sigmoid(anchors[0, :, 1]), torch.tensor([1 / 6, 0.5, 5 / 6]))


def test_generate_anchors_border_invalidation_eps():
    # W = 60: the first centre 0.5/60 = 0.0083 < 0.01 and the last 59.5/60 = 0.9917 > 0.99 are invalid.
    anchors, valid = generate_anchors([(1, 60)])
    expected_valid = torch.ones(60, dtype=torch.bool)
    expected_valid[[0, 59]] = False
    assert torch.equal(valid[0, :, 0], expected_valid)
    assert torch.isinf(anchors[0, [0, 59]]).all() and (anchors[0, [0, 59]] > 0).all()  # +inf in all 4 coords
    assert torch.isfinite(anchors[0, 1:59]).all()
    # a size >= 1 - eps is invalid too, and the log of a negative ratio never leaks out as NaN
    anchors, valid = generate_anchors([(1, 1), (1, 1)], grid_size=0.6)
    assert valid[0, :, 0].tolist() == [True, False]
    assert not torch.isnan(anchors).any() and torch.isinf(anchors[0, 1]).all()
    # a wider eps invalidates more
    _, valid = generate_anchors([(2, 2)], eps=0.3)
    assert not valid.any()


def test_valid_mask_at_640():
    anchors, valid = generate_anchors([(80, 80), (40, 40), (20, 20)])
    assert anchors.shape == (1, 8400, 4)
    assert int((~valid).sum()) == 316
    level0 = valid[0, :6400, 0].reshape(80, 80)
    border = torch.zeros(80, 80, dtype=torch.bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    assert torch.equal(~level0, border)
    assert valid[0, 6400:].all()
    assert torch.equal(torch.isinf(anchors[0]).any(-1), ~valid[0, :, 0])


def test_anchor_cache_returns_same_object():
    dec = RTDETRDecoder(num_classes=2, in_channels=[8, 8, 8], hidden_dim=8, num_queries=2, num_layers=1, nhead=2,
                        dim_feedforward=8, num_points=(1, 1, 1))  # fmt: skip
    like = torch.zeros(1)
    a = dec.anchors([(4, 4), (2, 2), (1, 1)], like)
    assert dec.anchors([(4, 4), (2, 2), (1, 1)], like) is a
    b = dec.anchors([(4, 6), (2, 3), (1, 2)], like)
    assert b[0].shape == (1, 24 + 6 + 2, 4)


def test_query_selection_keeps_invalid_anchors_eligible():
    """Invalid (border) tokens are zeroed in memory but may still win the top-k (official; facts 8.8)."""
    torch.manual_seed(0)
    d = 8
    dec = RTDETRDecoder(num_classes=1, in_channels=[d] * 3, hidden_dim=d, num_queries=2, num_layers=1, nhead=2,
                        dim_feedforward=8, num_points=(1, 1, 1), num_denoising=0)  # fmt: skip
    shapes = [(1, 60), (1, 1), (1, 1)]
    w = torch.randn(d)
    with torch.no_grad():
        dec.enc_output[0].weight.copy_(torch.eye(d))
        dec.enc_output[0].bias.zero_()
        dec.enc_output[1].bias.copy_(w)  # zeroed tokens -> LayerNorm(0) = bias -> score |w|^2
        dec.enc_score_head.weight.copy_(w[None])
        dec.enc_score_head.bias.zero_()
    memory = (-w).expand(1, 62, d).clone()  # valid tokens score w . LN(-w) + |w|^2 < |w|^2
    queries, ref_unact, topk_logits, topk_boxes = dec.query_selection(memory, shapes)
    assert queries.shape == (1, 2, d) and not queries.requires_grad
    assert torch.isinf(ref_unact).all()
    torch.testing.assert_close(topk_boxes, torch.ones(1, 2, 4))
    torch.testing.assert_close(topk_logits[0, :, 0], (w @ w).expand(2))
    # the selected queries are the (zeroed) invalid tokens' output memory
    torch.testing.assert_close(queries[0], w.expand(2, d))


def test_query_selection_is_topk_of_max_class_score():
    torch.manual_seed(0)
    d = 8
    dec = RTDETRDecoder(num_classes=3, in_channels=[d] * 3, hidden_dim=d, num_queries=5, num_layers=1, nhead=2,
                        dim_feedforward=8, num_points=(1, 1, 1), num_denoising=0)  # fmt: skip
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    shapes = [(4, 4), (2, 2), (1, 1)]
    memory = torch.randn(2, 21, d)
    queries, ref_unact, topk_logits, topk_boxes = dec.query_selection(memory, shapes)
    anchors, _ = generate_anchors(shapes)
    out_mem = dec.enc_output(memory)
    scores = dec.enc_score_head(out_mem)
    coords = dec.enc_bbox_head(out_mem) + anchors
    idx = scores.max(-1).values.argsort(dim=1, descending=True)[:, :5]
    for b in range(2):
        torch.testing.assert_close(topk_logits[b], scores[b, idx[b]])
        torch.testing.assert_close(ref_unact[b], coords[b, idx[b]])
        torch.testing.assert_close(queries[b], out_mem[b, idx[b]])
    torch.testing.assert_close(topk_boxes, torch.sigmoid(ref_unact))
    assert topk_boxes.requires_grad  # the encoder loss trains the enc heads through these


def small_decoder(query_select_method: str, num_classes: int = 3) -> RTDETRDecoder:
    torch.manual_seed(0)
    dec = RTDETRDecoder(num_classes=num_classes, in_channels=[8] * 3, hidden_dim=8, num_queries=6, num_layers=1,
                        nhead=2, dim_feedforward=8, num_points=(1, 1, 1), num_denoising=0,
                        query_select_method=query_select_method)  # fmt: skip
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return dec


def test_one2many_selection_takes_the_top_token_class_pairs():
    """v2 'one2many': the K best (token, class) scores, so a token strong in two classes is taken twice
    (hand check of the official `topk(logits.flatten(1)) // num_classes`)."""
    dec = small_decoder("one2many")
    logits = torch.full((1, 5, 3), -5.0)
    logits[0, 2] = torch.tensor([4.0, 3.0, -5.0])  # token 2: the two best pairs
    logits[0, 4, 1], logits[0, 0, 2], logits[0, 3, 0], logits[0, 1, 1] = 2.0, 1.0, 0.5, 0.0
    assert dec.rank_tokens(logits).tolist() == [[2, 2, 4, 0, 3, 1]]
    wider = torch.cat([logits, torch.full((1, 2, 3), -9.0)], dim=1)  # 7 tokens: 'default' takes each once
    assert small_decoder("default").rank_tokens(wider).tolist() == [[2, 4, 0, 3, 1, 5]]


def test_agnostic_selection_has_a_one_class_encoder_head():
    dec = small_decoder("agnostic")
    assert dec.enc_score_head.out_features == 1 and dec.dec_score_head[0].out_features == 3
    shapes = [(4, 4), (2, 2), (1, 1)]
    memory = torch.randn(2, 21, 8)
    _, _, topk_logits, _ = dec.query_selection(memory, shapes)
    scores = dec.enc_score_head(dec.enc_output(memory))[..., 0]
    assert topk_logits.shape == (2, 6, 1)
    torch.testing.assert_close(topk_logits[..., 0], scores.sort(dim=1, descending=True).values[:, :6])
    with pytest.raises(ValueError, match="query_select_method"):
        small_decoder("top2")


# ---- the full tiny model ----------------------------------------------------------------------------------


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Move every parameter and BN statistic off its init (zero-init heads would hide wiring bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def tiny_model(num_layers: int = 3, **overrides) -> RTDETRModel:
    torch.manual_seed(0)
    model = RTDETRModel(preset("rtdetr_tiny", num_decoder_layers=num_layers, **overrides))
    perturb(model)
    return model


def images(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def targets():
    return [
        {"labels": torch.tensor([1, 5]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
        {"labels": torch.tensor([7]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
    ]


class Recorder:
    """Forward hooks on the decoder layers and heads."""

    def __init__(self, decoder: RTDETRDecoder) -> None:
        self.layer_inputs, self.scores, self.deltas, self.handles = {}, {}, {}, []
        for i, layer in enumerate(decoder.decoder.layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre(i, layer), with_kwargs=True))
            self.handles.append(decoder.dec_score_head[i].register_forward_hook(self._out(self.scores, i)))
            self.handles.append(decoder.dec_bbox_head[i].register_forward_hook(self._out(self.deltas, i)))

    def _pre(self, i, layer):
        signature = inspect.signature(layer.forward)

        def hook(module, args, kwargs):
            self.layer_inputs[i] = signature.bind(*args, **kwargs).arguments  # inputs by parameter name

        return hook

    @staticmethod
    def _out(store, i):
        def hook(module, args, output):
            store[i] = output

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("k", [0, 1, 2])
def test_eval_idx_truncates_to_layer_k(k):
    model = tiny_model().eval()
    model.decoder.eval_idx = k
    rec = Recorder(model.decoder)
    with torch.no_grad():
        out = model(images())
    rec.remove()
    # the loop stops at layer k: later layers and heads never run; in eval only layer k's score head runs
    assert sorted(rec.layer_inputs) == sorted(rec.deltas) == list(range(k + 1))
    assert sorted(rec.scores) == [k]
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert torch.equal(out["pred_logits"], rec.scores[k])
    ref_in = rec.layer_inputs[k]["reference_boxes"]  # the reference box fed to layer k
    expected = torch.sigmoid(rec.deltas[k] + inverse_sigmoid(ref_in))
    torch.testing.assert_close(out["pred_boxes"], expected, atol=1e-6, rtol=0)
    # layer k's reference input is layer k-1's refined box
    if k > 0:
        prev = torch.sigmoid(rec.deltas[k - 1] + inverse_sigmoid(rec.layer_inputs[k - 1]["reference_boxes"]))
        torch.testing.assert_close(ref_in, prev, atol=1e-6, rtol=0)

    # A model with only k+1 layers, loaded with the same weights minus the later layers, agrees exactly.
    later = ("decoder.layers", "dec_score_head", "dec_bbox_head")
    dropped = tuple(f"decoder.{p}.{j}." for j in range(k + 1, 3) for p in later)
    state = {n: v for n, v in model.state_dict().items() if not n.startswith(dropped)}
    short = RTDETRModel(preset("rtdetr_tiny", num_decoder_layers=k + 1)).eval()
    short.load_state_dict(state, strict=True)
    with torch.no_grad():
        out_short = short(images())
    torch.testing.assert_close(out_short["pred_logits"], out["pred_logits"], atol=1e-6, rtol=0)
    torch.testing.assert_close(out_short["pred_boxes"], out["pred_boxes"], atol=1e-6, rtol=0)


def test_eval_idx_from_config():
    assert RTDETRModel(preset("rtdetr_tiny", num_decoder_layers=3, eval_idx=1)).decoder.eval_idx == 1
    assert RTDETRModel(preset("rtdetr_tiny", num_decoder_layers=3)).decoder.eval_idx == 2
    assert preset("rtdetr_r50vd_m").resolved_eval_idx == 2


def test_training_outputs_structure():
    model = tiny_model().train()
    rec = Recorder(model.decoder)
    out = model(images(), targets())
    rec.remove()
    cfg = preset("rtdetr_tiny")
    q, c = cfg.num_queries, cfg.num_classes
    dn = out["dn_groups"]
    assert dn.num_group == cfg.num_denoising // 2 and dn.num_dn == 2 * 2 * dn.num_group
    assert out["pred_logits"].shape == (2, q, c) and out["pred_boxes"].shape == (2, q, 4)
    assert len(out["aux_outputs"]) == 2 and len(out["dn_outputs"]) == 3
    assert out["enc_outputs"]["pred_logits"].shape == (2, q, c)
    assert out["enc_outputs"]["pred_boxes"].shape == (2, q, 4)
    layers = [*out["aux_outputs"], {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}]
    for i in range(3):
        scores = rec.scores[i]
        assert scores.shape == (2, dn.num_dn + q, c)
        assert torch.equal(layers[i]["pred_logits"], scores[:, dn.num_dn :])
        assert torch.equal(out["dn_outputs"][i]["pred_logits"], scores[:, : dn.num_dn])
        boxes = torch.sigmoid(rec.deltas[i] + inverse_sigmoid(rec.layer_inputs[i]["reference_boxes"]))
        torch.testing.assert_close(layers[i]["pred_boxes"], boxes[:, dn.num_dn :], atol=1e-6, rtol=0)
        torch.testing.assert_close(out["dn_outputs"][i]["pred_boxes"], boxes[:, : dn.num_dn], atol=1e-6, rtol=0)
        assert out["dn_outputs"][i]["pred_boxes"].shape == (2, dn.num_dn, 4)
    # the denoising queries go in front with their attention mask
    assert rec.layer_inputs[0]["attn_mask"] is dn.attn_mask
    torch.testing.assert_close(rec.layer_inputs[0]["reference_boxes"][:, : dn.num_dn], torch.sigmoid(dn.boxes_unact))


def test_training_without_targets_has_no_denoising():
    out = tiny_model().train()(images())
    assert "dn_outputs" not in out and len(out["aux_outputs"]) == 2 and "enc_outputs" in out


def test_training_with_empty_targets_runs():
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    out = tiny_model().train()(images(), empty)
    assert all(p.numel() == 0 for p in out["dn_groups"].positive_idx)
    assert torch.isfinite(out["pred_logits"]).all() and len(out["dn_outputs"]) == 3


def _grads(output: torch.Tensor, params) -> list:
    return torch.autograd.grad(output.sum(), list(params), retain_graph=True, allow_unused=True)


def test_gradient_paths_between_layers():
    model = tiny_model().train()
    rec = Recorder(model.decoder)
    out = model(images(), targets())
    rec.remove()
    dec = model.decoder
    layer1 = out["aux_outputs"][1]
    # Official: layer i > 0 predicts its box from the previous refined box NOT detached ...
    g = _grads(layer1["pred_boxes"], dec.dec_bbox_head[0].parameters())
    assert all(x is not None and x.abs().sum() > 0 for x in g)
    # ... but only one layer back: layer 1's refined box was computed from a detached reference.
    assert all(x is None for x in _grads(out["pred_boxes"], dec.dec_bbox_head[0].parameters()))
    g = _grads(out["pred_boxes"], dec.dec_bbox_head[1].parameters())
    assert all(x is not None and x.abs().sum() > 0 for x in g)
    # ... while the reference box fed to every layer is detached: layer 1's logits don't see bbox head 0.
    for i in range(3):
        assert not rec.layer_inputs[i]["reference_boxes"].requires_grad
    assert all(x is None for x in _grads(layer1["pred_logits"], dec.dec_bbox_head[0].parameters()))
    # layer 0's box does not depend on later heads, and no layer's output sees the enc_* heads
    assert all(x is None for x in _grads(out["aux_outputs"][0]["pred_boxes"], dec.dec_bbox_head[1].parameters()))
    enc_params = [*dec.enc_output.parameters(), *dec.enc_score_head.parameters(), *dec.enc_bbox_head.parameters()]
    assert all(x is None for x in _grads(out["pred_logits"].sum() + out["pred_boxes"].sum(), enc_params))
    # the encoder proposals do train the enc heads
    assert all(x is not None for x in _grads(out["enc_outputs"]["pred_boxes"], dec.enc_bbox_head.parameters()))


def total_output_sum(out: dict) -> torch.Tensor:
    heads = [out, *out["aux_outputs"], out["enc_outputs"], *out.get("dn_outputs", [])]
    return sum(h["pred_logits"].sum() + h["pred_boxes"].sum() for h in heads)


def params_without_gradient(model: nn.Module) -> list[str]:
    return [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)
    ]


def test_gradients_reach_every_trainable_parameter():
    model = tiny_model().train()
    total_output_sum(model(images(), targets())).backward()
    assert params_without_gradient(model) == []


def test_gradients_at_init_only_miss_mlps_behind_zero_initialised_heads():
    """At the official init the last box-head layers are zero, so only the hidden layers of those MLPs get
    no gradient from the first step; everything else does."""
    torch.manual_seed(0)
    model = RTDETRModel(preset("rtdetr_tiny", num_decoder_layers=3)).train()
    total_output_sum(model(images(), targets())).backward()
    expected = [f"decoder.enc_bbox_head.layers.{j}.{t}" for j in (0, 1) for t in ("weight", "bias")]
    expected += [
        f"decoder.dec_bbox_head.{i}.layers.{j}.{t}" for i in range(3) for j in (0, 1) for t in ("weight", "bias")
    ]
    assert sorted(params_without_gradient(model)) == sorted(expected)
