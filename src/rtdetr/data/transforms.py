"""Training and evaluation transforms: the official RT-DETR recipe (torchvision.transforms.v2 semantics).

A transform maps `(image, target) -> (image, target)`:
  in:  a PIL RGB image and `boxes` float [n, 4] pixel x0,y0,x1,y1 in that image, `labels` int64 [n]
       (any other entry, e.g. `image_id`, passes through unchanged);
  out: image float [3, H, W] RGB in [0, 1] (no mean/std normalisation, as the official model), `boxes`
       float [n, 4] normalised cx,cy,w,h and the matching `labels` (training drops boxes under 1 pixel with
       their labels).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..ops.boxes import box_xyxy_to_cxcywh


class DetectionTransform:
    """`strong` augmentations (if any) then `ops`, with the official v2 `stop_epoch` policy: from epoch
    `stop_epoch` on the strong ones are skipped, so the last epochs train on nearly clean images.

    The epoch reaches DataLoader workers only if they are created after `set_epoch` (the default,
    `persistent_workers=False`, re-creates them every epoch).
    """

    def __init__(self, ops: ResizeOps, strong: v2.Compose | None = None, stop_epoch: int | None = None) -> None:
        self.ops = ops
        self.strong = strong
        self.stop_epoch = stop_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def strong_enabled(self) -> bool:
        return self.strong is not None and (self.stop_epoch is None or self.epoch < self.stop_epoch)

    def __call__(self, image: Image.Image, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
        if self.strong_enabled:
            canvas = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(image.height, image.width))
            image, target = self.strong(image, {**target, "boxes": canvas})
            boxes = target["boxes"].as_subclass(Tensor)
        return self.ops(image, {**target, "boxes": boxes})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strong={self.strong}, ops={self.ops}, stop_epoch={self.stop_epoch})"


class ResizeOps:
    """The official always-on ops, v1 `dataloader.yml` order: [SanitizeBoundingBoxes, RandomHorizontalFlip] (training),
    Resize, ToImage + ConvertImageDtype, [SanitizeBoundingBoxes] (training). The same pixels, boxes and random draws
    as torchvision's v2 transforms of those names, on plain tensors: v2's per-sample dispatch over the target
    costs ~2 ms per image, a tenth of a 160-px training step on 2 CPU cores; this costs ~0.4 ms.

    image_size: (H, W) without keeping the aspect ratio, or None to keep the image's size. training: flip with
    probability 0.5 (one `torch.rand(1)` draw per image, as v2) and drop boxes under 1 pixel (v2's sanitize rule:
    width and height >= 1, area >= 1, inside the image) with their labels.
    """

    def __init__(self, image_size: tuple[int, int] | None, training: bool) -> None:
        self.image_size = list(image_size) if image_size is not None else None
        self.training = training

    def __call__(self, image: Image.Image | Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        height, width = F.get_size(image)
        boxes = target["boxes"]
        labels = target.get("labels")
        if self.training:
            boxes, labels = _sanitize(boxes, labels, (height, width))
            if torch.rand(1) < 0.5:
                image = F.horizontal_flip(image)
                boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        if self.image_size is not None:
            image = F.resize(image, self.image_size)
            new_height, new_width = F.get_size(image)
            boxes = boxes * torch.tensor([new_width / width, new_height / height] * 2)
            height, width = new_height, new_width
        if self.training:
            boxes, labels = _sanitize(boxes, labels, (height, width))
        image = F.to_dtype(F.to_image(image), torch.float32, scale=True).as_subclass(Tensor)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target = {**target, "boxes": box_xyxy_to_cxcywh(boxes) / scale}
        return image, target if labels is None else {**target, "labels": labels}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, training={self.training})"


def _sanitize(boxes: Tensor, labels: Tensor | None, size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """Boxes of at least 1 x 1 pixel inside an image of `size` (H, W), and their labels: the rule of torchvision's
    `SanitizeBoundingBoxes(min_size=1)` (its other conditions, area >= 1 and x0 <= W, y0 <= H, follow from these).
    In NumPy: a few boxes cost microseconds there, tens of them in torch."""
    height, width = size
    b = boxes.numpy()
    x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    keep = torch.from_numpy((x1 - x0 >= 1) & (y1 - y0 >= 1) & (x0 >= 0) & (y0 >= 0) & (x1 <= width) & (y1 <= height))
    return boxes[keep], labels[keep] if labels is not None else None


def train_transforms(image_size: tuple[int, int], stop_epoch: int | None = None) -> DetectionTransform:
    """The official training pipeline (v1 `dataloader.yml`, v2 `policy: stop_epoch`), resizing to
    `image_size` (H, W) without keeping the aspect ratio. `stop_epoch=None` never switches the strong
    augmentations (photometric distortion, zoom-out, IoU crop) off."""
    strong = v2.Compose([
        v2.RandomPhotometricDistort(p=0.5),
        v2.RandomZoomOut(fill=0, side_range=(1.0, 4.0), p=0.5),
        v2.RandomApply([v2.RandomIoUCrop()], p=0.8),  # official wrapper `RandomIoUCrop(p=0.8)`
    ])  # fmt: skip
    return DetectionTransform(ResizeOps(image_size, training=True), strong, stop_epoch)


def eval_transforms(image_size: tuple[int, int] | None) -> DetectionTransform:
    """Resize to `image_size` (H, W; None keeps the image's size) and convert to float, as the official
    evaluation; boxes in the same normalised format as training."""
    return DetectionTransform(ResizeOps(image_size, training=False))
