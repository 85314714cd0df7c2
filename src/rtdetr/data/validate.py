"""`check_dataset`: find what is wrong with a COCO-format dataset before a long training run.

Errors are problems that lose or corrupt training signal (fix them first): malformed JSON, duplicate ids,
unknown category or image ids, malformed boxes, missing or unreadable images, images whose size in the
JSON disagrees with the file. Warnings are what `CocoDetection` repairs the way the official loader does:
boxes sticking out of the image (clamped) and boxes without area (dropped).
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .images import load_image
from .coco import annotation_xywh, listed, read_coco_json

_BOUNDS_TOLERANCE = 1.0  # pixels: COCO's own boxes overshoot by rounding


@dataclass
class DatasetReport:
    """What `check_dataset` found: human-readable `errors` and `warnings`, each naming the file and the
    image or annotation id."""

    ann_file: Path
    image_dir: Path
    num_images: int = 0
    num_annotations: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self, max_lines: int = 20) -> str:
        """Counts, then up to `max_lines` errors and warnings each."""
        lines = [
            f"{self.ann_file} ({self.num_images} images, {self.num_annotations} annotations, images in "
            f"{self.image_dir}): {len(self.errors)} errors, {len(self.warnings)} warnings"
        ]
        for title, messages in (("error", self.errors), ("warning", self.warnings)):
            lines += [f"  {title}: {m}" for m in messages[:max_lines]]
            if len(messages) > max_lines:
                lines.append(f"  ... and {len(messages) - max_lines} more {title}s")
        return "\n".join(lines)


def check_dataset(ann_file: str | Path, image_dir: str | Path, check_images: bool = True) -> DatasetReport:
    """Check an annotation file and (with `check_images`, decoding every image) its image folder.

    Boxes are checked against the image size stated in the JSON and, when images are read, the size of the
    image as displayed (EXIF orientation applied), which is what the boxes must refer to.
    """
    report = DatasetReport(Path(ann_file), Path(image_dir))
    try:
        data = read_coco_json(ann_file)
    except (FileNotFoundError, ValueError) as error:
        report.errors.append(str(error))
        return report
    categories = _check_categories(data["categories"], report)
    images = _check_images(data["images"], report)
    file_sizes = _check_image_files(images, report) if check_images else {}
    by_id: dict[Any, dict] = {}
    for image in images:
        by_id.setdefault(image["id"], image)  # a duplicate id is an error already; boxes go by the first
    _check_annotations(data.get("annotations") or [], categories, by_id, file_sizes, report)
    return report


def _duplicates(ids: list[Any]) -> list[Any]:
    return [i for i, count in Counter(ids).items() if count > 1]


def _check_categories(categories: list[Any], report: DatasetReport) -> set[Any]:
    valid = [c for c in categories if isinstance(c, dict) and "id" in c and "name" in c]
    if len(valid) != len(categories):
        report.errors.append(f"{report.ann_file}: {len(categories) - len(valid)} categories lack an 'id' or 'name'")
    ids = [c["id"] for c in valid]
    if duplicates := _duplicates(ids):
        report.errors.append(f"{report.ann_file}: duplicate category ids {listed(duplicates)}")
    return set(ids)


def _check_images(images: list[Any], report: DatasetReport) -> list[dict]:
    """The image entries with an id and file_name; records the others, duplicate ids and missing sizes."""
    report.num_images = len(images)
    valid = [im for im in images if isinstance(im, dict) and "id" in im and "file_name" in im]
    if len(valid) != len(images):
        report.errors.append(f"{report.ann_file}: {len(images) - len(valid)} image entries lack an 'id' or 'file_name'")
    if duplicates := _duplicates([im["id"] for im in valid]):
        report.errors.append(f"{report.ann_file}: duplicate image ids {listed(duplicates)}")
    unsized = [im["id"] for im in valid if _stated_size(im) is None]
    if unsized:
        report.warnings.append(f"{report.ann_file}: no positive width/height for image ids {listed(unsized)}")
    return valid


def _stated_size(image: dict) -> tuple[float, float] | None:
    width, height = image.get("width"), image.get("height")
    if isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0:
        return float(width), float(height)
    return None


def _read_size(path: Path) -> tuple[int, int] | str:
    """(width, height) as displayed, or the error message naming the file."""
    try:
        return load_image(path).size  # a full decode: truncated files fail only here
    except (FileNotFoundError, ValueError) as error:
        return str(error)


def _check_image_files(images: list[dict], report: DatasetReport) -> dict[Any, tuple[int, int]]:
    """Sizes of the readable images by id; records unreadable ones and sizes disagreeing with the JSON."""
    paths = [report.image_dir / str(im["file_name"]) for im in images]
    with ThreadPoolExecutor(max_workers=8) as pool:  # decoding releases the GIL
        results = list(pool.map(_read_size, paths))
    sizes = {}
    for image, result in zip(images, results):
        image_id = image["id"]
        if isinstance(result, str):
            report.errors.append(f"image id {image_id}: {result}")
            continue
        sizes.setdefault(image_id, result)
        stated = _stated_size(image)
        if stated is not None and stated != result:
            hint = (" (the JSON has the size before EXIF rotation; boxes must refer to the rotated image)"
                    if stated == result[::-1] else "")  # fmt: skip
            report.errors.append(
                f"{report.ann_file}: image id {image_id} ({image['file_name']}) is {stated[0]:g}x{stated[1]:g} in "
                f"the JSON but {result[0]}x{result[1]} as read{hint}"
            )
    return sizes


def _check_annotations(
    annotations: list[Any], categories: set[Any], images: dict[Any, dict], file_sizes: dict, report: DatasetReport
) -> None:
    report.num_annotations = len(annotations)
    ids = [a.get("id") for a in annotations if isinstance(a, dict)]
    if duplicates := _duplicates(ids):
        report.errors.append(f"{report.ann_file}: duplicate annotation ids {listed(duplicates)}")
    for annotation in annotations:
        if not isinstance(annotation, dict):
            report.errors.append(f"{report.ann_file}: annotation {annotation!r} is not an object")
            continue
        name = f"{report.ann_file}: annotation {annotation.get('id')}"
        if annotation.get("category_id") not in categories:
            report.errors.append(f"{name} has category_id {annotation.get('category_id')}, not among the categories")
        if annotation.get("image_id") not in images:
            report.errors.append(f"{name} refers to image id {annotation.get('image_id')}, not among the images")
            continue
        try:
            box = annotation_xywh(annotation, report.ann_file)
        except ValueError as error:
            report.errors.append(str(error))
            continue
        image_id = annotation["image_id"]
        sizes = {"JSON": _stated_size(images[image_id]), "file": file_sizes.get(image_id)}
        _check_box(name, box, sizes, report)


def _check_box(name: str, box: tuple[float, ...], sizes: dict[str, tuple | None], report: DatasetReport) -> None:
    x, y, w, h = box
    if w <= 0 or h <= 0:
        report.warnings.append(f"{name}: degenerate bbox {list(box)} (width or height <= 0), it will be dropped")
        return
    for source, size in sizes.items():
        if size is None:
            continue
        width, height = size
        outside = x < -_BOUNDS_TOLERANCE or y < -_BOUNDS_TOLERANCE or x + w > width + _BOUNDS_TOLERANCE or (
            y + h > height + _BOUNDS_TOLERANCE
        )
        if outside:
            fate = "dropped" if x >= width or y >= height or x + w <= 0 or y + h <= 0 else "clamped"
            report.warnings.append(
                f"{name}: bbox {list(box)} extends beyond the {width:g}x{height:g} image ({source} size), "
                f"it will be {fate}"
            )
            return  # one report per box, even if both sizes are exceeded
