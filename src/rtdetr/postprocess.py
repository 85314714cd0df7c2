"""The one post-processor: raw outputs -> top-K (query, class) detections in pixel xyxy (official
`RTDETRPostProcessor`, focal branch). No NMS: the one-to-one matching makes it unnecessary."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .ops.boxes import box_cxcywh_to_xyxy


@dataclass
class Detections:
    """Detections of one image: boxes [N, 4] pixel xyxy in the original image, scores [N], labels [N]
    (dataset category ids), class_names (N strings), sorted by descending score."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.scores)

    def to_coco_results(self, image_id: int) -> list[dict]:
        """COCO results format: bbox as [x, y, width, height] in pixels."""
        xywh = torch.cat([self.boxes[:, :2], self.boxes[:, 2:] - self.boxes[:, :2]], dim=1)
        return [
            {"image_id": image_id, "category_id": int(c), "bbox": [round(float(v), 3) for v in b], "score": float(s)}
            for b, s, c in zip(xywh, self.scores, self.labels)
        ]


def topk_detections(
    logits: Tensor, boxes: Tensor, orig_sizes: Tensor, num_top: int = 300
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-K over queries x classes.

    logits [B, Q, C], boxes [B, Q, 4] normalised cx,cy,w,h, orig_sizes [B, 2] as (width, height) (the
    official order) -> labels [B, K] (0..C-1), boxes [B, K, 4] pixel xyxy, scores [B, K]. A query can
    appear once per class. Tensor-only, so it can live inside an exported graph.
    """
    num_classes = logits.shape[-1]
    xyxy = box_cxcywh_to_xyxy(boxes) * orig_sizes.repeat(1, 2).unsqueeze(1).to(boxes.dtype)
    scores, index = torch.topk(torch.sigmoid(logits).flatten(1), min(num_top, logits.shape[1] * num_classes), dim=-1)
    query = index // num_classes
    labels = index - query * num_classes  # == index % C; spelled out for old TensorRT (official v2)
    xyxy = xyxy.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
    return labels, xyxy, scores


def postprocess(
    outputs: dict[str, Tensor],
    orig_sizes: Tensor,
    category_ids: list[int] | tuple[int, ...],
    class_names: list[str] | tuple[str, ...],
    score_threshold: float = 0.0,
    num_top: int = 300,
) -> list[Detections]:
    """Model outputs -> one `Detections` per image, labels mapped to `category_ids` and `class_names`.

    orig_sizes [B, 2] is (width, height) of each original image.
    """
    labels, boxes, scores = topk_detections(outputs["pred_logits"], outputs["pred_boxes"], orig_sizes, num_top)
    return select_detections(labels, boxes, scores, category_ids, class_names, score_threshold)


def select_detections(
    labels: Tensor,
    boxes: Tensor,
    scores: Tensor,
    category_ids: list[int] | tuple[int, ...],
    class_names: list[str] | tuple[str, ...],
    score_threshold: float = 0.0,
    max_detections: int | None = None,
) -> list[Detections]:
    """Top-K detections (labels [B, K] 0..C-1, boxes [B, K, 4], scores [B, K], sorted by score, as
    `topk_detections` or an exported graph gives them) -> per image the first `max_detections` scoring above
    `score_threshold`, labels mapped to `category_ids` and `class_names`."""
    ids = torch.as_tensor(category_ids, device=labels.device)
    results = []
    for lab, box, score in zip(labels[:, :max_detections], boxes[:, :max_detections], scores[:, :max_detections]):
        keep = score > score_threshold
        lab, box, score = lab[keep], box[keep], score[keep]
        results.append(Detections(box, score, ids[lab], [class_names[i] for i in lab.tolist()]))
    return results
