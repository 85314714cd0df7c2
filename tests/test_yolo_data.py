"""YOLO-layout datasets against hand-written COCO twins; detect_layout / open_split over every layout; the
evaluator on a YOLO split's COCO dict."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rtdetr.data.coco import CocoDetection
from rtdetr.data.datasets import detect_layout, open_split
from rtdetr.data.images import load_image, read_image_size
from rtdetr.data.synthetic import generate_coco_dataset
from rtdetr.data.yolo import label_path
from rtdetr.engine.evaluator import CocoEvaluator
from rtdetr.postprocess import Detections

NAMES = ["cat", "dog", "bird"]
ROTATE_90 = 6  # EXIF orientation: rotate 90 degrees clockwise to display (width <-> height)
ROTATE_270 = 8

# Per train image (path under images/train): stored (width, height), EXIF orientation, label file text (None:
# no label file), and the COCO twin's boxes by hand: (category id, pixel x, y, w, h in the displayed image).
TRAIN = {
    "a.png": ((64, 48), None, "0 0.5 0.5 0.25 0.5\n2 0.125 0.25 0.25 0.5\n", [(0, 24, 12, 16, 24), (2, 0, 0, 16, 24)]),
    "b.jpg": ((40, 30), None, "1 0.75 0.5 0.5 0.2", [(1, 20, 12, 20, 6)]),
    "c.png": ((32, 32), None, "", []),  # an empty label file: a negative
    "d.png": ((32, 32), None, None, []),  # no label file: a negative
    # Stored 30x20, displayed 20x30 (PNG keeps its EXIF in an eXIf chunk): cx 10, cy 15, w 10, h 15.
    "p.png": ((30, 20), ROTATE_270, "2 0.5 0.5 0.5 0.5\n", [(2, 5, 7.5, 10, 15)]),
    # Stored 60x40, displayed 40x60: cx 0.5 * 40 = 20, cy 0.25 * 60 = 15, w 20, h 6.
    "r.jpg": ((60, 40), ROTATE_90, "0 0.5 0.25 0.5 0.1\n", [(0, 10, 12, 20, 6)]),
    "sub/e.png": ((48, 32), None, "1 0.25 0.5 0.5 1.0\n\n", [(1, 0, 0, 24, 32)]),  # a subfolder; a blank line
}
VAL = {"v.png": ((50, 40), None, "2 0.5 0.5 0.4 0.5\n", [(2, 15, 10, 20, 20)])}
YAML_NAMES = {
    "list": "names: [cat, dog, bird]\n",
    "dict": "names:\n  2: bird\n  0: cat\n  1: dog\n",  # out of order: the index decides
}


def save_image(path: Path, size: tuple[int, int], orientation: int | None, seed: int) -> None:
    """Noise of `size` (stored width, height), with an EXIF orientation if given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif)


def write_split(root: Path, split: str, files: dict) -> None:
    for seed, (name, (size, orientation, label, _)) in enumerate(files.items()):
        save_image(root / "images" / split / name, size, orientation, seed)
        if label is not None:
            (root / "labels" / split / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / name).with_suffix(".txt").write_text(label)


def write_yolo(root: Path, names: str = YAML_NAMES["list"], val: str = "images/val") -> Path:
    write_split(root, "train", TRAIN)
    write_split(root, "val", VAL)
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: {val}\nnc: 3\n{names}")
    return root


def write_twin(path: Path, files: dict) -> Path:
    """The hand-written COCO file of `files`: image ids 1.. in sorted path order, displayed sizes."""
    images, annotations = [], []
    for image_id, name in enumerate(sorted(files), 1):
        (width, height), orientation, _, boxes = files[name]
        if orientation in (ROTATE_90, ROTATE_270):
            width, height = height, width
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for category, *bbox in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})  # fmt: skip
    categories = [{"id": i, "name": name} for i, name in enumerate(NAMES)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def assert_same_items(dataset: CocoDetection, twin: CocoDetection) -> None:
    assert len(dataset) == len(twin)
    for index in range(len(twin)):
        image, target = dataset[index]
        twin_image, twin_target = twin[index]
        torch.testing.assert_close(image, twin_image, rtol=0, atol=0)
        torch.testing.assert_close(target["boxes"], twin_target["boxes"])
        for key in ("labels", "image_id", "orig_size"):
            assert torch.equal(target[key], twin_target[key]), (index, key)


@pytest.mark.parametrize("names", YAML_NAMES.values(), ids=YAML_NAMES.keys())
def test_yolo_split_gives_the_targets_of_its_coco_twin(tmp_path, names):
    root = write_yolo(tmp_path / "yolo", names)
    for split, files in (("train", TRAIN), ("val", VAL)):
        dataset = open_split(root, split)
        twin = CocoDetection(write_twin(tmp_path / f"{split}.json", files), root / "images" / split)
        assert dataset.class_names == NAMES and dataset.category_ids == [0, 1, 2]
        assert dataset.ann_file == (root / "data.yaml").absolute()
        assert_same_items(dataset, twin)
    counts = [len(open_split(root, "train")[i][1]["labels"]) for i in range(len(TRAIN))]
    assert counts == [2, 1, 0, 0, 1, 1, 1]  # a, b, c (empty label file), d (none), p, r, sub/e


def test_yolo_coco_dict_matches_the_twin_and_reads_displayed_sizes(tmp_path):
    root = write_yolo(tmp_path / "yolo")
    coco = open_split(root, "train").coco
    twin = json.loads(write_twin(tmp_path / "twin.json", TRAIN).read_text())
    assert coco["categories"] == twin["categories"]
    assert coco["images"] == twin["images"]  # width/height as displayed, from the headers
    assert len(coco["annotations"]) == len(twin["annotations"])
    for ours, theirs in zip(coco["annotations"], twin["annotations"]):
        assert ours["bbox"] == pytest.approx(theirs["bbox"]) and ours["area"] == pytest.approx(theirs["area"])
        assert {k: ours[k] for k in ("id", "image_id", "category_id", "iscrowd")} == {
            k: theirs[k] for k in ("id", "image_id", "category_id", "iscrowd")
        }
    for name in ("p.png", "r.jpg", "a.png"):
        path = root / "images" / "train" / name
        assert read_image_size(path) == load_image(path).size


def test_txt_list_split_and_roboflow_yolo_export(tmp_path):
    root = write_yolo(tmp_path / "yolo", val="val.txt")
    (root / "val.txt").write_text("./images/val/v.png\n")  # Ultralytics' lists: lines relative to the list
    twin = CocoDetection(write_twin(tmp_path / "val.json", VAL), root / "images" / "val")
    assert_same_items(open_split(root, "val"), twin)

    # Roboflow's YOLO export: <split>/images, <split>/labels, and '../' paths in data.yaml.
    export = tmp_path / "export"
    save_image(export / "valid" / "images" / "v.png", (50, 40), None, 0)
    (export / "valid" / "labels").mkdir()
    (export / "valid" / "labels" / "v.txt").write_text(VAL["v.png"][2])
    (export / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 3\nnames: [cat, dog, bird]\n")
    assert_same_items(open_split(export, "val"), twin)


def test_label_path_replaces_the_last_images_folder():
    assert label_path(Path("/d/images/train/a.b.jpg")) == Path("/d/labels/train/a.b.txt")
    assert label_path(Path("/images/d/images/x/y.png")) == Path("/images/d/labels/x/y.txt")
    assert label_path(Path("/d/train/y.png")) == Path("/d/train/y.txt")  # no images folder: next to the image


def test_detect_layout_and_open_split_for_every_layout(tmp_path):
    coco = generate_coco_dataset(tmp_path / "coco", {"train": 2, "val": 1}, image_size=(32, 32))
    roboflow = tmp_path / "roboflow"
    for split, folder in (("train", "train"), ("val", "valid")):
        shutil.copytree(coco / split, roboflow / folder)
        shutil.copy(coco / "annotations" / f"instances_{split}.json", roboflow / folder / "_annotations.coco.json")
    yolo = write_yolo(tmp_path / "yolo")
    assert detect_layout(coco) == "coco"
    assert detect_layout(roboflow) == "roboflow"
    assert detect_layout(yolo) == "yolo" and detect_layout(yolo / "data.yaml") == "yolo"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="data.yaml"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        detect_layout(tmp_path / "missing")
    for split in ("train", "val"):
        assert_same_items(open_split(roboflow, split), open_split(coco, split))
    assert len(open_split(yolo / "data.yaml", "val")) == 1
    with pytest.raises(FileNotFoundError, match="no 'test' key"):
        open_split(yolo, "test")


def twin_detections(files: dict, shift: float = 0.0) -> list[Detections]:
    """Per image (sorted path order), the twin's hand-written boxes as detections (pixel xyxy, score 1),
    moved right by `shift` times their width."""
    detections = []
    for name in sorted(files):
        boxes = [[x + shift * w, y, x + w + shift * w, y + h] for _, x, y, w, h in files[name][3]]
        labels = [category for category, *_ in files[name][3]]
        detections.append(Detections(torch.tensor(boxes).reshape(-1, 4), torch.ones(len(labels)),
                                     torch.tensor(labels, dtype=torch.int64), [NAMES[c] for c in labels]))  # fmt: skip
    return detections


def test_evaluator_on_the_yolo_dict_scores_perfect_detections_one(tmp_path):
    dataset = open_split(write_yolo(tmp_path / "yolo"), "train")
    evaluator = CocoEvaluator(dataset.coco, dataset.class_names)
    evaluator.update(dataset.image_ids, twin_detections(TRAIN))
    summary = evaluator.summarize()
    assert summary["AP"] == pytest.approx(1.0) and summary["AP50"] == pytest.approx(1.0)
    assert summary["per_class"] == pytest.approx({"cat": 1.0, "dog": 1.0, "bird": 1.0})

    without_area = {**dataset.coco, "annotations": [{**a, "area": None} for a in dataset.coco["annotations"]]}
    for annotation in without_area["annotations"]:
        del annotation["area"]
    CocoEvaluator(without_area)
    assert all("area" not in a for a in without_area["annotations"])  # a dict is indexed, not changed

    shifted = CocoEvaluator(dataset.coco, dataset.class_names)
    shifted.update(dataset.image_ids, twin_detections(TRAIN, shift=0.5))  # IoU 1/3: misses at every threshold
    assert shifted.summarize()["AP"] == pytest.approx(0.0)
