"""CocoEvaluator against pycocotools' COCOeval run directly on the same detections."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rtdetr.engine.evaluator import METRICS, CocoEvaluator
from rtdetr.postprocess import Detections

# Sparse category ids, listed out of order; "fish" has no ground truth at all.
CATEGORIES = [{"id": 17, "name": "dog"}, {"id": 3, "name": "cat"},
              {"id": 40, "name": "bird"}, {"id": 41, "name": "fish"}]
NAMES = {c["id"]: c["name"] for c in CATEGORIES}


def ground_truth(path: Path, num_images: int = 6, seed: int = 0) -> Path:
    """Images 640x480 with 1-5 objects of small, medium and large sizes; one crowd box."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id * 10, "file_name": f"{image_id}.jpg", "width": 640, "height": 480})
        for _ in range(rng.integers(1, 6)):
            w, h = (round(float(v), 2) for v in rng.choice([12, 60, 200]) * rng.uniform(0.7, 1.3, 2))
            x, y = round(float(rng.uniform(0, 640 - w)), 2), round(float(rng.uniform(0, 480 - h)), 2)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id * 10, "category_id": int(rng.choice([3, 17, 40])),
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            })  # fmt: skip
    annotations[0]["iscrowd"] = 1
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def noisy_detections(coco: COCO, seed: int = 1) -> dict[int, list[tuple[list[float], float, int]]]:
    """Per image, (xyxy box rounded to 0.01 px, score, category id): jittered true boxes, some with the
    wrong class, one object missed, and random false positives."""
    rng = np.random.default_rng(seed)
    detections = {}
    for image_id in coco.getImgIds():
        dets = []
        for k, ann in enumerate(coco.imgToAnns[image_id]):
            if image_id == 20 and k == 0:
                continue  # a missed object
            x, y, w, h = ann["bbox"]
            x0, y0 = x + rng.normal(0, 0.08 * w), y + rng.normal(0, 0.08 * h)
            x1, y1 = x + w + rng.normal(0, 0.08 * w), y + h + rng.normal(0, 0.08 * h)
            category = ann["category_id"] if rng.random() > 0.15 else int(rng.choice([3, 17, 40, 41]))
            dets.append(([x0, y0, x1, y1], float(rng.uniform(0.3, 1.0)), category))
        for _ in range(3):  # false positives
            x0, y0 = rng.uniform(0, 500), rng.uniform(0, 380)
            x1, y1 = x0 + rng.uniform(5, 140), y0 + rng.uniform(5, 100)
            dets.append(([x0, y0, x1, y1], float(rng.uniform(0.05, 0.9)), int(rng.choice([3, 17, 40, 41]))))
        detections[image_id] = [([round(float(v), 2) for v in box], s, c) for box, s, c in dets]
    return detections


def as_detections(dets: list[tuple[list[float], float, int]]) -> Detections:
    dets = sorted(dets, key=lambda d: -d[1])
    return Detections(
        boxes=torch.tensor([b for b, _, _ in dets], dtype=torch.float64).reshape(-1, 4),
        scores=torch.tensor([s for _, s, _ in dets]),
        labels=torch.tensor([c for _, _, c in dets], dtype=torch.int64),
        class_names=[NAMES.get(c, str(c)) for _, _, c in dets],
    )


def pycocotools_stats(ann_file: Path, dets: dict, category_ids: list[int] | None = None) -> np.ndarray:
    """COCOeval bbox stats straight from pycocotools, results written by hand (x, y, w, h)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(ann_file))
        results = [
            {"image_id": i, "category_id": c, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
            for i, image_dets in dets.items() for b, s, c in image_dets
        ]  # fmt: skip
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        if category_ids is not None:
            coco_eval.params.catIds = category_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


def test_metrics_equal_pycocotools_cocoeval_on_noisy_detections(tmp_path):
    ann_file = ground_truth(tmp_path / "gt.json")
    evaluator = CocoEvaluator(ann_file)
    dets = noisy_detections(evaluator.coco_gt)
    ids = list(dets)[::-1]  # update order must not matter
    evaluator.update(ids[:2], [as_detections(dets[i]) for i in ids[:2]])
    evaluator.update(ids[2:], [as_detections(dets[i]) for i in ids[2:]])
    summary = evaluator.summarize()

    expected = pycocotools_stats(ann_file, dets)
    assert 0.2 < summary["AP"] < 0.9  # a non-trivial case: noise, misses and false positives
    for name, value in zip(METRICS, expected):
        assert summary[name] == pytest.approx(value, abs=1e-6), name
    assert list(summary["per_class"]) == ["cat", "dog", "bird", "fish"]  # sorted by category id 3, 17, 40, 41
    for category_id, name in [(3, "cat"), (17, "dog"), (40, "bird")]:
        expected_ap = pycocotools_stats(ann_file, dets, [category_id])[0]
        assert summary["per_class"][name] == pytest.approx(expected_ap, abs=1e-6)
    assert summary["per_class"]["fish"] == -1.0  # no ground truth
    assert len(evaluator.results()) == sum(len(d) for d in dets.values())


def test_perfect_detections_give_ap_one(tmp_path):
    evaluator = CocoEvaluator(ground_truth(tmp_path / "gt.json"), class_names=["Cat", "Dog", "Bird", "Fish"])
    coco = evaluator.coco_gt
    for image_id in coco.getImgIds():
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        dets = [(b, 1.0, a["category_id"]) for b, a in zip(boxes, anns)]
        evaluator.update([image_id], [as_detections(dets)])
    summary = evaluator.summarize()
    assert summary["AP"] == pytest.approx(1.0) and summary["AP50"] == pytest.approx(1.0)
    assert summary["AR100"] == pytest.approx(1.0)
    assert summary["per_class"] == {"Cat": pytest.approx(1.0), "Dog": pytest.approx(1.0), "Bird": pytest.approx(1.0),
                                    "Fish": -1.0}  # fmt: skip
    table = evaluator.table()
    assert "AP50" in table and "Cat" in table and "Fish" in table and "1.000" in table


def test_no_detections_score_zero_and_no_images_undefined(tmp_path):
    evaluator = CocoEvaluator(ground_truth(tmp_path / "gt.json"))
    assert evaluator.summarize()["AP"] == -1.0  # nothing evaluated yet
    empty = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), [])
    evaluator.update([10, 20], [empty, empty])
    assert evaluator.summarize()["AP"] == 0.0


def test_contiguous_labels_instead_of_category_ids_are_rejected(tmp_path):
    evaluator = CocoEvaluator(ground_truth(tmp_path / "gt.json"))
    with pytest.raises(ValueError, match="category ids"):
        evaluator.update([10], [as_detections([([0, 0, 10, 10], 0.9, 1)])])  # label 1 is no category id
    with pytest.raises(ValueError, match="image id 7"):
        evaluator.update([7], [as_detections([([0, 0, 10, 10], 0.9, 3)])])


def test_gather_merges_ranks_and_counts_repeated_images_once(tmp_path, monkeypatch):
    ann_file = ground_truth(tmp_path / "gt.json")
    ranks = [CocoEvaluator(ann_file), CocoEvaluator(ann_file)]
    dets = noisy_detections(ranks[0].coco_gt)
    for evaluator, ids in zip(ranks, [[10, 20, 30], [30, 40, 50, 60]]):  # image 30 on both, as a padded sampler
        evaluator.update(ids, [as_detections(dets[i]) for i in ids])
    # Two ranks simulated in one process (spawning workers costs seconds of imports): all_gather_object
    # hands every rank the results of both.
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    parts = [dict(evaluator._results) for evaluator in ranks]
    monkeypatch.setattr(dist, "all_gather_object", lambda out, _: out.__setitem__(slice(None), parts))
    for evaluator in ranks:
        evaluator.gather()

    single = CocoEvaluator(ann_file)
    single.update(list(dets), [as_detections(d) for d in dets.values()])
    assert ranks[0].results() == ranks[1].results() == single.results()
    assert ranks[1].summarize()["AP"] == pytest.approx(single.summarize()["AP"])
