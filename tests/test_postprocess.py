import math

import torch

from rtdetr.postprocess import postprocess, topk_detections


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_topk_over_queries_and_classes_on_hand_made_logits():
    # 3 queries x 2 classes; query 1 scores high for both classes, so it appears twice.
    logits = torch.tensor([[[logit(0.1), logit(0.2)], [logit(0.9), logit(0.7)], [logit(0.3), logit(0.05)]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0], [0.75, 0.25, 0.1, 0.1]]])
    sizes = torch.tensor([[200, 100]])  # (width, height)
    labels, xyxy, scores = topk_detections(logits, boxes, sizes, num_top=4)
    assert labels.tolist() == [[0, 1, 0, 1]]
    torch.testing.assert_close(scores, torch.tensor([[0.9, 0.7, 0.3, 0.2]]))
    # query 1: cx .25*200=50, w 100 -> x 0..100; cy .5*100=50, h 100 -> y 0..100
    torch.testing.assert_close(xyxy[0, 0], torch.tensor([0.0, 0.0, 100.0, 100.0]))
    torch.testing.assert_close(xyxy[0, 1], torch.tensor([0.0, 0.0, 100.0, 100.0]))
    # query 2: cx 150 w 20 -> 140..160; cy 25 h 10 -> 20..30
    torch.testing.assert_close(xyxy[0, 2], torch.tensor([140.0, 20.0, 160.0, 30.0]))
    torch.testing.assert_close(xyxy[0, 3], torch.tensor([80.0, 40.0, 120.0, 60.0]))  # query 0: w .2*200


def test_postprocess_maps_labels_to_category_ids_names_and_thresholds():
    logits = torch.full((2, 3, 2), logit(0.01))
    logits[0, 2, 1] = logit(0.8)
    logits[1, 0, 0] = logit(0.6)
    boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0]]).expand(2, 3, 4)
    sizes = torch.tensor([[640, 480], [100, 50]])
    dets = postprocess({"pred_logits": logits, "pred_boxes": boxes}, sizes, [7, 42], ["cat", "dog"], 0.5)
    assert [len(d) for d in dets] == [1, 1]
    assert dets[0].labels.tolist() == [42] and dets[0].class_names == ["dog"]
    assert dets[1].labels.tolist() == [7] and dets[1].class_names == ["cat"]
    torch.testing.assert_close(dets[0].boxes, torch.tensor([[0.0, 0.0, 640.0, 480.0]]))
    torch.testing.assert_close(dets[1].boxes, torch.tensor([[0.0, 0.0, 100.0, 50.0]]))
    coco = dets[1].to_coco_results(image_id=5)
    assert coco == [{"image_id": 5, "category_id": 7, "bbox": [0.0, 0.0, 100.0, 50.0], "score": coco[0]["score"]}]
    assert abs(coco[0]["score"] - 0.6) < 1e-6


def test_default_keeps_all_300_like_the_official_postprocessor():
    logits = torch.randn(1, 300, 80)
    dets = postprocess({"pred_logits": logits, "pred_boxes": torch.rand(1, 300, 4)}, torch.tensor([[10, 10]]),
                       list(range(80)), [str(i) for i in range(80)])  # fmt: skip
    assert len(dets[0]) == 300
    expected = torch.sigmoid(logits).flatten().topk(300).values
    torch.testing.assert_close(dets[0].scores, expected)
