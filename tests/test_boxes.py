"""Box conversions, IoU / GIoU and inverse_sigmoid against hand-computed values."""

import math

import pytest
import torch

from rtdetr.ops.boxes import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    inverse_sigmoid,
    paired_box_iou,
    paired_generalized_box_iou,
)


def test_cxcywh_to_xyxy_hand_values():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2]])
    expected = torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.0, 0.8, 0.2, 1.0]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(boxes), expected)
    torch.testing.assert_close(box_xyxy_to_cxcywh(expected), boxes)


def test_box_conversions_round_trip_with_batch_dims():
    g = torch.Generator().manual_seed(0)
    cxcywh = torch.rand(2, 7, 4, generator=g)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(cxcywh)), cxcywh)
    xy0 = torch.rand(2, 7, 2, generator=g)
    xyxy = torch.cat([xy0, xy0 + torch.rand(2, 7, 2, generator=g)], -1)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy)


# (box a, box b, IoU, GIoU) in xyxy, computed by hand.
CASES = [
    ([0, 0, 2, 2], [0, 0, 2, 2], 1.0, 1.0),  # identical
    ([0, 0, 4, 4], [1, 1, 3, 3], 4 / 16, 4 / 16),  # nested: hull = outer box
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, 1 / 7 - (9 - 7) / 9),  # partial overlap: inter 1, union 7, hull 9
    ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, -(3 - 2) / 3),  # disjoint side by side: union 2, hull 3
    ([0, 0, 1, 1], [2, 2, 3, 3], 0.0, -(9 - 2) / 9),  # disjoint diagonal: union 2, hull 9
    ([0, 0, 1, 1], [1, 0, 2, 1], 0.0, 0.0),  # touching edges: hull == union
]


@pytest.mark.parametrize("a,b,iou,giou", CASES)
def test_iou_and_giou_hand_values(a, b, iou, giou):
    a, b = torch.tensor([a], dtype=torch.float32), torch.tensor([b], dtype=torch.float32)
    got_iou, union = box_iou(a, b)
    assert got_iou.shape == (1, 1)
    assert got_iou.item() == pytest.approx(iou, abs=1e-6)
    assert generalized_box_iou(a, b).item() == pytest.approx(giou, abs=1e-6)
    # symmetric
    assert generalized_box_iou(b, a).item() == pytest.approx(giou, abs=1e-6)


def test_pairwise_matrix_layout():
    boxes1 = torch.tensor([c[0] for c in CASES], dtype=torch.float32)
    boxes2 = torch.tensor([c[1] for c in CASES], dtype=torch.float32)
    iou, union = box_iou(boxes1, boxes2)
    giou = generalized_box_iou(boxes1, boxes2)
    assert iou.shape == giou.shape == (len(CASES), len(CASES))
    torch.testing.assert_close(iou.diagonal(), torch.tensor([c[2] for c in CASES]))
    torch.testing.assert_close(giou.diagonal(), torch.tensor([c[3] for c in CASES]))
    # off-diagonal entry [i, j] pairs boxes1[i] with boxes2[j]: box [0,0,4,4] vs [0,0,2,2] -> 4/16
    assert iou[1, 0].item() == pytest.approx(0.25)
    assert union[1, 0].item() == pytest.approx(16.0)
    assert (giou <= iou + 1e-7).all() and (giou >= -1).all()


def test_inverse_sigmoid_clipping():
    eps = 1e-5
    x = torch.tensor([-0.3, 0.0, 1e-7, 0.5, 1.0 - 1e-7, 1.0, 1.7])
    got = inverse_sigmoid(x)
    big = math.log(1 / eps)
    # Values outside [0, 1] are clipped; both numerator and denominator floored at eps.
    expected = torch.tensor([-big, -big, -big, 0.0, big, big, big])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert torch.isfinite(got).all()


def test_inverse_sigmoid_inverts_sigmoid_and_custom_eps():
    p = torch.linspace(0.01, 0.99, 25)
    torch.testing.assert_close(torch.sigmoid(inverse_sigmoid(p)), p, atol=1e-6, rtol=0)
    assert inverse_sigmoid(torch.tensor([0.0]), eps=1e-3).item() == pytest.approx(math.log(1e-3), abs=1e-5)
    assert inverse_sigmoid(torch.tensor([0.2])).item() == pytest.approx(math.log(0.2 / 0.8), abs=1e-6)


def test_paired_iou_and_giou_equal_the_pairwise_diagonal():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g)
    a = torch.cat([xy, xy + torch.rand(50, 2, generator=g)], dim=1)
    xy = torch.rand(50, 2, generator=g)
    b = torch.cat([xy, xy + torch.rand(50, 2, generator=g)], dim=1)
    assert torch.equal(paired_box_iou(a, b), torch.diag(box_iou(a, b)[0]))
    assert torch.equal(paired_generalized_box_iou(a, b), torch.diag(generalized_box_iou(a, b)))
    assert (paired_box_iou(a, b) > 0).any() and (paired_generalized_box_iou(a, b) < 0).any()  # both regimes seen
