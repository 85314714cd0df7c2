"""Tiled inference for images much larger than the model's input: small objects stay at their own scale.

    dets = predict_tiled(detector, ["aerial.jpg"], TileOptions(size=640, overlap=0.2))  # list[Detections]

Each image is cut into `size` x `size` windows that overlap by `overlap` of a tile (the last row and column end
at the image border), every window is resized to the model's input like a whole image would be, and all
windows of an image (plus, with `full_frame`, the whole image for objects larger than a tile) go through
`Detector.predict` as batches. Boxes are shifted back to original-image pixels and merged across tile
borders with supervision's NMS (or non-maximum merging) under intersection-over-smaller: an object cut by a
tile edge yields a partial box that lies inside the whole box of the tile that sees it entirely, so the two
overlap by ~1 by that measure while their IoU can be 0.5 or less. NMS is the default because RT-DETR reports
its near-duplicate queries at low scores: merging (SAHI's default, for NMS-ed YOLO outputs) averages their
boxes and scores into the object's (AP 0.22 against 0.35 with NMS in benchmarks/bench_tiling.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import supervision as sv
import torch
from PIL import Image
from torch import Tensor

from ..data.images import ImageInput, as_image_list, load_image, to_rgb
from ..postprocess import Detections
from .detector import Detector

MERGE_METHODS = ("nmm", "nms")
# The merge sees the best CANDIDATES x max_detections boxes of an image's crops: a DETR reports every query above
# the threshold, tens of thousands over many tiles at low thresholds, and supervision's merge builds a pairwise
# overlap matrix (N^2 memory). A greedy NMS keeps exactly the same boxes among these.
CANDIDATES = 4


@dataclass(frozen=True)
class TileOptions:
    """How an image is cut and merged. size: tile side in original-image pixels; overlap: the fraction of a
    tile shared with its neighbour, in [0, 1); full_frame: also run the whole image (objects larger than a
    tile); merge: 'nms' (keep the best box of a group) or 'nmm' (merge a group into its enclosing box);
    merge_threshold: intersection over the smaller box above which two boxes of one class are one object."""

    size: int
    overlap: float = 0.2
    full_frame: bool = False
    merge: str = "nms"
    merge_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ValueError(f"tile size {self.size}: give at least 32 pixels")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"tile overlap {self.overlap}: give a fraction in [0, 1), e.g. 0.2")
        if self.merge not in MERGE_METHODS:
            raise ValueError(f"tile merge '{self.merge}': choose one of {', '.join(MERGE_METHODS)}")


def tile_windows(width: int, height: int, size: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """Windows (x0, y0, x1, y1) of `size` x `size` pixels covering a `width` x `height` image: along each side
    the fewest tiles whose neighbours share at least `overlap` of a tile, spread evenly from border to border.
    A side shorter than `size` gets one window of its whole length."""

    def starts(length: int) -> list[int]:
        if length <= size:
            return [0]
        stride = max(1.0, size * (1.0 - overlap))
        count = math.ceil((length - size) / stride) + 1
        return [round(i * (length - size) / (count - 1)) for i in range(count)]

    return [(x, y, min(x + size, width), min(y + size, height)) for y in starts(height) for x in starts(width)]


def predict_tiled(
    detector: Detector,
    images: ImageInput | Sequence[ImageInput],
    tiles: TileOptions,
    score_threshold: float = 0.5,
    image_size: tuple[int, int] | None = None,
    batch_size: int = 8,
    max_detections: int = 300,
    amp: str = "off",
) -> list[Detections]:
    """Per image, the merged detections of its tiles (and of the whole image with `tiles.full_frame`):
    boxes [N, 4] pixel xyxy in the original image, scores, labels (category ids), class names, sorted by
    score, at most `max_detections`. The other arguments are `Detector.predict`'s, applied to every tile."""
    results = []
    for image in as_image_list(images):
        image = _as_croppable(image)
        width, height = _size_of(image)
        windows = tile_windows(width, height, tiles.size, tiles.overlap)
        crops = [_crop(image, window) for window in windows]
        offsets = [window[:2] for window in windows]
        if tiles.full_frame and windows != [(0, 0, width, height)]:
            crops.append(image)
            offsets.append((0, 0))
        per_crop = detector.predict(crops, score_threshold, image_size, batch_size, max_detections, amp=amp)
        shifted = [_shifted(d, dx, dy) for d, (dx, dy) in zip(per_crop, offsets)]
        results.append(merge_detections(shifted, tiles, max_detections))
    return results


def merge_detections(parts: list[Detections], tiles: TileOptions, max_detections: int = 300) -> Detections:
    """The detections of overlapping crops (already in original-image pixels) as one image's: of the best
    `CANDIDATES x max_detections`, the boxes of one class overlapping by more than `tiles.merge_threshold`
    (intersection over the smaller) merged, then the best `max_detections` by score."""
    boxes = torch.cat([d.boxes.float().cpu() for d in parts]) if parts else torch.zeros(0, 4)
    scores = torch.cat([d.scores.float().cpu() for d in parts]) if parts else torch.zeros(0)
    labels = torch.cat([d.labels.cpu() for d in parts]) if parts else torch.zeros(0, dtype=torch.int64)
    names = [name for d in parts for name in d.class_names]
    if not len(scores):
        return Detections(boxes, scores, labels, names)
    best = scores.argsort(descending=True, stable=True)[: CANDIDATES * max_detections]
    boxes, scores, labels, names = boxes[best], scores[best], labels[best], [names[i] for i in best.tolist()]
    found = sv.Detections(
        xyxy=boxes.numpy().astype(np.float64), confidence=scores.numpy().astype(np.float64),
        class_id=labels.numpy(), data={"class_name": np.array(names, dtype=object)},
    )  # fmt: skip
    metric = sv.OverlapMetric.IOS
    if tiles.merge == "nmm":
        found = found.with_nmm(tiles.merge_threshold, class_agnostic=False, overlap_metric=metric)
    else:
        found = found.with_nms(tiles.merge_threshold, class_agnostic=False, overlap_metric=metric)
    order = np.argsort(-found.confidence, kind="stable")[:max_detections]
    return Detections(
        torch.from_numpy(found.xyxy[order]).float(), torch.from_numpy(found.confidence[order]).float(),
        torch.from_numpy(found.class_id[order]).to(torch.int64), [str(n) for n in found.data["class_name"][order]],
    )  # fmt: skip


def _as_croppable(image: ImageInput) -> Image.Image | Tensor:
    """A PIL image (files read with EXIF orientation, arrays converted) or a float tensor [3, H, W] as given."""
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"a tensor image must be [3, H, W] RGB in [0, 1], got shape {tuple(image.shape)}")
        return image
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"an array image must be uint8 [H, W] or [H, W, 3|4], got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    return to_rgb(image)


def _size_of(image: Image.Image | Tensor) -> tuple[int, int]:
    return (image.shape[2], image.shape[1]) if isinstance(image, Tensor) else image.size


def _crop(image: Image.Image | Tensor, window: tuple[int, int, int, int]) -> Image.Image | Tensor:
    x0, y0, x1, y1 = window
    return image[:, y0:y1, x0:x1] if isinstance(image, Tensor) else image.crop(window)


def _shifted(detections: Detections, dx: int, dy: int) -> Detections:
    offset = torch.tensor([dx, dy, dx, dy], dtype=detections.boxes.dtype, device=detections.boxes.device)
    return Detections(detections.boxes + offset, detections.scores, detections.labels, detections.class_names)
