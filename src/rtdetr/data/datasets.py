"""One entry to the dataset layouts: `detect_layout` and `open_split`, which opens a split of any of them as a
`CocoDetection` (`check_data` in validate.py checks every split of any of them).

    dataset = open_split("datasets/my_data", "train", train_transforms((640, 640), stop_epoch=71))
    evaluator = CocoEvaluator(dataset.coco, dataset.class_names)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

from .coco import CocoDetection, find_split
from .yolo import find_data_yaml, open_yolo_split

Layout = Literal["coco", "roboflow", "yolo"]


def detect_layout(data_dir: str | Path) -> Layout:
    """The layout of a dataset folder (or a YOLO data.yaml itself), tried in this order:

    'coco': `annotations/instances_<split>.json` with images in `<split>/` or `images/<split>/`;
    'roboflow': `<split>/_annotations.coco.json` next to the images;
    'yolo': `data.yaml` (Ultralytics) with `images/<split>/` and `labels/<split>/`.
    FileNotFoundError if the folder is missing or in none of them.
    """
    root = Path(data_dir)
    if root.is_file() and root.suffix in (".yaml", ".yml"):
        return "yolo"
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if any((root / "annotations").glob("instances_*.json")):
        return "coco"
    if any(root.glob("*/_annotations.coco.json")):
        return "roboflow"
    if find_data_yaml(root).is_file():
        return "yolo"
    raise FileNotFoundError(
        f"{root} is in no dataset layout known: expected annotations/instances_<split>.json (COCO), "
        "<split>/_annotations.coco.json (Roboflow) or data.yaml (YOLO)"
    )


def open_split(
    data_dir: str | Path, split: str, transforms: Callable | None = None, skip_bad_images: bool = False
) -> CocoDetection:
    """`split` ('train', 'val', ...) of a dataset folder of any layout (`detect_layout`) as a `CocoDetection`.

    FileNotFoundError if the folder or the split is missing (listing what was tried); ValueError listing the
    annotation errors (the ones `check_data` reports), each naming the file and the annotation id or line.
    """
    if detect_layout(data_dir) == "yolo":
        return open_yolo_split(data_dir, split, transforms, skip_bad_images)
    ann_file, image_dir = find_split(data_dir, split)
    return CocoDetection(ann_file, image_dir, transforms, skip_bad_images)
