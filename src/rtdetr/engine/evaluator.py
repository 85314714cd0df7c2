"""COCO box metrics of detections (pycocotools `COCOeval`, bbox, maxDets 1/10/100), per class too.

    evaluator = CocoEvaluator(dataset.ann_file, dataset.class_names)
    for images, targets in loader:
        ids = [int(t["image_id"]) for t in targets]
        evaluator.update(ids, postprocess(model(images), orig_sizes, dataset.category_ids, dataset.class_names))
    evaluator.gather()            # under torch.distributed: every rank then holds all results
    print(evaluator.table())      # AP, AP50, ..., AR100 and AP per class
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..data.coco import read_coco_json
from ..postprocess import Detections

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")  # order of COCOeval.stats


class CocoEvaluator:
    """Collects detections of a COCO-format ground truth and computes its metrics.

    coco_gt: a pycocotools COCO, the path of the annotation file, or a COCO-format dict (e.g. `dataset.coco`, also
    of a converted YOLO split; indexed as it is, not re-read from a file). Annotations without `area` get w*h (in
    place; for a dict, in a copy of its annotations), as COCOeval needs it for the small/medium/large split.
    class_names, one per category sorted by id, default to the file's category names. Only the images passed to
    `update` are evaluated (official `CocoEvaluator`), so a subset can be scored.
    """

    def __init__(self, coco_gt: COCO | dict | str | Path, class_names: Sequence[str] | None = None) -> None:
        if isinstance(coco_gt, dict):
            coco = COCO()
            coco.dataset = {**coco_gt, "annotations": [dict(a) for a in coco_gt.get("annotations") or []]}
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
                coco.createIndex()
            coco_gt = coco
        self.coco_gt = coco_gt if isinstance(coco_gt, COCO) else _load_ground_truth(coco_gt)
        for annotation in self.coco_gt.dataset.get("annotations", []):
            annotation.setdefault("area", annotation["bbox"][2] * annotation["bbox"][3])
        self.category_ids = sorted(self.coco_gt.getCatIds())
        self.class_names = list(class_names or [self.coco_gt.cats[c]["name"] for c in self.category_ids])
        if len(self.class_names) != len(self.category_ids):
            raise ValueError(f"{len(self.class_names)} class names for {len(self.category_ids)} categories")
        self._results: dict[int, list[dict]] = {}  # image id -> its detections in COCO results format
        self._summary: dict | None = None

    def update(self, image_ids: Sequence[int], detections: Sequence[Detections]) -> None:
        """Add one batch: per image, Detections with pixel xyxy boxes and labels that are dataset category ids.
        An image seen again replaces its earlier detections (a padded distributed sampler repeats images)."""
        if len(image_ids) != len(detections):
            raise ValueError(f"{len(image_ids)} image ids for {len(detections)} detections")
        known = set(self.category_ids)
        for image_id, dets in zip(image_ids, detections):
            image_id = int(image_id)
            # One host copy per tensor rather than a device sync per value in to_coco_results.
            dets = Detections(dets.boxes.cpu(), dets.scores.cpu(), dets.labels.cpu(), dets.class_names)
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            unknown = set(dets.labels.tolist()) - known
            if unknown:
                raise ValueError(
                    f"labels {sorted(unknown)} of image {image_id} are not category ids {self.category_ids}: "
                    "map the model's 0..C-1 labels through dataset.category_ids (postprocess does)"
                )
            self._results[image_id] = dets.to_coco_results(image_id)
        self._summary = None

    def gather(self) -> None:
        """Merge the results of all torch.distributed ranks into every rank (no-op when not distributed)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        parts: list[dict[int, list[dict]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self._results)
        merged: dict[int, list[dict]] = {}
        for part in parts:
            for image_id, results in part.items():
                merged.setdefault(image_id, results)  # an image padded onto two ranks counts once
        self._results = merged
        self._summary = None

    def results(self) -> list[dict]:
        """All detections in COCO results format (dataset image and category ids, bbox pixel x,y,w,h)."""
        return [r for image_id in sorted(self._results) for r in self._results[image_id]]

    def summarize(self) -> dict:
        """{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100": float in [0, 1] or -1 where
        undefined, "per_class": {class name: AP@[.5:.95] or -1 if the class has no ground truth}}."""
        if self._summary is None:
            self._summary = self._evaluate()
        return self._summary

    def _evaluate(self) -> dict:
        if not self._results:
            return {**dict.fromkeys(METRICS, -1.0), "per_class": dict.fromkeys(self.class_names, -1.0)}
        coco_eval = COCOeval(self.coco_gt, _load_results(self.coco_gt, self.results()), "bbox")
        coco_eval.params.imgIds = sorted(self._results)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        metrics: dict = {name: float(value) for name, value in zip(METRICS, coco_eval.stats)}
        metrics["per_class"] = dict(zip(self.class_names, _per_class_ap(coco_eval)))
        return metrics

    def table(self) -> str:
        """The metrics, then AP per class in three columns."""
        summary = self.summarize()
        lines = ["  ".join(f"{name:>6}" for name in METRICS), "  ".join(f"{summary[n]:6.3f}" for n in METRICS)]
        cells = [f"{name[:24]:<24} {ap:6.3f}" for name, ap in summary["per_class"].items()]
        lines.append(f"AP per class ({len(cells)}):")
        lines += ["   ".join(cells[i : i + 3]) for i in range(0, len(cells), 3)]
        return "\n".join(lines)


def _load_ground_truth(path: str | Path) -> COCO:
    coco = COCO()
    coco.dataset = read_coco_json(path)  # errors name the file and the JSON position
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _load_results(coco_gt: COCO, results: list[dict]) -> COCO:
    """Results as a COCO object; pycocotools' loadRes cannot take an empty list (no detections at all)."""
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(results)
    coco_dt = COCO()
    coco_dt.dataset = {**coco_gt.dataset, "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


def _per_class_ap(coco_eval: COCOeval) -> list[float]:
    """AP@[.5:.95] per category (all areas, 100 detections), -1 where the class has no ground truth."""
    precision = coco_eval.eval["precision"]  # [IoU thresholds, recall points, categories, areas, maxDets]
    aps = []
    for k in range(precision.shape[2]):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        aps.append(float(np.mean(values)) if values.size else -1.0)
    return aps
