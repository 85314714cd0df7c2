"""Broken and unusual data: corrupt, truncated and unusual image files, EXIF rotation, bad annotations,
malformed JSON. Each must give a clear message naming the file or annotation, or load correctly."""

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rtdetr.data.coco import CocoDetection
from rtdetr.data.synthetic import generate_coco_dataset
from rtdetr.data.transforms import train_transforms
from rtdetr.data.validate import check_dataset

CATEGORIES = [{"id": 1, "name": "thing"}]


def write_json(root: Path, files: dict[int, tuple[str, int, int]], annotations: list[dict]) -> Path:
    """`root/ann.json` for images {id: (file name, width, height)}; returns its path."""
    images = [{"id": i, "file_name": name, "width": w, "height": h} for i, (name, w, h) in files.items()]
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def jpeg_bytes(width: int = 32, height: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 50, 50)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def broken_images(tmp_path: Path) -> Path:
    """Images 1 good, 2 corrupt (not an image), 3 truncated, 4 good, 5 missing."""
    (tmp_path / "good1.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "corrupt.jpg").write_bytes(b"this is not a JPEG")
    (tmp_path / "truncated.jpg").write_bytes(jpeg_bytes()[:300])
    (tmp_path / "good4.jpg").write_bytes(jpeg_bytes())
    names = ["good1.jpg", "corrupt.jpg", "truncated.jpg", "good4.jpg", "missing.jpg"]
    return write_json(tmp_path, {i + 1: (name, 32, 24) for i, name in enumerate(names)}, [])


def test_corrupt_truncated_and_missing_images_raise_naming_the_file(broken_images):
    dataset = CocoDetection(broken_images, broken_images.parent)
    assert dataset[0][0].shape == (3, 24, 32)
    for index, name in [(1, "corrupt.jpg"), (2, "truncated.jpg")]:
        with pytest.raises(ValueError, match=f"cannot read image .*{name}"):
            dataset[index]
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        dataset[4]
    report = check_dataset(broken_images, broken_images.parent)
    assert not report.ok and len(report.errors) == 3
    for name in ("corrupt.jpg", "truncated.jpg", "missing.jpg"):
        assert any(name in e for e in report.errors), name
    assert "3 errors" in report.summary()


def test_skip_bad_images_returns_the_next_good_image_and_logs_once(broken_images, caplog):
    dataset = CocoDetection(broken_images, broken_images.parent, skip_bad_images=True)
    with caplog.at_level(logging.ERROR, logger="rtdetr.data.coco"):
        ids = [int(dataset[i][1]["image_id"]) for i in range(len(dataset))]
        ids_again = [int(dataset[i][1]["image_id"]) for i in range(len(dataset))]  # a second epoch
    assert ids == ids_again == [1, 4, 4, 4, 1]  # the missing last image wraps around to the first
    for name in ("corrupt.jpg", "truncated.jpg", "missing.jpg"):
        assert sum(name in r.getMessage() for r in caplog.records) == 1, name


def test_skip_bad_images_with_no_readable_image_raises(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 nope")
    dataset = CocoDetection(write_json(tmp_path, {1: ("bad.jpg", 8, 8)}, []), tmp_path, skip_bad_images=True)
    with pytest.raises(RuntimeError, match="none of the 1 images"):
        dataset[0]


def square_annotation(image_id: int) -> dict:
    return {"id": image_id, "image_id": image_id, "category_id": 1, "bbox": [8, 4, 10, 12], "iscrowd": 0}


def test_grayscale_rgba_and_16bit_pngs_load_as_rgb(tmp_path):
    """Each image is black with a bright square at x 8..18, y 4..16, where the annotation says."""
    gray = np.zeros((24, 32), np.uint8)
    gray[4:16, 8:18] = 255
    rgba = np.zeros((24, 32, 4), np.uint8)
    rgba[4:16, 8:18] = (255, 255, 255, 255)
    rgba[..., :3][rgba[..., 3] == 0] = 255  # white but fully transparent: must composite to black
    deep = gray.astype(np.uint16) * 257  # 16-bit: 65535 in the square
    files = {}
    for image_id, (name, array) in enumerate([("gray.png", gray), ("rgba.png", rgba), ("deep.png", deep)], 1):
        Image.fromarray(array).save(tmp_path / name)
        files[image_id] = (name, 32, 24)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # really 16-bit on disk
    ann_file = write_json(tmp_path, files, [square_annotation(i) for i in files])
    dataset = CocoDetection(ann_file, tmp_path)
    for index in range(3):
        image, target = dataset[index]
        assert image.shape == (3, 24, 32)
        assert image[:, 4:16, 8:18].min() > 0.99 and image[:, :4].max() < 0.01, files[index + 1][0]
        torch.testing.assert_close(target["boxes"], torch.tensor([[13 / 32, 10 / 24, 10 / 32, 12 / 24]]))
    assert check_dataset(ann_file, tmp_path).ok


def test_exif_rotated_jpeg_is_read_as_displayed(tmp_path):
    # Stored 60x40 with a bright block at x 10..20, y 5..15; orientation 6 means "rotate 90 degrees
    # clockwise to display": displayed 40x60, stored (x, y) -> displayed (39 - y, x), so the block is at
    # x 25..35, y 10..20. The annotation refers to the displayed image.
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[5:15, 10:20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", quality=100, exif=exif)
    annotation = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [25, 10, 10, 10], "iscrowd": 0}
    ann_file = write_json(tmp_path, {1: ("rotated.jpg", 40, 60)}, [annotation])
    image, target = CocoDetection(ann_file, tmp_path)[0]
    assert image.shape == (3, 60, 40) and target["orig_size"].tolist() == [40, 60]
    bright = torch.nonzero(image.mean(0) > 0.5)
    assert bright[:, 0].min() == 10 and bright[:, 0].max() == 19  # rows y
    assert bright[:, 1].min() == 25 and bright[:, 1].max() == 34  # columns x
    torch.testing.assert_close(target["boxes"], torch.tensor([[30 / 40, 15 / 60, 10 / 40, 10 / 60]]))
    assert check_dataset(ann_file, tmp_path).ok

    swapped = write_json(tmp_path, {1: ("rotated.jpg", 60, 40)}, [annotation])  # the stored size in the JSON
    assert any("before EXIF rotation" in e for e in check_dataset(swapped, tmp_path).errors)


@pytest.mark.parametrize("annotations", [[], None], ids=["empty list", "no annotations key"])
def test_images_without_annotations_are_negatives(tmp_path, annotations):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 32, "height": 24}], "categories": CATEGORIES}
    if annotations is not None:
        data["annotations"] = annotations
    (tmp_path / "ann.json").write_text(json.dumps(data))
    dataset = CocoDetection(tmp_path / "ann.json", tmp_path, train_transforms((32, 32), stop_epoch=None))
    for seed in range(5):  # IoU crop and sanitising must cope with no boxes
        torch.manual_seed(seed)
        image, target = dataset[0]
        assert image.shape == (3, 32, 32) and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_boxes_outside_the_image_are_clamped_or_dropped_with_one_warning(tmp_path, caplog):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(50, 40))
    annotations = [
        {"id": 7, "image_id": 1, "category_id": 1, "bbox": [40, 30, 20, 20]},  # partly outside: clamped
        {"id": 8, "image_id": 1, "category_id": 1, "bbox": [60, 10, 5, 5]},  # entirely outside: dropped
        {"id": 9, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5]},  # zero width: dropped
    ]
    ann_file = write_json(tmp_path, {1: ("a.jpg", 50, 40)}, annotations)
    with caplog.at_level(logging.WARNING, logger="rtdetr.data.coco"):
        dataset = CocoDetection(ann_file, tmp_path)
        targets = [dataset[0][1] for _ in range(3)]  # three epochs
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "annotation ids 8, 9" in warnings[0] and str(ann_file) in warnings[0]
    torch.testing.assert_close(targets[2]["boxes"], torch.tensor([[0.9, 0.875, 0.2, 0.25]]))  # xyxy 40,30,50,40

    report = check_dataset(ann_file, tmp_path)
    assert report.ok and len(report.warnings) == 3
    assert "annotation 7" in report.warnings[0] and "clamped" in report.warnings[0]
    assert "annotation 8" in report.warnings[1] and "dropped" in report.warnings[1]
    assert "annotation 9" in report.warnings[2] and "degenerate" in report.warnings[2]


def test_unknown_category_id_is_an_error_naming_annotation_and_category(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    annotations = [{"id": 5, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5]}]
    ann_file = write_json(tmp_path, {1: ("a.jpg", 32, 24)}, annotations)
    with pytest.raises(ValueError, match="annotation 5 has category_id 99"):
        CocoDetection(ann_file, tmp_path)
    report = check_dataset(ann_file, tmp_path)
    assert not report.ok and report.errors == [
        f"{ann_file}: annotation 5 has category_id 99, not among the categories (ids 1); fix the annotation's "
        "category_id or add the category"
    ]


def test_malformed_json_names_the_file_and_position(tmp_path):
    ann_file = tmp_path / "broken.json"
    ann_file.write_text('{"images": [\n  {"id": 1,, "file_name": "a.jpg"}\n]}')
    with pytest.raises(ValueError, match=r"malformed JSON in .*broken.json: .* line 2 column 12"):
        CocoDetection(ann_file, tmp_path)
    report = check_dataset(ann_file, tmp_path)
    assert not report.ok and "broken.json" in report.errors[0] and "line 2 column 12" in report.errors[0]


def test_check_dataset_finds_inconsistent_ids_and_sizes(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(32, 24))
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes(32, 24))
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 32, "height": 24},
            {"id": 2, "file_name": "b.jpg", "width": 64, "height": 24},  # wrong width
            {"id": 2, "file_name": "a.jpg", "width": 32, "height": 24},  # duplicate id
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 5, 5]},  # duplicate id
            {"id": 3, "image_id": 77, "category_id": 1, "bbox": [1, 1, 5, 5]},  # unknown image
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5]},  # malformed bbox
            {"id": 5, "image_id": 2, "category_id": 1, "bbox": [40, 1, 5, 5]},  # inside the JSON size, not the file
        ],
        "categories": CATEGORIES,
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    report = check_dataset(tmp_path / "ann.json", tmp_path)
    expected_errors = ["duplicate image ids 2", "is 64x24 in the JSON but 32x24 as read", "duplicate annotation ids 1",
                       "annotation 3 refers to image id 77", "annotation 4 has bbox [1, 1, 5]"]  # fmt: skip
    assert len(report.errors) == len(expected_errors)
    for expected in expected_errors:
        assert any(expected in e for e in report.errors), expected
    assert len(report.warnings) == 1 and "annotation 5" in report.warnings[0] and "(file size)" in report.warnings[0]
    with pytest.raises(ValueError, match="duplicate image ids 2"):
        CocoDetection(tmp_path / "ann.json", tmp_path)


def test_check_dataset_passes_a_clean_dataset(tmp_path):
    root = generate_coco_dataset(tmp_path, {"train": 6}, image_size=(48, 64))
    report = check_dataset(root / "annotations" / "instances_train.json", root / "train")
    assert report.ok and report.warnings == [] and report.num_images == 6
