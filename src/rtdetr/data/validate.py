"""`check_data`: find everything wrong with a dataset folder of any layout (COCO, Roboflow, YOLO) before a long
training run, every problem of every split in one run; `check_dataset` does it for one COCO annotation file.

    reports = check_data("datasets/my_data", splits=("train", "val"))
    print(format_reports(reports, max_lines=None))    # every problem, not only the first 20 of each kind
    if not all(report.ok for report in reports): ...

Errors lose or corrupt training signal (fix them first): the annotation errors of `rules.py`, which the
loader refuses too (malformed JSON, duplicate ids, unknown category or image ids, malformed boxes); missing,
unreadable, truncated or oversized images and images whose stated size disagrees with the file, which the
loader fails on (or skips with `skip_bad_images`); and for YOLO datasets the data.yaml's problems (a missing
key, names/nc disagreement, a missing split folder), malformed label lines (field count, numbers, class
index, coordinates outside [0, 1]) and label files without an image. Warnings are what the loader repairs as
the official loader does: boxes sticking out of the image (clamped) and boxes without area (dropped).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

from .coco import find_split, read_coco_json
from .datasets import detect_layout
from .images import load_image
from .rules import is_image_entry, listed, read_annotations, size_mismatch, stated_size
from .yolo import DataYaml, find_data_yaml, read_data_yaml, read_yolo_split

_IMAGE_FIX = "replace the file or remove it from the dataset (training with skip_bad_images=True skips it)"


@dataclass
class DatasetReport:
    """What a check found in one split: human-readable `errors` and `warnings`, each naming the file and the
    image or annotation id (COCO) or the line (YOLO), and saying the fix. `ann_file` is the annotation file
    (YOLO: the data.yaml), `split` the split's name where the check was given one."""

    ann_file: Path
    image_dir: Path
    num_images: int = 0
    num_annotations: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    split: str = ""

    @property
    def ok(self) -> bool:
        """No errors (warnings are repaired by the loader)."""
        return not self.errors

    def summary(self, max_lines: int | None = 20) -> str:
        """Counts, then up to `max_lines` errors and warnings each (all of them if None)."""
        split = f" [{self.split}]" if self.split else ""
        lines = [
            f"{self.ann_file}{split} ({self.num_images} images, {self.num_annotations} annotations, images in "
            f"{self.image_dir}): {len(self.errors)} errors, {len(self.warnings)} warnings"
        ]
        for title, messages in (("error", self.errors), ("warning", self.warnings)):
            shown = messages if max_lines is None else messages[:max_lines]
            lines += [f"  {title}: {m}" for m in shown]
            if len(shown) < len(messages):
                lines.append(f"  ... and {len(messages) - len(shown)} more {title}s (print all with max_lines=None)")
        return "\n".join(lines)


def format_reports(reports: Sequence[DatasetReport], max_lines: int | None = 20) -> str:
    """Every report's summary (see `DatasetReport.summary`), then one verdict line."""
    errors = sum(len(r.errors) for r in reports)
    verdict = "dataset OK" if errors == 0 else f"{errors} errors: fix them before training"
    warnings = sum(len(r.warnings) for r in reports)
    return "\n".join([*(r.summary(max_lines) for r in reports), f"{verdict} ({warnings} warnings)"])


def check_data(
    data_dir: str | Path, splits: Sequence[str] = ("train", "val"), check_images: bool = True
) -> list[DatasetReport]:
    """One report per split of a dataset folder of any layout (`detect_layout`; a YOLO data.yaml also works).

    Never raises for a problem of the data: a missing folder, split or data.yaml is an error in the report.
    check_images: decode every image (slow: it finds truncated files); YOLO image headers are read anyway.
    """
    root = Path(data_dir)
    try:
        layout = detect_layout(root)
    except FileNotFoundError as error:
        return [DatasetReport(root, root, errors=[str(error)], split=split) for split in splits]
    if layout != "yolo":
        return [_check_coco_split(root, split, check_images) for split in splits]
    try:
        config = read_data_yaml(find_data_yaml(root))
    except (FileNotFoundError, ValueError) as error:
        return [DatasetReport(find_data_yaml(root), root, errors=[str(error)], split=split) for split in splits]
    return [check_yolo_split(config, split, check_images) for split in splits]


def _check_coco_split(root: Path, split: str, check_images: bool) -> DatasetReport:
    try:
        ann_file, image_dir = find_split(root, split)
    except FileNotFoundError as error:  # it lists the paths tried
        return DatasetReport(root, root, errors=[str(error)], split=split)
    report = check_dataset(ann_file, image_dir, check_images)
    report.split = split
    return report


def check_yolo_split(config: DataYaml, split: str, check_images: bool = True) -> DatasetReport:
    """Check a split of a parsed data.yaml: its and the label files' problems, then its COCO conversion with the
    same rules and image checks as a COCO file."""
    yolo = read_yolo_split(config, split)
    report = DatasetReport(yolo.ann_file, yolo.image_dir, split=split)
    report.errors += [*yolo.errors, *(f"{e}; {_IMAGE_FIX}" for e in yolo.unreadable.values())]
    # The stated sizes are the image headers': "file" size in the box warnings.
    _check_coco(yolo.coco, report, check_images, yolo.annotation_names, "file", skip_images=yolo.unreadable.keys())
    return report


def check_dataset(ann_file: str | Path, image_dir: str | Path, check_images: bool = True) -> DatasetReport:
    """Check a COCO annotation file and (with `check_images`, decoding every image) its image folder.

    Boxes are checked against the image size stated in the JSON and, when images are read, the size of the
    image as displayed (EXIF orientation applied), which is what the boxes must refer to.
    """
    report = DatasetReport(Path(ann_file), Path(image_dir))
    try:
        data = read_coco_json(ann_file)
    except (FileNotFoundError, ValueError) as error:
        report.errors.append(str(error))
        return report
    unsized = [im["id"] for im in data["images"] if is_image_entry(im) and stated_size(im) is None]
    if unsized:
        report.warnings.append(
            f"{report.ann_file}: no positive width/height for image ids {listed(unsized)}; boxes are checked "
            "against the image files only (add the sizes)"
        )
    _check_coco(data, report, check_images)
    return report


def _check_coco(
    data: dict[str, Any],
    report: DatasetReport,
    check_images: bool,
    names: Mapping[int, str] | None = None,
    stated_source: str = "JSON",
    skip_images: Collection[int] = (),
) -> None:
    """Add the problems of a COCO dict and its image files (except `skip_images`, already reported) to `report`."""
    images = [im for im in data["images"] if is_image_entry(im) and im["id"] not in skip_images]
    file_sizes = _check_image_files(images, report) if check_images else {}
    annotations = read_annotations(data, report.ann_file, names, file_sizes, stated_source)
    report.errors += annotations.errors
    report.warnings += annotations.warnings
    report.num_images = len(data["images"])
    report.num_annotations = len(data["annotations"]) if isinstance(data.get("annotations"), list) else 0


def _read_size(path: Path) -> tuple[int, int] | str:
    """(width, height) as displayed, or the error message naming the file."""
    try:
        return load_image(path).size  # a full decode: truncated files fail only here
    except (FileNotFoundError, ValueError) as error:
        return str(error)


def _check_image_files(images: list[dict], report: DatasetReport) -> dict[int, tuple[int, int]]:
    """Sizes of the readable images by id; records unreadable ones and sizes disagreeing with the stated ones."""
    paths = [report.image_dir / im["file_name"] for im in images]
    with ThreadPoolExecutor(max_workers=8) as pool:  # decoding releases the GIL
        results = list(pool.map(_read_size, paths))
    sizes: dict[int, tuple[int, int]] = {}
    for image, result in zip(images, results):
        if isinstance(result, str):
            report.errors.append(f"image id {image['id']}: {result}; {_IMAGE_FIX}")
            continue
        sizes.setdefault(image["id"], result)
        mismatch = size_mismatch(report.ann_file, image["id"], image["file_name"], stated_size(image), result)
        if mismatch is not None:
            report.errors.append(mismatch)
    return sizes
