"""Training and evaluation transforms: the official RT-DETR recipe on torchvision.transforms.v2.

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

from ..ops.boxes import box_xyxy_to_cxcywh


class DetectionTransform:
    """`strong` augmentations (if any) then `ops`, with the official v2 `stop_epoch` policy: from epoch
    `stop_epoch` on the strong ones are skipped, so the last epochs train on nearly clean images.

    The epoch reaches DataLoader workers only if they are created after `set_epoch` (the default,
    `persistent_workers=False`, re-creates them every epoch).
    """

    def __init__(self, ops: v2.Compose, strong: v2.Compose | None = None, stop_epoch: int | None = None) -> None:
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
        boxes = tv_tensors.BoundingBoxes(
            torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4),
            format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(image.height, image.width),
        )  # fmt: skip
        sample = (image, {**target, "boxes": boxes})
        if self.strong_enabled:
            sample = self.strong(*sample)
        image, target = self.ops(*sample)
        return image.as_subclass(Tensor), _normalized_cxcywh(target, image.shape[-2:])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strong={self.strong}, ops={self.ops}, stop_epoch={self.stop_epoch})"


def _normalized_cxcywh(target: dict[str, Any], size: torch.Size) -> dict[str, Any]:
    """Pixel xyxy BoundingBoxes -> plain tensor [n, 4] of cx,cy,w,h divided by the image (w, h, w, h)."""
    height, width = size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return {**target, "boxes": box_xyxy_to_cxcywh(target["boxes"].as_subclass(Tensor)) / scale}


def _to_float_image() -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def train_transforms(image_size: tuple[int, int], stop_epoch: int | None = None) -> DetectionTransform:
    """The official training pipeline (v1 `dataloader.yml`, v2 `policy: stop_epoch`), resizing to
    `image_size` (H, W) without keeping the aspect ratio. `stop_epoch=None` never switches the strong
    augmentations (photometric distortion, zoom-out, IoU crop) off."""
    strong = v2.Compose([
        v2.RandomPhotometricDistort(p=0.5),
        v2.RandomZoomOut(fill=0, side_range=(1.0, 4.0), p=0.5),
        v2.RandomApply([v2.RandomIoUCrop()], p=0.8),  # official wrapper `RandomIoUCrop(p=0.8)`
    ])  # fmt: skip
    ops = v2.Compose([
        v2.SanitizeBoundingBoxes(min_size=1),  # drops the boxes the IoU crop marked as outside
        v2.RandomHorizontalFlip(),
        v2.Resize(list(image_size)),
        *_to_float_image(),
        v2.SanitizeBoundingBoxes(min_size=1),  # boxes squeezed under a pixel by the resize
    ])  # fmt: skip
    return DetectionTransform(ops, strong, stop_epoch)


def eval_transforms(image_size: tuple[int, int] | None) -> DetectionTransform:
    """Resize to `image_size` (H, W; None keeps the image's size) and convert to float, as the official
    evaluation; boxes in the same normalised format as training."""
    resize = [v2.Resize(list(image_size))] if image_size is not None else []
    return DetectionTransform(v2.Compose([*resize, *_to_float_image()]))
