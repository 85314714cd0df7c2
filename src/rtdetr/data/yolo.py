"""The YOLO (Ultralytics) layout, converted to an in-memory COCO dict so that `CocoDetection`, the annotation
rules (`rules.py`) and `CocoEvaluator` serve it unchanged.

    dataset/data.yaml         train: images/train   val: images/val   names: [cat, dog]   (optional path:, nc:)
    dataset/images/train/a.jpg
    dataset/labels/train/a.txt     one box per line: "class cx cy w h", coordinates normalised to [0, 1]

    dataset = open_yolo_split("dataset", "train", train_transforms((640, 640), stop_epoch=71))

As Ultralytics: a split is a folder of images (searched recursively), a .txt list of image paths, or a list of
those; the label file of an image is its path with the last `/images/` replaced by `/labels/` and the suffix
by `.txt`; a missing or empty label file makes the image a negative; `names` is a list or a dict {index: name};
a split path starting with `../` that does not exist is also tried without it (Roboflow exports). Unlike
Ultralytics, a relative `path` and relative lines of a .txt list are taken relative to the yaml's and the
list's folder (not the working directory), so a dataset folder can be moved.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .coco import CocoDetection, split_names
from .images import read_image_size
from .rules import is_integer, refusal

# Ultralytics' IMG_FORMATS that PIL reads without plugins.
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp")
COORDINATE_TOLERANCE = 1e-3  # normalised coordinates may overshoot [0, 1] by rounding


@dataclass
class DataYaml:
    """A parsed data.yaml: `file`; `root`, its `path` resolved (else its folder); `names`, the class names in
    index order (None if unusable); `entries`, the whole mapping; `errors`, each naming the file and the fix."""

    file: Path
    root: Path
    names: list[str] | None
    entries: dict[str, Any]
    errors: list[str]


@dataclass
class YoloSplit:
    """A split as a COCO dict: images with ids 1..M in sorted path order and width/height as displayed (EXIF
    orientation applied), annotations with ids 1..N (pixel bbox x, y, w, h, area, iscrowd 0), categories with
    ids 0..C-1 named by data.yaml. Image `file_name`s are relative to `image_dir`.

    ann_file: the data.yaml. annotation_names: annotation id -> "<label file> line <n>", for messages.
    errors: the data.yaml's and the split's problems (each naming the file and line): the loader refuses them.
    unreadable: image id -> why the image's header could not be read; it stays in `coco` without a size and
    the loader fails on it when it is read (or skips it), as on any bad image. found: whether the split exists.
    """

    ann_file: Path
    image_dir: Path
    coco: dict[str, Any]
    annotation_names: dict[int, str]
    errors: list[str]
    unreadable: dict[int, str]
    found: bool


def find_data_yaml(data: str | Path) -> Path:
    """The yaml file itself, or `data.yaml` in the folder `data`."""
    data = Path(data)
    return data if data.suffix in (".yaml", ".yml") else data / "data.yaml"


def open_yolo_split(
    data: str | Path, split: str, transforms: Callable | None = None, skip_bad_images: bool = False
) -> CocoDetection:
    """The split of a YOLO dataset (its folder or data.yaml) as a `CocoDetection` of its COCO dict.

    FileNotFoundError if the data.yaml or the split is missing; ValueError listing the data.yaml's and the label
    files' errors (each naming the file and line), the errors `check_data` reports.
    """
    yolo = read_yolo_split(read_data_yaml(find_data_yaml(data)), split)
    if not yolo.found:
        raise FileNotFoundError("\n".join(yolo.errors))
    if yolo.errors:
        raise ValueError(refusal(yolo.ann_file, yolo.errors))
    return CocoDetection(
        yolo.ann_file, yolo.image_dir, transforms, skip_bad_images, coco=yolo.coco,
        annotation_names=yolo.annotation_names,
    )  # fmt: skip


def read_data_yaml(file: str | Path) -> DataYaml:
    """Parse a data.yaml; FileNotFoundError if missing, ValueError (with line and column) if it is not YAML or
    not a mapping. Problems of its keys are collected in `errors`."""
    file = Path(file).absolute()
    try:
        entries = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"YOLO data.yaml not found: {file}") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"malformed YAML in {file}: {error.problem}{where}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {file}: {error}") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{file} is not a YOLO data.yaml: it needs a mapping with train, val and names")
    errors: list[str] = []
    return DataYaml(file, _root(file, entries, errors), _names(file, entries, errors), entries, errors)


def _root(file: Path, entries: dict[str, Any], errors: list[str]) -> Path:
    """The folder split paths are relative to: `path` (relative to the yaml's folder), else the yaml's folder."""
    if entries.get("path") is None:
        return file.parent
    root = file.parent / str(entries["path"])  # an absolute `path` stays itself
    if not root.is_dir():
        errors.append(f"{file}: path {entries['path']!r} is not a folder ({root}); fix it, relative to {file.parent}")
        return file.parent
    return root


def _names(file: Path, entries: dict[str, Any], errors: list[str]) -> list[str] | None:
    """The class names in index order, checked against `nc`; None (with an error) if unusable."""
    names = entries.get("names")
    if isinstance(names, dict):
        if set(names) != set(range(len(names))) or not all(is_integer(k) for k in names):
            errors.append(f"{file}: names keys {list(names)} are not the indices 0..{len(names) - 1}; number them so")
            return None
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        errors.append(f"{file}: no 'names' list or dict; add the class names, e.g. names: [cat, dog] (classes 0, 1)")
        return None
    nc = entries.get("nc")
    if nc is not None and (not is_integer(nc) or nc != len(names)):
        errors.append(f"{file}: nc is {nc!r} but names has {len(names)} entries; make them agree (or drop nc)")
    return [str(name) for name in names]


def read_yolo_split(config: DataYaml, split: str) -> YoloSplit:
    """`split` ('train', 'val', 'test'; 'valid' also finds 'val') of a parsed data.yaml as COCO (see YoloSplit),
    collecting every problem; image headers are read (8 threads) for the sizes."""
    errors = list(config.errors)
    sources = _split_sources(config, split, errors)
    images = _list_images(sources, errors)
    if sources and not images:
        errors.append(f"{config.file}: the {split} split has no images in {', '.join(map(str, sources))}; add them")
    errors += _orphan_labels(sources, images)
    image_dir = (sources[0] if sources[0].is_dir() else sources[0].parent) if sources else config.root
    coco, names, unreadable = _to_coco(images, image_dir, config, errors)
    return YoloSplit(config.file, image_dir, coco, names, errors, unreadable, found=bool(sources))


def _to_coco(
    images: list[Path], image_dir: Path, config: DataYaml, errors: list[str]
) -> tuple[dict[str, Any], dict[int, str], dict[int, str]]:
    """(COCO dict, annotation names, unreadable images) of the split's images and their label files (see
    YoloSplit); the label files' errors go to `errors`."""
    with ThreadPoolExecutor(max_workers=8) as pool:  # header reads wait on the disk
        sizes = list(pool.map(_size_or_error, images))
    categories = [{"id": i, "name": name} for i, name in enumerate(config.names or [])]
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": categories}
    names, unreadable = {}, {}
    for image_id, (path, size) in enumerate(zip(images, sizes), 1):
        coco["images"].append({"id": image_id, "file_name": os.path.relpath(path, image_dir)})
        rows = _read_labels(label_path(path), config, errors)  # also for unreadable images: all errors, one run
        if isinstance(size, str):
            unreadable[image_id] = size
            continue
        coco["images"][-1].update(width=size[0], height=size[1])
        if config.names is None:
            continue  # no categories to convert to; the missing names are an error already
        for line, label, box in rows:
            annotation_id = len(coco["annotations"]) + 1
            coco["annotations"].append(_annotation(annotation_id, image_id, label, box, size))
            names[annotation_id] = f"{label_path(path)} line {line}"
    return coco, names, unreadable


def _size_or_error(path: Path) -> tuple[int, int] | str:
    """(width, height) as displayed, or the error message naming the file."""
    try:
        return read_image_size(path)
    except (FileNotFoundError, ValueError) as error:  # they name the file
        return str(error)


def _annotation(annotation_id: int, image_id: int, label: int, box: list[float], size: tuple[int, int]) -> dict:
    """A COCO annotation of a normalised cx, cy, w, h box in an image of `size` (width, height): pixel x, y, w, h."""
    (cx, cy, w, h), (width, height) = box, size
    bbox = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
    return {"id": annotation_id, "image_id": image_id, "category_id": label, "bbox": bbox,
            "area": bbox[2] * bbox[3], "iscrowd": 0}  # fmt: skip


def _split_sources(config: DataYaml, split: str, errors: list[str]) -> list[Path]:
    """The existing folders and .txt lists of the split's yaml entry; errors for a missing key or path."""
    key = next((k for k in split_names(split) if k in config.entries), None)
    if key is None:
        errors.append(
            f"{config.file}: no '{split}' key; add {split}: <image folder or .txt list of images, relative to "
            f"{config.root}>"
        )
        return []
    values = config.entries[key] if isinstance(config.entries[key], list) else [config.entries[key]]
    sources = []
    for value in values:
        path = _resolve(config.root, value) if isinstance(value, str) else None
        if path is None:
            errors.append(
                f"{config.file}: {key}: {value!r} is not an existing folder or list ({config.root / str(value)}); "
                f"create the split folder or fix the path (relative to {config.root})"
            )
        else:
            sources.append(path)
    return sources


def _resolve(root: Path, value: str) -> Path | None:
    """`value` relative to `root` (absolute stays), or without a leading '../' (Roboflow exports), if it exists."""
    for candidate in (root / value, root / value[3:] if value.startswith("../") else None):
        if candidate is not None and candidate.exists():
            return candidate
    return None


def _list_images(sources: list[Path], errors: list[str]) -> list[Path]:
    """Every image of the split, each once, sorted: image files under the folders, the lines of the lists."""
    images = []
    for source in sources:
        if source.is_dir():
            images += [p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
            continue
        try:
            lines = source.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            errors.append(f"{source}: cannot read the image list ({error}); write one image path per line")
            continue
        images += [source.parent / line.strip() for line in lines if line.strip()]
    return sorted({Path(os.path.normpath(p)) for p in images})


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the image path with its last `/images/` replaced by `/labels/` and the suffix by `.txt`."""
    text, marker = str(image), f"{os.sep}images{os.sep}"
    if marker in text:
        head, tail = text.rsplit(marker, 1)
        text = f"{head}{os.sep}labels{os.sep}{tail}"
    return Path(text).with_suffix(".txt")


def _orphan_labels(sources: list[Path], images: list[Path]) -> list[str]:
    """Errors for label files of the split's folders that belong to no image (their boxes would never train).
    Lists are skipped: their label folders may hold other splits' labels."""
    expected = {label_path(p) for p in images}
    errors = []
    for folder in (s for s in sources if s.is_dir()):
        labels = label_path(folder / "x").parent  # the folder of the labels of the folder's images
        if labels == folder or not labels.is_dir():
            continue
        for label in sorted(set(labels.rglob("*.txt")) - expected):
            image = folder / label.relative_to(labels).with_suffix("")
            errors.append(
                f"{label}: label file without an image (no {image}{{{','.join(IMAGE_SUFFIXES)}}}); add the image "
                "or remove the label file"
            )
    return errors


def _read_labels(path: Path, config: DataYaml, errors: list[str]) -> list[tuple[int, int, list[float]]]:
    """(line number, class index, [cx, cy, w, h]) of each valid line of a label file (none if it is missing);
    an error naming the file and line for each other non-blank line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []  # a negative, as an empty file
    except (OSError, UnicodeDecodeError) as error:
        errors.append(f"{path}: cannot read the label file ({error}); write it as UTF-8 text")
        return []
    num_classes = None if config.names is None else len(config.names)
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parsed = _parse_line(line.split(), num_classes, config.file)
        if isinstance(parsed, str):
            errors.append(f"{path} line {number}: {parsed}")
        else:
            rows.append((number, *parsed))
    return rows


def _parse_line(fields: list[str], num_classes: int | None, data_yaml: Path) -> tuple[int, list[float]] | str:
    """(class index, [cx, cy, w, h]) of a label line's fields, or what is wrong with them and the fix."""
    if len(fields) != 5:
        polygon = " (a segmentation polygon? convert it to its box)" if len(fields) > 5 and len(fields) % 2 else ""
        return f"{len(fields)} fields, not 5 'class cx cy w h'{polygon}; fix the line"
    try:
        values = [float(field) for field in fields]
    except ValueError:
        return f"{' '.join(fields)!r} is not 5 numbers 'class cx cy w h'; fix the line"
    if not all(math.isfinite(v) for v in values):
        return f"{' '.join(fields)!r} has non-finite numbers; fix the line"
    label, box = values[0], values[1:]
    if not label.is_integer():
        return f"class {fields[0]} is not an integer class index; fix the line"
    if num_classes is not None and not 0 <= label < num_classes:
        return (
            f"class {int(label)} is out of range: {data_yaml} names {num_classes} classes (0..{num_classes - 1}); "
            "fix the label or add the class to names"
        )
    if not all(-COORDINATE_TOLERANCE <= v <= 1 + COORDINATE_TOLERANCE for v in box):
        return (
            f"coordinates {' '.join(fields[1:])} are outside [0, 1]; YOLO boxes are cx cy w h divided by the "
            "image width and height (pixel values must be divided by them)"
        )
    return int(label), box
