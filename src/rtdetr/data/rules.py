"""The annotation rules of a COCO-format dict, in one place for the loader (`CocoDetection`) and the check
(`check_dataset`, `check_data`), so that the two never disagree.

Errors lose or corrupt training signal or break the evaluation: the loader refuses the file, the check reports
each one. They are categories without an integer `id` or a `name`, duplicate category ids; images without an
integer `id` or a `file_name`, duplicate image ids; annotations that are not objects, lack an `id`, repeat an
id, name a category or an image that is not listed, or whose `bbox` is not 4 finite numbers.

Warnings are what the loader repairs as the official loader does: boxes extending more than a pixel beyond
their image are clamped to it, boxes without area inside their image (width or height <= 0, or outside it)
are dropped. Crowd boxes (iscrowd=1) are not trained on (official), so only their format is checked.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

BOUNDS_TOLERANCE = 1.0  # pixels: COCO's own boxes overshoot by rounding
_MAX_LISTED = 20

Size = tuple[float, float]  # (width, height) in pixels
XYXY = tuple[float, float, float, float]


@dataclass
class Annotations:
    """A COCO dict as the loader trains on it. Per image in file order (duplicate ids included): `image_ids`,
    `file_names`, `sizes` (the stated (width, height), None where the entry has no positive width and
    height), `boxes` (pixel xyxy clamped to the stated size) and `labels` (0..C-1 by sorted category id).
    `dropped` lists the ids of the boxes dropped for having no area inside their image."""

    class_names: list[str] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    file_names: list[str] = field(default_factory=list)
    sizes: list[Size | None] = field(default_factory=list)
    boxes: list[list[XYXY]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    dropped: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def listed(ids: Sequence[Any], max_listed: int = _MAX_LISTED) -> str:
    """The first ids of a long list, with how many more."""
    more = f" and {len(ids) - max_listed} more" if len(ids) > max_listed else ""
    return ", ".join(map(str, ids[:max_listed])) + more


def refusal(ann_file: Path, errors: Sequence[str]) -> str:
    """The loader's message when `ann_file` breaks rules: its errors, the first 20 of them."""
    lines = [f"  {e}" for e in errors[:_MAX_LISTED]]
    if len(errors) > _MAX_LISTED:
        lines.append(f"  ... and {len(errors) - _MAX_LISTED} more")
    return (
        f"{ann_file}: {len(errors)} annotation errors that lose or corrupt training signal; fix them "
        "(rtdetr.data.validate.check_data lists every problem of the dataset, images included):\n" + "\n".join(lines)
    )


def is_integer(value: Any) -> bool:
    """A Python int, not a bool (JSON's integers; True would pass for 1)."""
    return type(value) is int


def is_image_entry(image: Any) -> bool:
    """Whether an `images` entry has what the loader needs: an integer `id` and a `file_name` string."""
    return isinstance(image, dict) and is_integer(image.get("id")) and isinstance(image.get("file_name"), str)


def _is_category(category: Any) -> bool:
    return isinstance(category, dict) and is_integer(category.get("id")) and "name" in category


def stated_size(image: dict) -> Size | None:
    """The entry's (width, height) if both are positive finite numbers."""
    width, height = image.get("width"), image.get("height")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (width, height))
    if numbers and all(math.isfinite(v) and v > 0 for v in (width, height)):
        return float(width), float(height)
    return None


def size_mismatch(
    ann_file: Path, image_id: int, file_name: str, stated: Size | None, actual: tuple[int, int]
) -> str | None:
    """The error if an image's stated size is not its size as read (EXIF orientation applied)."""
    if stated is None or stated == actual:
        return None
    hint = " (the JSON has the size before EXIF rotation; boxes must refer to the rotated image)" if (
        stated == actual[::-1]
    ) else ""  # fmt: skip
    return (
        f"{ann_file}: image id {image_id} ({file_name}) is {stated[0]:g}x{stated[1]:g} in the JSON but "
        f"{actual[0]}x{actual[1]} as read{hint}; fix its width/height and check that its boxes refer to the image "
        "as displayed"
    )


def read_annotations(
    data: dict[str, Any],
    ann_file: Path,
    names: Mapping[Any, str] | None = None,
    file_sizes: Mapping[int, tuple[int, int]] | None = None,
    stated_source: str = "JSON",
) -> Annotations:
    """Apply the rules to a COCO dict with `images` and `categories` lists (and optionally `annotations`).

    names: how messages name an annotation, by id (default "<ann_file>: annotation <id>"). file_sizes: the
    sizes of the image files by image id, where read (the check): boxes are then checked against the stated
    size (called `stated_source` in messages) and the file's, and kept only if they have area inside both, as
    the loader does when it later clamps to the image as read.
    """
    result = Annotations()
    _read_categories(data["categories"], ann_file, result)
    _read_images(data["images"], ann_file, result)
    _read_boxes(data.get("annotations") or [], ann_file, names or {}, file_sizes or {}, stated_source, result)
    return result


def _duplicates(ids: list[Any]) -> list[Any]:
    return [i for i, count in Counter(ids).items() if count > 1]


def _read_categories(categories: list[Any], ann_file: Path, result: Annotations) -> None:
    """class_names and category_ids sorted by id; errors for malformed entries and duplicate ids."""
    valid = [c for c in categories if _is_category(c)]
    if len(valid) != len(categories):
        bad = [k for k, c in enumerate(categories) if not _is_category(c)]
        result.errors.append(f"{ann_file}: categories[{listed(bad)}] need an integer 'id' and a 'name'")
    if duplicates := _duplicates([c["id"] for c in valid]):
        result.errors.append(f"{ann_file}: duplicate category ids {listed(duplicates)}; give each category one id")
    unique = {c["id"]: c for c in reversed(valid)}  # the first entry of each id
    result.category_ids = sorted(unique)
    result.class_names = [str(unique[i]["name"]) for i in result.category_ids]


def _read_images(images: list[Any], ann_file: Path, result: Annotations) -> None:
    """The well-formed image entries in file order; errors for the others and for duplicate ids."""
    valid = [im for im in images if is_image_entry(im)]
    if len(valid) != len(images):
        bad = [k for k, im in enumerate(images) if not is_image_entry(im)]
        result.errors.append(f"{ann_file}: images[{listed(bad)}] need an integer 'id' and a 'file_name'")
    if duplicates := _duplicates([im["id"] for im in valid]):
        result.errors.append(
            f"{ann_file}: duplicate image ids {listed(duplicates)}; give every image a unique id (annotations refer "
            "to images by id)"
        )
    result.image_ids = [im["id"] for im in valid]
    result.file_names = [im["file_name"] for im in valid]
    result.sizes = [stated_size(im) for im in valid]
    result.boxes = [[] for _ in valid]
    result.labels = [[] for _ in valid]


def annotation_xywh(annotation: dict[str, Any]) -> tuple[float, float, float, float] | None:
    """The annotation's `bbox` [x, y, w, h] if it is 4 finite numbers."""
    bbox = annotation.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(type(v) in (int, float) for v in bbox)):
        return None
    box = tuple(map(float, bbox))
    return box if all(map(math.isfinite, box)) else None


def _read_boxes(
    annotations: Any,
    ann_file: Path,
    names: Mapping[Any, str],
    file_sizes: Mapping[int, tuple[int, int]],
    stated_source: str,
    result: Annotations,
) -> None:
    """Each annotation's box and label into its image (the first entry of its id), or an error or warning."""
    if not isinstance(annotations, list):
        result.errors.append(f"{ann_file}: 'annotations' is {type(annotations).__name__}, not a list of objects")
        return
    ids = [a.get("id") for a in annotations if isinstance(a, dict)]
    if duplicates := _duplicates([i for i in ids if is_integer(i)]):
        result.errors.append(
            f"{ann_file}: duplicate annotation ids {listed(duplicates)}; give every annotation a unique id "
            "(the COCO evaluation looks annotations up by id)"
        )
    label_of = {c: k for k, c in enumerate(result.category_ids)}
    position: dict[int, int] = {}
    for k, image_id in enumerate(result.image_ids):
        position.setdefault(image_id, k)
    for index, annotation in enumerate(annotations):
        box = _parse_annotation(annotation, label_of, position, result.category_ids)
        if isinstance(box, str):
            result.errors.append(f"{_annotation_name(annotation, index, ann_file, names)} {box}")
            continue
        if annotation.get("iscrowd", 0):
            continue  # not trained on (official)
        k = position[annotation["image_id"]]
        sizes = [(stated_source, result.sizes[k]), ("file", file_sizes.get(annotation["image_id"]))]
        xyxy, warning = place_box(box, [(source, size) for source, size in sizes if size is not None])
        if warning is not None:
            result.warnings.append(f"{_annotation_name(annotation, index, ann_file, names)}: {warning}")
        if xyxy is None:
            result.dropped.append(annotation["id"])
        else:
            result.boxes[k].append(xyxy)
            result.labels[k].append(label_of[annotation["category_id"]])


def _annotation_name(annotation: Any, index: int, ann_file: Path, names: Mapping[Any, str]) -> str:
    if not isinstance(annotation, dict) or not is_integer(annotation.get("id")):
        return f"{ann_file}: annotations[{index}]"
    return names.get(annotation["id"]) or f"{ann_file}: annotation {annotation['id']}"


def _parse_annotation(
    annotation: Any, label_of: dict[int, int], position: dict[int, int], category_ids: list[int]
) -> tuple[float, float, float, float] | str:
    """The annotation's bbox (x, y, w, h) if it can be trained on, else its first error (after its name)."""
    if not isinstance(annotation, dict):
        return f"is {annotation!r}, not an object; remove it"
    if not is_integer(annotation.get("id")):
        return f"has id {annotation.get('id')!r}; give every annotation a unique integer id"
    category = annotation.get("category_id")
    if not is_integer(category) or category not in label_of:
        return (
            f"has category_id {category!r}, not among the categories (ids {listed(category_ids)}); fix the "
            "annotation's category_id or add the category"
        )
    image_id = annotation.get("image_id")
    if not is_integer(image_id) or image_id not in position:
        return f"refers to image id {image_id!r}, not among the images; add the image or remove the annotation"
    box = annotation_xywh(annotation)
    if box is None:
        return f"has bbox {annotation.get('bbox')!r}, not [x, y, w, h] finite numbers; fix or remove it"
    return box


def place_box(
    box: tuple[float, float, float, float], sizes: Sequence[tuple[str, Size]]
) -> tuple[XYXY | None, str | None]:
    """(pixel xyxy clamped to each image size in turn, or None if it has no area left; the warning, if any,
    to follow the annotation's name).

    box: pixel x, y, w, h. sizes: (source, (width, height)) to clamp to; the warning names the first source the
    box extends beyond by more than BOUNDS_TOLERANCE, or in which it has no area.
    """
    x, y, w, h = box
    if not (w > 0 and h > 0):
        return None, f"degenerate bbox {list(box)} (width or height <= 0), it will be dropped; fix or remove it"
    x0, y0, x1, y1 = x, y, x + w, y + h
    first_source, tol = None, BOUNDS_TOLERANCE
    for source, (width, height) in sizes:
        outside = x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol
        x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height)
        empty = x1 <= x0 or y1 <= y0
        if first_source is None and (outside or empty):
            first_source = (source, width, height)
        if empty:
            break
    if first_source is None:
        return (x0, y0, x1, y1), None
    source, width, height = first_source
    fate = "dropped" if x1 <= x0 or y1 <= y0 else "clamped"
    warning = (
        f"bbox {list(box)} extends beyond the {width:g}x{height:g} image ({source} size), it will be {fate}; "
        "fix the box if the object lies inside the image"
    )
    return (None if fate == "dropped" else (x0, y0, x1, y1)), warning
