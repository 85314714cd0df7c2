"""check_data on COCO and YOLO datasets with many defects at once (each one named, in one run), on clean
datasets, on decompression bombs; and the loader agreeing with the check on every annotation rule."""

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import png_declaring
from PIL import Image

from rtdetr.data.coco import CocoDetection
from rtdetr.data.datasets import open_split
from rtdetr.data.images import load_image, read_image_size
from rtdetr.data.synthetic import generate_coco_dataset
from rtdetr.data.validate import check_data, check_dataset, format_reports

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, above 89 M pixels


def jpeg_bytes(width: int = 32, height: int = 24, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.new("RGB", (width, height), (200, 50, 50)).save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def save_png(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(path)


def messages_with(messages: list[str], *fragments: str) -> list[str]:
    return [m for m in messages if all(f in m for f in fragments)]


def write_defective_coco(root: Path) -> Path:
    """COCO layout: a train split with every kind of defect, a val split with malformed JSON, no test split."""
    images = root / "train"
    images.mkdir(parents=True)
    (images / "good.jpg").write_bytes(jpeg_bytes())
    (images / "corrupt.jpg").write_bytes(b"this is not a JPEG")
    (images / "truncated.jpg").write_bytes(jpeg_bytes()[:300])
    (images / "rotated.jpg").write_bytes(jpeg_bytes(60, 40, orientation=6))  # displayed 40x60
    save_png(images / "wrong_size.png", 32, 24)
    (images / "bomb.png").write_bytes(png_declaring(20000, 20000))  # over PIL's own hard limit
    (images / "big.png").write_bytes(png_declaring(12000, 12000))  # over MAX_IMAGE_PIXELS only
    entries = [("good.jpg", 32, 24), ("corrupt.jpg", 32, 24), ("truncated.jpg", 32, 24), ("missing.jpg", 32, 24),
               ("rotated.jpg", 60, 40), ("wrong_size.png", 64, 24), ("bomb.png", 20000, 20000),
               ("big.png", 12000, 12000)]  # fmt: skip
    data = {
        "images": [{"id": i, "file_name": n, "width": w, "height": h} for i, (n, w, h) in enumerate(entries, 1)]
        + [{"id": 1, "file_name": "good.jpg", "width": 32, "height": 24}, {"id": 9}],  # duplicate id; images[9]
        "categories": [{"id": 1, "name": "thing"}, {"id": 2}, {"id": 1, "name": "again"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 5, 5]},  # duplicate id
            {"id": 3, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5]},
            {"id": 4, "image_id": 77, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5]},
            {"id": 6, "image_id": 1, "category_id": 1, "bbox": [1, float("nan"), 5, 5]},  # NaN in the JSON
            {"image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]},  # annotations[6] has no id
            {"id": 8, "image_id": 1, "category_id": 1, "bbox": [1, 1, 0, 5]},  # degenerate: dropped
            {"id": 9, "image_id": 1, "category_id": 1, "bbox": [20, 10, 20, 20]},  # clamped to 32x24
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [40, 1, 5, 5]},  # outside: dropped
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [32, 1, 0.5, 5]},  # within tolerance, no area
            "oops",  # annotations[11]
            {"id": 13, "image_id": 1, "category_id": 1, "bbox": "x", "iscrowd": 1},
        ],
    }
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))
    (root / "val").mkdir()
    (root / "annotations" / "instances_val.json").write_text('{"images": [\n  {"id": 1,, "file_name": "a.jpg"}\n]}')
    return root


COCO_ERRORS = [  # (fragments, in the annotation file?) of each expected error
    (["categories[1] need an integer 'id' and a 'name'"], True),
    (["duplicate category ids 1"], True),
    (["images[9] need an integer 'id' and a 'file_name'"], True),
    (["duplicate image ids 1"], True),
    (["duplicate annotation ids 1"], True),
    (["annotation 3 has category_id 99", "add the category"], True),
    (["annotation 4 refers to image id 77", "add the image or remove the annotation"], True),
    (["annotation 5 has bbox [1, 1, 5]", "fix or remove it"], True),
    (["annotation 6 has bbox [1, nan, 5, 5]"], True),
    (["annotations[6] has id None", "unique integer id"], True),
    (["annotations[11] is 'oops', not an object"], True),
    (["annotation 13 has bbox 'x'"], True),
    (["image id 2", "corrupt.jpg", "replace the file or remove it"], False),
    (["image id 3", "truncated.jpg"], False),
    (["image id 4", "image not found", "missing.jpg", "skip_bad_images=True skips it"], False),
    (["image id 5 (rotated.jpg) is 60x40 in the JSON but 40x60 as read", "before EXIF rotation"], True),
    (["image id 6 (wrong_size.png) is 64x24 in the JSON but 32x24 as read", "fix its width/height"], True),
    (["image id 7", "bomb.png", "400000000 pixels", "Downscale the image"], False),
    (["image id 8", "big.png", "declares 12000x12000", "max_pixels", "Downscale the image"], False),
]
COCO_WARNINGS = [
    ["annotation 8: degenerate bbox", "dropped"],
    ["annotation 9: bbox [20.0, 10.0, 20.0, 20.0] extends beyond the 32x24 image (JSON size), it will be clamped"],
    ["annotation 10:", "it will be dropped"],
    ["annotation 11:", "it will be dropped"],  # the loader dropped it before, the check said nothing
]


def test_check_data_names_every_coco_defect_in_one_run(tmp_path):
    root = write_defective_coco(tmp_path / "coco")
    train, val, test = check_data(root, splits=("train", "val", "test"))
    ann_file = str(root / "annotations" / "instances_train.json")
    assert not train.ok and train.split == "train" and train.num_images == 10 and train.num_annotations == 13
    for fragments, in_ann_file in COCO_ERRORS:
        assert len(messages_with(train.errors, *fragments, *([ann_file] if in_ann_file else []))) == 1, fragments
    assert len(train.errors) == len(COCO_ERRORS)
    for fragments in COCO_WARNINGS:
        assert len(messages_with(train.warnings, ann_file, *fragments)) == 1, fragments
    assert len(train.warnings) == len(COCO_WARNINGS)
    assert not val.ok and messages_with(val.errors, "instances_val.json", "malformed JSON", "line 2 column 12")
    assert not test.ok and messages_with(test.errors, "no 'test' split", "instances_test.json")

    summary = format_reports([train, val, test], max_lines=None)
    assert all(m in summary for m in train.errors + train.warnings) and "more errors" not in summary
    assert "... and 3 more errors" in train.summary(max_lines=16) and f"{ann_file} [train]" in summary
    assert summary.endswith(f"{len(COCO_ERRORS) + 2} errors: fix them before training ({len(COCO_WARNINGS)} warnings)")


def test_the_loader_refuses_exactly_the_checks_annotation_errors(tmp_path):
    root = write_defective_coco(tmp_path / "coco")
    with pytest.raises(ValueError) as error:
        open_split(root, "train")
    message = str(error.value)
    report = check_dataset(root / "annotations" / "instances_train.json", root / "train", check_images=False)
    assert report.errors and all(e in message for e in report.errors)
    assert f"{len(report.errors)} annotation errors" in message
    assert "corrupt.jpg" not in message  # image files are read lazily: missing images fail (or are skipped) then


YOLO_LABELS = """0 0.5 0.5 0.5 0.5
0 0.5 0.5 0.5
0 a 0.5 0.1 0.1
1.5 0.5 0.5 0.1 0.1
7 0.5 0.5 0.1 0.1
-1 0.5 0.5 0.1 0.1
0 320 240 50 50
0 0.5 0.5 0 0.1
0 0.95 0.5 0.2 0.2
0 0.5 nan 0.1 0.1
0 0.1 0.1 0.2 0.1 0.3 0.3
2 1.2 0.5 0.1 0.1
"""
YOLO_LINE_ERRORS = {  # line of good.txt -> fragments of its error
    2: ["4 fields, not 5 'class cx cy w h'"],
    3: ["'0 a 0.5 0.1 0.1' is not 5 numbers"],
    4: ["class 1.5 is not an integer class index"],
    5: ["class 7 is out of range", "names 3 classes (0..2)", "add the class to names"],
    6: ["class -1 is out of range"],
    7: ["coordinates 320 240 50 50 are outside [0, 1]", "divided by the image width and height"],
    10: ["has non-finite numbers"],
    11: ["7 fields", "segmentation polygon"],
    12: ["coordinates 1.2 0.5 0.1 0.1 are outside [0, 1]"],
}
YOLO_LINE_WARNINGS = {8: ["degenerate bbox", "it will be dropped"], 9: ["40x20 image (file size), it will be clamped"]}


def write_defective_yolo(root: Path) -> Path:
    images, labels = root / "images" / "train", root / "labels" / "train"
    save_png(images / "good.png", 40, 20)
    save_png(images / "empty.png", 16, 16)  # an empty label file: a negative, no problem
    save_png(images / "nolabel.png", 16, 16)  # no label file: a negative, no problem
    (images / "corrupt.png").write_bytes(b"\x89PNG not really")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(images / "truncated.jpg")
    jpeg = (images / "truncated.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # the header reads, the pixels do not decode
    (images / "bomb.png").write_bytes(png_declaring(20000, 20000))
    labels.mkdir(parents=True)
    (labels / "good.txt").write_text(YOLO_LABELS)
    (labels / "empty.txt").write_text("")
    for name in ("corrupt", "truncated", "bomb", "ghost"):  # ghost.txt: a label file without an image
        (labels / f"{name}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/missing_val\nnc: 4\nnames: [a, b, c]\n")
    return root


def test_check_data_names_every_yolo_defect_in_one_run(tmp_path):
    root = write_defective_yolo(tmp_path / "yolo")
    train, val, test = check_data(root, splits=("train", "val", "test"))
    data_yaml, labels = str(root / "data.yaml"), root / "labels" / "train"
    nc_error = ["nc is 4 but names has 3 entries", "make them agree"]
    for report in (train, val, test):  # the data.yaml's errors belong to every split: the loader refuses each
        assert not report.ok and len(messages_with(report.errors, data_yaml, *nc_error)) == 1
    for line, fragments in YOLO_LINE_ERRORS.items():
        assert len(messages_with(train.errors, f"{labels / 'good.txt'} line {line}:", *fragments)) == 1, line
    for line, fragments in YOLO_LINE_WARNINGS.items():
        assert len(messages_with(train.warnings, f"{labels / 'good.txt'} line {line}:", *fragments)) == 1, line
    others = [
        [str(labels / "ghost.txt"), "label file without an image", "add the image or remove the label file"],
        ["corrupt.png", "cannot read image", "replace the file or remove it"],
        ["image id 6:", "truncated.jpg", "cannot read image", "replace the file or remove it"],  # found decoding
        ["bomb.png", "400000000 pixels", "Downscale the image"],
    ]
    for fragments in others:
        assert len(messages_with(train.errors, *fragments)) == 1, fragments
    assert len(train.errors) == 1 + len(YOLO_LINE_ERRORS) + len(others)
    assert len(train.warnings) == len(YOLO_LINE_WARNINGS)
    assert train.num_images == 6 and train.num_annotations == 4  # good.png lines 1, 8, 9 and truncated.jpg's
    assert messages_with(val.errors, data_yaml, "'images/missing_val' is not an existing folder", "create the split")
    assert messages_with(test.errors, data_yaml, "no 'test' key")
    assert len(val.errors) == len(test.errors) == 2

    with pytest.raises(ValueError) as error:  # the loader refuses the same errors
        open_split(root, "train")
    assert all(f"{labels / 'good.txt'} line {line}:" in str(error.value) for line in YOLO_LINE_ERRORS)
    with pytest.raises(FileNotFoundError, match="missing_val"):
        open_split(root, "val")


def test_yolo_split_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "data.yaml").write_text("train: images/val\nval: images/val\nnames: [a]\n")
    report = check_data(tmp_path, splits=("val",))[0]
    folder = tmp_path / "images" / "val"
    assert report.errors == [f"{tmp_path / 'data.yaml'}: the val split has no images in {folder}; add them"]


def test_malformed_data_yaml_names_line_and_column(tmp_path):
    (tmp_path / "data.yaml").write_text("train: images/train\nnames: [a, b\nval: x\n")
    reports = check_data(tmp_path)
    assert len(reports) == 2 and not any(r.ok for r in reports)
    assert "malformed YAML in" in reports[0].errors[0] and "data.yaml" in reports[0].errors[0]
    assert "line 3 column" in reports[0].errors[0]
    with pytest.raises(ValueError, match="malformed YAML"):
        open_split(tmp_path, "train")


def test_clean_datasets_are_ok(tmp_path):
    coco = generate_coco_dataset(tmp_path / "coco", {"train": 3, "val": 2}, image_size=(48, 64))
    yolo = tmp_path / "yolo"
    for split, stems in (("train", ["a", "b"]), ("val", ["c"])):
        for stem in stems:
            save_png(yolo / "images" / split / f"{stem}.png", 40, 30)
            (yolo / "labels" / split).mkdir(parents=True, exist_ok=True)
            (yolo / "labels" / split / f"{stem}.txt").write_text("0 0.5 0.5 0.5 0.5\n1 0.25 0.25 0.1 0.1\n")
    (yolo / "data.yaml").write_text("train: images/train\nval: images/val\nnames: {0: cat, 1: dog}\n")
    for root, counts in ((coco, [3, 2]), (yolo, [2, 1])):
        reports = check_data(root)
        assert [r.num_images for r in reports] == counts
        assert all(r.ok and r.errors == [] and r.warnings == [] for r in reports), format_reports(reports)
        assert format_reports(reports).endswith("dataset OK (0 warnings)")


def test_check_data_of_a_folder_in_no_layout_reports_instead_of_raising(tmp_path):
    reports = check_data(tmp_path / "missing")
    assert [r.ok for r in reports] == [False, False] and "dataset folder not found" in reports[0].errors[0]


def test_decompression_bombs_raise_value_error_naming_file_and_size(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_declaring(20000, 20000))
    (tmp_path / "big.png").write_bytes(png_declaring(12000, 12000))
    save_png(tmp_path / "small.png", 16, 12)
    for read in (load_image, read_image_size):
        with pytest.raises(ValueError, match=r"bomb\.png.*400000000 pixels"):
            read(tmp_path / "bomb.png")
        with pytest.raises(ValueError, match=r"big\.png: its header declares 12000x12000 = 144000000 pixels"):
            read(tmp_path / "big.png")
        with pytest.raises(ValueError, match=r"small\.png: its header declares 16x12 = 192 pixels, .*max_pixels=100"):
            read(tmp_path / "small.png", max_pixels=100)
    assert load_image(tmp_path / "small.png", max_pixels=192).size == read_image_size(tmp_path / "small.png")


# The rules on which the loader and the check used to disagree: each is now an error of both (the loader raises
# with the check's message) or a warning of the check that the loader repairs.
RULE_ERRORS = {
    "orphan annotation (the loader ignored it)": (
        lambda d: d["annotations"].append({"id": 2, "image_id": 5, "category_id": 1, "bbox": [1, 1, 2, 2]}),
        "annotation 2 refers to image id 5",
    ),
    "duplicate annotation id (the loader accepted it)": (
        lambda d: d["annotations"].append({"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}),
        "duplicate annotation ids 1",
    ),
    "duplicate category id (the loader took the last name)": (
        lambda d: d["categories"].append({"id": 1, "name": "other"}),
        "duplicate category ids 1",
    ),
    "malformed crowd bbox (the loader skipped crowds unchecked)": (
        lambda d: d["annotations"].append({"id": 2, "image_id": 1, "category_id": 1, "bbox": [1], "iscrowd": 1}),
        "annotation 2 has bbox [1]",
    ),
    "category without a name (the loader crashed with KeyError)": (
        lambda d: d["categories"].append({"id": 2}),
        "categories[1] need an integer 'id' and a 'name'",
    ),
    "annotation not an object (the loader crashed with AttributeError)": (
        lambda d: d["annotations"].append([1, 2]),
        "annotations[1] is [1, 2], not an object",
    ),
    "string image id (the loader crashed in int())": (
        lambda d: d["images"].append({"id": "x", "file_name": "a.jpg"}),
        "images[1] need an integer 'id'",
    ),
    "bool category id (the loader took True for 1)": (
        lambda d: d["annotations"].append({"id": 2, "image_id": 1, "category_id": True, "bbox": [1, 1, 2, 2]}),
        "annotation 2 has category_id True",
    ),
}


def write_one_image(root: Path, change=None) -> Path:
    """A clean file: image 1 a.jpg 32x24, category 1, annotation 1; `change` edits the dict first."""
    (root / "a.jpg").write_bytes(jpeg_bytes())
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 32, "height": 24}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}],
    }
    if change is not None:
        change(data)
    (root / "ann.json").write_text(json.dumps(data))
    return root / "ann.json"


@pytest.mark.parametrize("change, fragment", RULE_ERRORS.values(), ids=RULE_ERRORS.keys())
def test_loader_and_check_share_the_error_rules(tmp_path, change, fragment):
    ann_file = write_one_image(tmp_path, change)
    report = check_dataset(ann_file, tmp_path)
    assert not report.ok and len(report.errors) == 1
    assert fragment in report.errors[0] and str(ann_file) in report.errors[0]
    with pytest.raises(ValueError) as error:
        CocoDetection(ann_file, tmp_path)
    assert report.errors[0] in str(error.value)


def test_box_without_area_inside_the_tolerance_is_dropped_and_reported(tmp_path, caplog):
    extra = {"id": 2, "image_id": 1, "category_id": 1, "bbox": [32, 1, 0.5, 5]}  # starts at the right edge
    ann_file = write_one_image(tmp_path, lambda d: d["annotations"].append(extra))
    report = check_dataset(ann_file, tmp_path)
    assert report.ok and len(report.warnings) == 1 and "annotation 2:" in report.warnings[0]
    assert "dropped" in report.warnings[0]
    with caplog.at_level(logging.WARNING, logger="rtdetr.data.coco"):
        dataset = CocoDetection(ann_file, tmp_path)
    assert len(dataset[0][1]["boxes"]) == 1 and "annotation ids 2" in caplog.text


def test_zero_stated_width_means_unsized_not_every_box_dropped(tmp_path):
    ann_file = write_one_image(tmp_path, lambda d: d["images"][0].update(width=0))
    report = check_dataset(ann_file, tmp_path)
    assert report.ok and len(report.warnings) == 1 and "no positive width/height for image ids 1" in report.warnings[0]
    assert len(CocoDetection(ann_file, tmp_path)[0][1]["boxes"]) == 1  # before: clamped to width 0 and dropped


def test_loader_refuses_an_image_whose_size_is_not_the_stated_one(tmp_path):
    ann_file = write_one_image(tmp_path, lambda d: d["images"][0].update(width=64))
    report = check_dataset(ann_file, tmp_path)
    assert not report.ok and "is 64x24 in the JSON but 32x24 as read" in report.errors[0]
    with pytest.raises(ValueError, match="is 64x24 in the JSON but 32x24 as read"):
        CocoDetection(ann_file, tmp_path)[0]  # before: trained with boxes meant for another size
    with pytest.raises(RuntimeError, match="none of the 1 images"):
        CocoDetection(ann_file, tmp_path, skip_bad_images=True)[0]  # skipped as any bad image
