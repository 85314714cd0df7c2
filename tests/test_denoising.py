"""Contrastive denoising groups (facts 3.5): counts, attention mask, noise magnitudes, official RNG order."""

import pytest
import torch
from torch import nn

from rtdetr.models.denoising import build_denoising_groups, denoising_attention_mask
from rtdetr.ops.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid

NUM_CLASSES = 80


def make_targets():
    g = torch.Generator().manual_seed(0)

    def boxes(n):  # well inside the image: jitter of up to 2x half-size never clips
        cxcy = torch.rand(n, 2, generator=g) * 0.2 + 0.4
        wh = torch.rand(n, 2, generator=g) * 0.1 + 0.1
        return torch.cat([cxcy, wh], -1)

    return [
        {"labels": torch.tensor([3, 7, 11]), "boxes": boxes(3)},
        {"labels": torch.tensor([0, 1, 2, 79, 40]), "boxes": boxes(5)},
    ]


def class_embed(dim: int = 16) -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(NUM_CLASSES + 1, dim, padding_idx=NUM_CLASSES)


def official_attention_mask(num_dn: int, num_queries: int, max_gt: int, num_group: int) -> torch.Tensor:
    """The official v1 loop, written out."""
    tgt_size = num_dn + num_queries
    attn_mask = torch.full([tgt_size, tgt_size], False, dtype=torch.bool)
    attn_mask[num_dn:, :num_dn] = True
    for i in range(num_group):
        if i == 0:
            attn_mask[max_gt * 2 * i : max_gt * 2 * (i + 1), max_gt * 2 * (i + 1) : num_dn] = True
        if i == num_group - 1:
            attn_mask[max_gt * 2 * i : max_gt * 2 * (i + 1), : max_gt * i * 2] = True
        else:
            attn_mask[max_gt * 2 * i : max_gt * 2 * (i + 1), max_gt * 2 * (i + 1) : num_dn] = True
            attn_mask[max_gt * 2 * i : max_gt * 2 * (i + 1), : max_gt * 2 * i] = True
    return attn_mask


def official_groups(targets, num_classes, num_queries, embed, num_denoising, label_noise_ratio, box_noise_scale):
    """The official v1 `get_contrastive_denoising_training_group`, written from facts 3.5 (non-empty batch)."""
    num_gts = [len(t["labels"]) for t in targets]
    max_gt = max(num_gts)
    num_group = max(num_denoising // max_gt, 1)
    bs = len(num_gts)
    cls = torch.full([bs, max_gt], num_classes, dtype=torch.int32)
    box = torch.zeros([bs, max_gt, 4])
    pad = torch.zeros([bs, max_gt], dtype=torch.bool)
    for i, n in enumerate(num_gts):
        if n > 0:
            cls[i, :n] = targets[i]["labels"]
            box[i, :n] = targets[i]["boxes"]
            pad[i, :n] = 1
    cls = cls.tile([1, 2 * num_group])
    box = box.tile([1, 2 * num_group, 1])
    pad = pad.tile([1, 2 * num_group])
    neg = torch.zeros([bs, max_gt * 2, 1])
    neg[:, max_gt:] = 1
    neg = neg.tile([1, num_group, 1])
    pos = (1 - neg).squeeze(-1) * pad
    positive_idx = torch.split(torch.nonzero(pos)[:, 1], [n * num_group for n in num_gts])
    num_dn = int(max_gt * 2 * num_group)
    if label_noise_ratio > 0:
        mask = torch.rand_like(cls, dtype=torch.float) < (label_noise_ratio * 0.5)
        new_label = torch.randint_like(mask, 0, num_classes, dtype=cls.dtype)
        cls = torch.where(mask & pad, new_label, cls)
    if box_noise_scale > 0:
        known = box_cxcywh_to_xyxy(box)
        diff = torch.tile(box[..., 2:] * 0.5, [1, 1, 2]) * box_noise_scale
        sign = torch.randint_like(box, 0, 2) * 2.0 - 1.0
        part = torch.rand_like(box)
        part = (part + 1.0) * neg + part * (1 - neg)
        part *= sign
        known += part * diff
        known.clip_(min=0.0, max=1.0)
        box = inverse_sigmoid(box_xyxy_to_cxcywh(known))
    return embed(cls), box, official_attention_mask(num_dn, num_queries, max_gt, num_group), positive_idx, num_dn


def test_counts_and_positive_indices():
    groups = build_denoising_groups(make_targets(), NUM_CLASSES, 300, class_embed(), num_denoising=100)
    assert groups.num_group == 20 and groups.num_dn == 200
    assert groups.embeddings.shape == (2, 200, 16)
    assert groups.boxes_unact.shape == (2, 200, 4)
    assert groups.attn_mask.shape == (500, 500) and groups.attn_mask.dtype == torch.bool
    expected0 = torch.cat([torch.arange(3) + 10 * k for k in range(20)])
    expected1 = torch.cat([torch.arange(5) + 10 * k for k in range(20)])
    assert torch.equal(groups.positive_idx[0], expected0)
    assert torch.equal(groups.positive_idx[1], expected1)


def test_num_group_at_least_one():
    targets = [{"labels": torch.zeros(7, dtype=torch.int64), "boxes": torch.full((7, 4), 0.5)}]
    groups = build_denoising_groups(targets, NUM_CLASSES, 10, class_embed(), num_denoising=5)
    assert groups.num_group == 1 and groups.num_dn == 14


@pytest.mark.parametrize("max_gt,num_group,num_queries", [(5, 20, 300), (1, 3, 4), (2, 1, 3), (3, 2, 0)])
def test_attention_mask_matches_official_loop(max_gt, num_group, num_queries):
    num_dn = 2 * max_gt * num_group
    got = denoising_attention_mask(num_dn, num_queries, 2 * max_gt, torch.device("cpu"))
    assert torch.equal(got, official_attention_mask(num_dn, num_queries, max_gt, num_group))


def test_attention_mask_semantics():
    mask = build_denoising_groups(make_targets(), NUM_CLASSES, 300, class_embed(), num_denoising=100).attn_mask
    assert mask[200:, :200].all()  # matching queries never see denoising queries
    assert not mask[:, 200:].any()  # everybody sees the matching queries
    assert not mask[10:20, 10:20].any()  # a group sees itself
    assert mask[10:20, :10].all() and mask[10:20, 20:200].all()  # ... and no other group


def test_no_noise_gives_clean_embeddings_and_boxes():
    targets, embed = make_targets(), class_embed()
    groups = build_denoising_groups(
        targets, NUM_CLASSES, 300, embed, num_denoising=100, label_noise_ratio=0.0, box_noise_scale=0.0
    )
    emb = groups.embeddings.detach()
    boxes = torch.sigmoid(groups.boxes_unact)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        for k in range(2 * groups.num_group):  # positives AND negatives carry the gt when there is no noise
            block = slice(5 * k, 5 * k + n)
            torch.testing.assert_close(emb[i, block], embed.weight[t["labels"]].detach())
            torch.testing.assert_close(boxes[i, block], t["boxes"], atol=1e-6, rtol=0)
        positives = boxes[i, groups.positive_idx[i]]
        torch.testing.assert_close(positives, t["boxes"].repeat(groups.num_group, 1), atol=1e-6, rtol=0)
    # padding slots of the 3-gt image: padding class -> zero embedding, zero box -> sigmoid(-11.5)
    assert (emb[0, 3:5] == 0).all()
    padded = inverse_sigmoid(torch.tensor(0.0)).item()
    torch.testing.assert_close(groups.boxes_unact[0, 3:5], torch.full((2, 4), padded))


def test_label_noise_flips_about_a_quarter_and_only_real_gts():
    targets, embed = make_targets(), class_embed()
    torch.manual_seed(3)
    big = [{"labels": torch.zeros(50, dtype=torch.int64), "boxes": torch.full((50, 4), 0.5)}] * 4
    groups = build_denoising_groups(big, NUM_CLASSES, 10, embed, num_denoising=1000, box_noise_scale=0.0)
    same = (groups.embeddings == embed.weight[0]).all(-1).float().mean().item()
    # flip probability 0.5 * 0.5; a flip redraws uniformly (1/80 chance of the same class)
    assert 0.70 < same < 0.80
    groups = build_denoising_groups(targets, NUM_CLASSES, 300, embed, num_denoising=100)
    assert (groups.embeddings[0, 3:5] == 0).all()  # padding never gets a label


def recover_corners(boxes_unact):
    return box_cxcywh_to_xyxy(torch.sigmoid(boxes_unact))


def test_box_noise_magnitudes_positive_vs_negative():
    targets = make_targets()
    torch.manual_seed(0)
    groups = build_denoising_groups(targets, NUM_CLASSES, 300, class_embed(), num_denoising=100, label_noise_ratio=0)
    n_pos_checked = n_neg_checked = 0
    for i, t in enumerate(targets):
        n = len(t["labels"])
        gt = box_cxcywh_to_xyxy(t["boxes"])
        half = t["boxes"][:, 2:].repeat(1, 2) * 0.5  # [w/2, h/2, w/2, h/2]
        for k in range(groups.num_group):
            pos = slice(10 * k, 10 * k + n)
            neg = slice(10 * k + 5, 10 * k + 5 + n)
            rel_pos = (recover_corners(groups.boxes_unact[i, pos]) - gt).abs() / half
            assert (rel_pos < 1 + 1e-4).all()
            n_pos_checked += n
            # A negative's corners may cross (x0 > x1), which the cx,cy,w,h encoding cannot represent;
            # check those that stayed proper boxes.
            boxes = torch.sigmoid(groups.boxes_unact[i, neg])
            proper = (boxes[:, 2:] > 1e-3).all(-1)
            rel_neg = (recover_corners(groups.boxes_unact[i, neg]) - gt).abs() / half
            assert (rel_neg[proper] > 1 - 1e-4).all() and (rel_neg[proper] < 2 + 1e-4).all()
            n_neg_checked += int(proper.sum())
    assert n_pos_checked == 160 and n_neg_checked > 40


def test_matches_official_procedure_with_same_seed():
    targets, embed = make_targets(), class_embed()
    torch.manual_seed(123)
    ours = build_denoising_groups(targets, NUM_CLASSES, 300, embed, num_denoising=100)
    torch.manual_seed(123)
    emb, boxes, mask, positive_idx, num_dn = official_groups(targets, NUM_CLASSES, 300, embed, 100, 0.5, 1.0)
    assert ours.num_dn == num_dn
    assert torch.equal(ours.embeddings, emb)
    assert torch.equal(ours.boxes_unact, boxes)
    assert torch.equal(ours.attn_mask, mask)
    assert all(torch.equal(a, b) for a, b in zip(ours.positive_idx, positive_idx))


def test_seeded_run_reproduces():
    targets, embed = make_targets(), class_embed()
    torch.manual_seed(7)
    a = build_denoising_groups(targets, NUM_CLASSES, 300, embed)
    torch.manual_seed(7)
    b = build_denoising_groups(targets, NUM_CLASSES, 300, embed)
    c = build_denoising_groups(targets, NUM_CLASSES, 300, embed)
    assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.boxes_unact, b.boxes_unact)
    assert not torch.equal(b.boxes_unact, c.boxes_unact)  # a different draw without reseeding


def test_empty_targets_give_no_positives():
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    groups = build_denoising_groups([empty, empty], NUM_CLASSES, 300, class_embed(), num_denoising=100)
    assert groups is not None
    assert all(p.numel() == 0 for p in groups.positive_idx) and len(groups.positive_idx) == 2
    assert groups.num_dn == groups.embeddings.shape[1] == groups.boxes_unact.shape[1]
    assert (groups.embeddings == 0).all()  # padding class everywhere: nothing to reconstruct
    assert torch.isfinite(groups.boxes_unact).all()
    assert groups.attn_mask.shape == (groups.num_dn + 300,) * 2


def test_mixed_empty_and_non_empty_targets():
    targets = make_targets()
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    groups = build_denoising_groups([targets[0], empty], NUM_CLASSES, 300, class_embed(), num_denoising=100)
    assert groups.num_group == 33 and groups.num_dn == 198
    assert groups.positive_idx[1].numel() == 0
    assert torch.equal(groups.positive_idx[0], torch.arange(3).repeat(33) + torch.arange(33).repeat_interleave(3) * 6)
    assert (groups.embeddings[1] == 0).all()


def test_zero_denoising_returns_none():
    assert build_denoising_groups(make_targets(), NUM_CLASSES, 300, class_embed(), num_denoising=0) is None
