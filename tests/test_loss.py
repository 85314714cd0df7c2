"""Matcher and criterion: hand-made cases, non-finite costs, empty targets, and parity with Hugging Face's
RT-DETR loss (itself checked against the official code, facts section 10)."""

import math

import pytest
import torch
from torch import nn

from rtdetr.loss import criterion as criterion_module
from rtdetr.loss.criterion import RTDETRCriterion, box_losses, varifocal_loss
from rtdetr.loss.matcher import HungarianMatcher
from rtdetr.models.denoising import build_denoising_groups


def make_targets(counts: list[int], num_classes: int, g: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Random targets: labels int64 [n], boxes [n, 4] normalised cx,cy,w,h well inside the image."""
    targets = []
    for n in counts:
        centers = 0.25 + 0.5 * torch.rand(n, 2, generator=g)
        sizes = 0.05 + 0.35 * torch.rand(n, 2, generator=g)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append({"labels": labels, "boxes": torch.cat([centers, sizes], 1)})
    return targets


def random_predictions(shape: tuple[int, ...], num_classes: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Logits [*shape, C] and boxes [*shape, 4] in (0, 1) as cx,cy,w,h."""
    logits = 2 * torch.randn(*shape, num_classes, generator=g)
    boxes = torch.sigmoid(torch.randn(*shape, 4, generator=g))
    return logits, boxes


def assert_valid_assignment(pred_idx, tgt_idx, num_queries: int, num_targets: int) -> None:
    assert pred_idx.dtype == tgt_idx.dtype == torch.int64
    assert len(pred_idx) == len(tgt_idx) == min(num_queries, num_targets)
    assert len(set(pred_idx.tolist())) == len(pred_idx) and all(0 <= i < num_queries for i in pred_idx.tolist())
    assert sorted(tgt_idx.tolist()) == list(range(num_targets))


# ---------------------------------------------------------------------------------------------- matcher


def test_matcher_finds_the_obvious_permuted_assignment():
    gt_boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.3, 0.2, 0.2], [0.5, 0.8, 0.3, 0.2]])
    labels = torch.tensor([0, 2, 1])
    # Query 3 predicts gt 0, query 0 gt 1, query 4 gt 2; queries 1 and 2 are far off with low scores.
    boxes = torch.tensor([[0.71, 0.3, 0.2, 0.21], [0.9, 0.9, 0.05, 0.05], [0.1, 0.9, 0.05, 0.05],
                          [0.2, 0.21, 0.1, 0.1], [0.5, 0.79, 0.3, 0.2]])  # fmt: skip
    logits = torch.full((5, 3), -4.0)
    logits[3, 0] = logits[0, 2] = logits[4, 1] = 4.0
    outputs = {"pred_logits": logits[None], "pred_boxes": boxes[None]}
    [(pred_idx, tgt_idx)] = HungarianMatcher()(outputs, [{"labels": labels, "boxes": gt_boxes}])
    assert pred_idx.tolist() == [0, 3, 4]
    assert tgt_idx.tolist() == [1, 0, 2]


def test_matcher_empty_targets_give_empty_indices():
    g = torch.Generator().manual_seed(0)
    logits, boxes = random_predictions((2, 7), 4, g)
    targets = make_targets([0, 2], 4, g)
    empty, full = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert empty[0].shape == empty[1].shape == (0,) and empty[0].dtype == torch.int64
    assert_valid_assignment(*full, num_queries=7, num_targets=2)


def test_matcher_fp16_non_finite_costs_regression():
    """Diverged fp16 predictions (NaN / inf logits, NaN boxes) must not crash linear_sum_assignment
    (HF regression test for the same bug), and are matched only when no finite alternative is left."""
    g = torch.Generator().manual_seed(1)
    logits, boxes = random_predictions((1, 6), 3, g)
    logits, boxes = logits.half(), boxes.half()
    logits[0, 1] = float("nan")
    logits[0, 2] = float("inf")
    logits[0, 3] = float("-inf")
    boxes[0, 4] = float("nan")
    targets = make_targets([2], 3, g)
    [(pred_idx, tgt_idx)] = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert_valid_assignment(pred_idx, tgt_idx, num_queries=6, num_targets=2)
    assert not {1, 4} & set(pred_idx.tolist())  # NaN queries avoided; +-inf logits give finite fp32 costs

    logits[0, [0, 2, 3]] = float("nan")  # query 5 is the only finite one left for two targets
    [(pred_idx, tgt_idx)] = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert_valid_assignment(pred_idx, tgt_idx, num_queries=6, num_targets=2)
    assert 5 in pred_idx.tolist()

    logits[:] = float("nan")
    [(pred_idx, tgt_idx)] = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert_valid_assignment(pred_idx, tgt_idx, num_queries=6, num_targets=2)


# ---------------------------------------------------------------------------------------------- loss terms


def bce_with_logits(x: float, t: float) -> float:
    p = 1 / (1 + math.exp(-x))
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def test_vfl_l1_giou_hand_computed():
    logits = torch.tensor([[[0.3, -1.2], [-0.7, 2.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.55, 0.55, 0.2, 0.2]])}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    # pred [0.4, 0.6]^2, gt [0.45, 0.65]^2: intersection 0.15^2, union 2 * 0.04 - 0.0225, hull 0.25^2.
    iou = 0.0225 / 0.0575
    giou = iou - (0.0625 - 0.0575) / 0.0625
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    negatives = [(0.3, 0.0), (-0.7, 0.0), (2.0, 0.0)]  # (logit, target) of the three unmatched entries
    vfl = sum(0.75 * sig(x) ** 2 * bce_with_logits(x, t) for x, t in negatives) + iou * bce_with_logits(-1.2, iou)
    num_boxes = 2.0

    assert varifocal_loss(logits, boxes, targets, indices, num_boxes).item() == pytest.approx(vfl / 2, rel=1e-6)
    terms = box_losses(boxes, targets, indices, num_boxes)
    assert terms["loss_bbox"].item() == pytest.approx(0.1 / 2, rel=1e-6)
    assert terms["loss_giou"].item() == pytest.approx((1 - giou) / 2, rel=1e-6)

    criterion = RTDETRCriterion(num_classes=2)
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert criterion.match({"pred_logits": logits, "pred_boxes": boxes}, targets)[""][0][0].tolist() == [0]
    assert losses["loss_vfl"].item() == pytest.approx(vfl, rel=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(5 * 0.1, rel=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(2 * (1 - giou), rel=1e-6)
    assert losses["loss"].item() == pytest.approx(vfl + 0.5 + 2 * (1 - giou), rel=1e-6)


def query_slice(logits: torch.Tensor, boxes: torch.Tensor, queries: slice) -> list[dict[str, torch.Tensor]]:
    """Per layer {pred_logits, pred_boxes} of the queries `queries` from stacked [L, B, Q, *] tensors."""
    return [{"pred_logits": lg[:, queries], "pred_boxes": bx[:, queries]} for lg, bx in zip(logits, boxes)]


def map_tensors(obj, fn):
    """Apply fn to every tensor in nested dicts / lists (other objects, e.g. the denoising groups, kept)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    return obj


def decoder_like_outputs(counts: list[int], num_layers: int, num_queries: int, num_classes: int, seed: int,
                         denoising: bool) -> tuple[dict, list[dict], dict]:  # fmt: skip
    """Random training outputs in our layout plus the same tensors in Hugging Face's loss arguments."""
    g = torch.Generator().manual_seed(seed)
    targets = make_targets(counts, num_classes, g)
    torch.manual_seed(seed)  # build_denoising_groups draws from the global generator
    embed = nn.Embedding(num_classes + 1, 8, padding_idx=num_classes)
    groups = build_denoising_groups(targets, num_classes, num_queries, embed) if denoising else None
    num_dn = groups.num_dn if groups else 0
    logits, boxes = random_predictions((num_layers, len(counts), num_dn + num_queries), num_classes, g)
    enc_logits, enc_boxes = random_predictions((len(counts), num_queries), num_classes, g)

    layers = query_slice(logits, boxes, slice(num_dn, None))
    enc = {"pred_logits": enc_logits, "pred_boxes": enc_boxes}
    ours = {**layers[-1], "aux_outputs": layers[:-1], "enc_outputs": enc}
    hf = {
        "logits": logits[-1], "pred_boxes": boxes[-1],
        "outputs_class": logits.transpose(0, 1), "outputs_coord": boxes.transpose(0, 1),
        "enc_topk_logits": enc_logits, "enc_topk_bboxes": enc_boxes,
    }  # fmt: skip
    if groups is not None:
        ours["dn_outputs"] = query_slice(logits, boxes, slice(0, num_dn))
        ours["dn_groups"] = groups
        hf["denoising_meta_values"] = {
            "dn_positive_idx": groups.positive_idx,
            "dn_num_group": groups.num_group,
            "dn_num_split": [num_dn, num_queries],
        }
    return ours, targets, hf


def test_loss_is_float32_for_half_inputs():
    ours, targets, _ = decoder_like_outputs([3, 1], num_layers=2, num_queries=10, num_classes=4, seed=3, denoising=True)
    half = map_tensors(ours, torch.Tensor.half)
    reference = map_tensors(half, torch.Tensor.float)
    criterion = RTDETRCriterion(num_classes=4)
    losses, expected = criterion(half, targets), criterion(reference, targets)
    assert all(v.dtype == torch.float32 for v in losses.values())
    for name in expected:
        torch.testing.assert_close(losses[name], expected[name], rtol=0, atol=0)


def test_class_agnostic_proposals_learn_every_object_as_class_zero():
    """v2 query_select_method 'agnostic': the encoder's 1-logit proposals are matched and supervised as if
    every object were class 0 (official `enc_meta['class_agnostic']`); the other sets keep their classes."""
    ours, targets, _ = decoder_like_outputs([3, 2], num_layers=2, num_queries=10, num_classes=4, seed=6, denoising=False)
    g = torch.Generator().manual_seed(7)
    ours["enc_outputs"]["pred_logits"] = 2 * torch.randn(2, 10, 1, generator=g)
    losses = RTDETRCriterion(num_classes=4)(ours, targets)
    zeroed = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    enc = ours["enc_outputs"]
    indices = HungarianMatcher()(enc, zeroed)
    num_boxes = 5.0
    expected_vfl = varifocal_loss(enc["pred_logits"], enc["pred_boxes"], zeroed, indices, num_boxes)
    torch.testing.assert_close(losses["loss_vfl_enc_0"], expected_vfl * 1.0)
    torch.testing.assert_close(losses["loss_bbox_enc_0"], box_losses(enc["pred_boxes"], zeroed, indices, num_boxes)["loss_bbox"] * 5.0)
    # the class-aware sets are unchanged by the agnostic proposals
    reference = RTDETRCriterion(num_classes=4)({k: v for k, v in ours.items() if k != "enc_outputs"}, targets)
    assert all(torch.equal(losses[k], reference[k]) for k in reference if k != "loss")


def test_v2_share_matched_indices_reuses_the_last_layers_matching():
    ours, targets, _ = decoder_like_outputs([3, 2], num_layers=3, num_queries=10, num_classes=4, seed=8, denoising=True)
    own = RTDETRCriterion(num_classes=4).match(ours, targets)
    shared = RTDETRCriterion(num_classes=4, share_matched_indices=True).match(ours, targets)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(own["_aux_0"], own[""]))  # the case is not trivial
    for suffix in ("_aux_0", "_aux_1"):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(shared[suffix], shared[""]))
    for suffix in ("", "_enc_0", "_dn_0"):  # the other sets keep their own matching
        assert all(torch.equal(a[0], b[0]) for a, b in zip(shared[suffix], own[suffix]))


@pytest.mark.parametrize("kind", ["iou", "giou"])
def test_v2_boxes_weight_format_weights_by_match_quality(kind):
    """Official v2 `boxes_weight_format`: each matched pair's (G)IoU (detached) is its varifocal target and
    the weight of its GIoU term; L1 is unchanged. Checked term by term against the ops, written out here."""
    from rtdetr.ops.boxes import box_cxcywh_to_xyxy, paired_box_iou, paired_generalized_box_iou

    ours, targets, _ = decoder_like_outputs([3, 2], num_layers=1, num_queries=10, num_classes=4, seed=9, denoising=False)
    plain = RTDETRCriterion(num_classes=4)(ours, targets)
    weighted = RTDETRCriterion(num_classes=4, boxes_weight_format=kind)(ours, targets)
    indices = HungarianMatcher()(ours, targets)
    pred = torch.cat([ours["pred_boxes"][i, src] for i, (src, _) in enumerate(indices)])
    gt = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)])
    a, b = box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gt)
    quality = paired_box_iou(a, b) if kind == "iou" else paired_generalized_box_iou(a, b)
    giou = paired_generalized_box_iou(a, b)
    torch.testing.assert_close(weighted["loss_giou"], 2.0 * ((1 - giou) * quality).sum() / 5)
    torch.testing.assert_close(weighted["loss_bbox"], plain["loss_bbox"])
    expected_vfl = varifocal_loss(ours["pred_logits"], ours["pred_boxes"], targets, indices, 5.0, quality=quality)
    torch.testing.assert_close(weighted["loss_vfl"], expected_vfl)
    if kind == "iou":  # the default varifocal target is that same IoU
        torch.testing.assert_close(weighted["loss_vfl"], plain["loss_vfl"])
    else:
        assert (weighted["loss_vfl"] - plain["loss_vfl"]).abs() > 1e-4
    with pytest.raises(ValueError, match="boxes_weight_format"):
        RTDETRCriterion(num_classes=4, boxes_weight_format="l1")


# ---------------------------------------------------------------------------------------------- empty targets


@pytest.mark.parametrize("counts", [[2, 0], [0, 0]], ids=["one-image-empty", "whole-batch-empty"])
def test_loss_finite_without_boxes(counts):
    ours, targets, _ = decoder_like_outputs(counts, num_layers=2, num_queries=10, num_classes=4, seed=4, denoising=True)
    leaves = [ours["pred_logits"], ours["enc_outputs"]["pred_boxes"], ours["dn_outputs"][0]["pred_logits"]]
    for t in leaves:
        t.requires_grad_(True)
    losses = RTDETRCriterion(num_classes=4)(ours, targets)
    assert len(losses) == 1 + 3 * (1 + 1 + 1 + 2)  # final, aux_0, enc_0, dn_0..1
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    if sum(counts) == 0:
        assert losses["loss_bbox"].item() == losses["loss_giou_dn_1"].item() == 0.0
        assert losses["loss_vfl"].item() > 0  # every query is pushed towards background


def test_num_boxes_is_averaged_over_processes(monkeypatch):
    """Distributed: num_boxes = all-reduced sum / world size (simulated: another process holds 9 boxes)."""
    monkeypatch.setattr(criterion_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(criterion_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(criterion_module.dist, "all_reduce", lambda t: t.add_(9))
    targets = make_targets([2, 3], 4, torch.Generator().manual_seed(5))
    assert criterion_module.average_num_boxes(targets, torch.device("cpu")) == (5 + 9) / 2
    monkeypatch.setattr(criterion_module.dist, "all_reduce", lambda t: t)
    assert criterion_module.average_num_boxes(make_targets([0], 4, torch.Generator()), torch.device("cpu")) == 1.0


# ---------------------------------------------------------------------------------------------- HF parity


def hf_name(name: str, num_layers: int) -> str:
    """Our term name -> HF's: HF (like official v1) appends the encoder proposals as the last aux set."""
    return name.replace("_enc_0", f"_aux_{num_layers - 1}")


@pytest.mark.parametrize("denoising", [False, True], ids=["no-denoising", "denoising"])
def test_loss_and_matching_parity_with_huggingface(denoising):
    transformers = pytest.importorskip("transformers")
    from transformers.loss.loss_rt_detr import RTDetrForObjectDetectionLoss, RTDetrHungarianMatcher, RTDetrLoss

    num_layers, num_classes = 3, 6
    config = transformers.RTDetrConfig(num_labels=num_classes)
    # HF's defaults are the official values (facts section 4), so both sides run the official config.
    assert (config.matcher_class_cost, config.matcher_bbox_cost, config.matcher_giou_cost) == (2, 5, 2)
    assert (config.matcher_alpha, config.matcher_gamma) == (0.25, 2)
    assert (config.focal_loss_alpha, config.focal_loss_gamma) == (0.75, 2)
    assert (config.weight_loss_vfl, config.weight_loss_bbox, config.weight_loss_giou) == (1, 5, 2)
    ours, targets, hf = decoder_like_outputs([3, 5, 0, 1], num_layers, 20, num_classes, seed=6, denoising=denoising)
    hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]

    criterion = RTDETRCriterion(num_classes)
    hf_matcher = RTDetrHungarianMatcher(config)
    for suffix, indices in criterion.match(ours, targets).items():
        if suffix.startswith("_dn_"):
            expected = RTDetrLoss.get_cdn_matched_indices(hf["denoising_meta_values"], hf_targets)
        else:
            preds = criterion.prediction_sets(ours)[suffix]
            expected = hf_matcher({"logits": preds["pred_logits"], "pred_boxes": preds["pred_boxes"]}, hf_targets)
        for (pred, tgt), (hf_pred, hf_tgt) in zip(indices, expected, strict=True):
            assert pred.tolist() == hf_pred.tolist() and tgt.tolist() == hf_tgt.tolist(), suffix

    losses = criterion(ours, targets)
    hf_total, hf_losses, _ = RTDetrForObjectDetectionLoss(labels=hf_targets, device="cpu", config=config, **hf)
    assert len(hf_losses) == 3 * (1 + num_layers + (num_layers if denoising else 0))
    assert {hf_name(k, num_layers) for k in losses if k != "loss"} == set(hf_losses)
    for name, value in losses.items():
        expected = hf_total if name == "loss" else hf_losses[hf_name(name, num_layers)]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=0, msg=name)
