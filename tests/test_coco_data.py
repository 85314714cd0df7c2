"""CocoDetection, find_split, BatchCollator and the train/eval transforms on hand-made and synthetic data."""

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from torchvision import tv_tensors
from torchvision.transforms import v2

from rtdetr.data.coco import BatchCollator, CocoDetection, find_split, pack_targets
from rtdetr.data.synthetic import generate_coco_dataset
from rtdetr.data.transforms import eval_transforms, train_transforms
from rtdetr.ops.boxes import box_xyxy_to_cxcywh


def write_coco(root: Path, images: dict[int, Image.Image], annotations: list[dict], categories: list[dict]) -> Path:
    """Save `images` (by id) as PNGs in `root` and the annotation file `root/ann.json`; returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for image_id, image in images.items():
        image.save(root / f"{image_id}.png")
        entries.append({"id": image_id, "file_name": f"{image_id}.png", "width": image.width, "height": image.height})
    for k, annotation in enumerate(annotations):
        annotation.setdefault("id", k + 1)
        annotation.setdefault("iscrowd", 0)
    path = root / "ann.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return path


def test_labels_follow_the_files_own_sparse_category_ids(tmp_path):
    categories = [{"id": 17, "name": "dog"}, {"id": 3, "name": "cat"}]  # sparse and out of order
    annotations = [
        {"image_id": 1, "category_id": 17, "bbox": [0, 0, 10, 10]},
        {"image_id": 1, "category_id": 3, "bbox": [20, 20, 10, 10]},
    ]
    ann_file = write_coco(tmp_path, {1: Image.new("RGB", (40, 40))}, annotations, categories)
    dataset = CocoDetection(ann_file, tmp_path)
    assert dataset.class_names == ["cat", "dog"] and dataset.category_ids == [3, 17]
    labels = dataset[0][1]["labels"]
    assert labels.dtype == torch.int64 and labels.tolist() == [1, 0]
    assert [dataset.category_ids[i] for i in labels] == [17, 3]  # and back to the file's ids


def test_crowd_boxes_dropped_and_images_without_boxes_kept(tmp_path):
    images = {i: Image.new("RGB", (40, 30)) for i in (1, 2, 3)}
    annotations = [
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]},
        {"image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "iscrowd": 1},
        {"image_id": 3, "category_id": 1, "bbox": [5, 5, 20, 20], "iscrowd": 1},  # only a crowd: a negative
    ]
    dataset = CocoDetection(write_coco(tmp_path, images, annotations, [{"id": 1, "name": "a"}]), tmp_path)
    assert len(dataset) == 3
    targets = [dataset[i][1] for i in range(3)]
    assert [len(t["labels"]) for t in targets] == [1, 0, 0]
    assert targets[1]["boxes"].shape == (0, 4) and targets[2]["boxes"].shape == (0, 4)


def test_target_boxes_normalized_cxcywh_by_value(tmp_path):
    annotations = [
        {"image_id": 42, "category_id": 5, "bbox": [10, 20, 30, 40]},
        {"image_id": 42, "category_id": 5, "bbox": [90, 190, 20, 20]},  # sticks out: clamped to 100x200
    ]
    ann_file = write_coco(tmp_path, {42: Image.new("RGB", (100, 200))}, annotations, [{"id": 5, "name": "a"}])
    image, target = CocoDetection(ann_file, tmp_path)[0]
    assert image.shape == (3, 200, 100) and image.dtype == torch.float32
    # xyxy 10,20,40,60 -> cx 25/100, cy 40/200, w 30/100, h 40/200; the second: xyxy 90,190,100,200
    expected = torch.tensor([[0.25, 0.2, 0.3, 0.2], [0.95, 0.975, 0.1, 0.05]])
    torch.testing.assert_close(target["boxes"], expected)
    assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0 and int(target["image_id"]) == 42
    assert target["orig_size"].tolist() == [100, 200]  # (width, height)
    resized_image, resized = CocoDetection(ann_file, tmp_path, eval_transforms((64, 48)))[0]
    assert resized_image.shape == (3, 64, 48)
    torch.testing.assert_close(resized["boxes"], expected)  # normalised: unchanged by the resize


def test_find_split_coco_layouts(tmp_path):
    root = generate_coco_dataset(tmp_path / "coco", {"train": 2, "val": 1}, image_size=(32, 32))
    assert find_split(root, "train") == (root / "annotations" / "instances_train.json", root / "train")
    assert find_split(root, "val") == (root / "annotations" / "instances_val.json", root / "val")

    coco2017 = tmp_path / "coco2017"
    (coco2017 / "annotations").mkdir(parents=True)
    (coco2017 / "annotations" / "instances_val2017.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no image folder"):
        find_split(coco2017, "val")
    (coco2017 / "images" / "val2017").mkdir(parents=True)
    expected = (coco2017 / "annotations" / "instances_val2017.json", coco2017 / "images" / "val2017")
    assert find_split(coco2017, "val") == expected


def test_find_split_roboflow_layout_and_error_listing_tried_paths(tmp_path):
    for split in ("train", "valid"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "_annotations.coco.json").write_text("{}")
    assert find_split(tmp_path, "train") == (tmp_path / "train" / "_annotations.coco.json", tmp_path / "train")
    assert find_split(tmp_path, "val") == (tmp_path / "valid" / "_annotations.coco.json", tmp_path / "valid")
    with pytest.raises(FileNotFoundError) as error:
        find_split(tmp_path, "test")
    message = str(error.value)
    tried = ["annotations/instances_test.json", "annotations/instances_test2017.json", "test/_annotations.coco.json"]
    assert all(str(tmp_path / path) in message for path in tried)
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        find_split(tmp_path / "missing", "train")


def test_batch_collator_multiscale_until_stop_epoch():
    batch = [(torch.rand(3, 40, 40), {"boxes": torch.rand(2, 4)}) for _ in range(2)]
    collator = BatchCollator(multiscale_sizes=[32, 48], stop_epoch=3)
    random.seed(0)
    sizes = set()
    for _ in range(20):
        images, targets = collator(batch)
        assert images.shape[:2] == (2, 3) and images.shape[2] == images.shape[3]
        torch.testing.assert_close(targets[0]["boxes"], batch[0][1]["boxes"], rtol=0, atol=0)  # normalised: unchanged
        sizes.add(images.shape[-1])
    assert sizes == {32, 48}
    collator.set_epoch(3)
    assert all(collator(batch)[0].shape == (2, 3, 40, 40) for _ in range(10))
    torch.testing.assert_close(collator(batch)[0][1], batch[1][0])
    assert BatchCollator()(batch)[0].shape == (2, 3, 40, 40)


def test_pack_targets_views_of_one_storage_per_key():
    targets = [
        {"boxes": torch.rand(n, 4), "labels": torch.arange(n), "image_id": torch.tensor(i)}
        for i, n in enumerate([2, 0, 3])
    ]
    packed = pack_targets(targets)
    for key in ("boxes", "labels", "image_id"):
        for before, after in zip(targets, packed):
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
        pointers = {t[key].untyped_storage().data_ptr() for t in packed}
        assert len(pointers) == 1  # one storage: one file descriptor per key through a DataLoader worker
    assert pack_targets([]) == []


def bright_region(image: torch.Tensor) -> list[int]:
    """Pixel xyxy of the pixels brighter than halfway between the darkest and the brightest."""
    gray = image.mean(0)
    ys, xs = torch.nonzero(gray > (gray.max() + gray.min()) / 2, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_train_transforms_keep_the_box_on_the_object(tmp_path):
    image = Image.new("RGB", (160, 100))
    ImageDraw.Draw(image).rectangle([20, 30, 59, 69], fill=(255, 255, 255))  # pixels 20..59: xyxy 20,30,60,70
    annotations = [{"image_id": 1, "category_id": 1, "bbox": [20, 30, 40, 40]}]
    ann_file = write_coco(tmp_path, {1: image}, annotations, [{"id": 1, "name": "square"}])
    dataset = CocoDetection(ann_file, tmp_path, train_transforms((96, 128), stop_epoch=None))
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        out, target = dataset[0]
        assert out.shape == (3, 96, 128) and len(target["boxes"]) == 1
        cx, cy, w, h = (target["boxes"][0] * torch.tensor([128, 96, 128, 96])).tolist()
        box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        assert box == pytest.approx(bright_region(out), abs=1.5), f"seed {seed}"
        seen.add(tuple(round(v) for v in box))
    assert len(seen) > 10  # flips, zoom-outs and crops did happen


def test_stop_epoch_switches_strong_augmentation_off(tmp_path):
    torch.manual_seed(0)
    noise = Image.fromarray((torch.rand(60, 80, 3) * 255).to(torch.uint8).numpy())
    annotations = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20]}]
    ann_file = write_coco(tmp_path, {1: noise}, annotations, [{"id": 1, "name": "a"}])
    dataset = CocoDetection(ann_file, tmp_path, train_transforms((48, 64), stop_epoch=5))
    reference = CocoDetection(ann_file, tmp_path, eval_transforms((48, 64)))[0][0]

    def only_flipped(epoch: int) -> bool:
        dataset.set_epoch(epoch)  # forwarded to the transforms' policy
        outputs = [dataset[0][0] for _ in range(12)]
        return all(torch.equal(o, reference) or torch.equal(o, reference.flip(-1)) for o in outputs)

    assert not only_flipped(4)
    assert only_flipped(5) and only_flipped(70)


def v2_pipeline(image_size: tuple[int, int] | None, training: bool, strong: bool) -> v2.Compose:
    """The official pipeline written with torchvision's v2 transforms of the official names (the reference)."""
    resize = [v2.Resize(list(image_size))] if image_size is not None else []
    if not training:
        return v2.Compose([*resize, v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    augment = [
        v2.RandomPhotometricDistort(p=0.5), v2.RandomZoomOut(fill=0, side_range=(1.0, 4.0), p=0.5),
        v2.RandomApply([v2.RandomIoUCrop()], p=0.8),
    ] if strong else []  # fmt: skip
    return v2.Compose([
        *augment, v2.SanitizeBoundingBoxes(min_size=1), v2.RandomHorizontalFlip(), *resize, v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(min_size=1),
    ])  # fmt: skip


@pytest.mark.parametrize("size, training, strong", [
    ((96, 128), True, False), ((60, 80), True, False), ((48, 40), True, True), ((64, 48), False, False),
    (None, False, False),
])  # fmt: skip
def test_transforms_match_torchvision_v2(size, training, strong):
    """Our ops give the pixels, boxes, labels and random draws of torchvision's v2 transforms, including boxes
    dropped for being under a pixel before or after the resize, and boxes on the image's edges."""
    torch.manual_seed(0)
    image = Image.fromarray((torch.rand(60, 80, 3) * 255).to(torch.uint8).numpy())
    boxes = torch.tensor([[0, 0, 80, 60], [10, 10, 30, 25], [5, 5, 5.5, 20], [70, 50, 80, 60], [40, 3, 42, 4.5]])
    labels = torch.arange(len(boxes))
    ours = train_transforms(size, stop_epoch=None if strong else 0) if training else eval_transforms(size)
    reference = v2_pipeline(size, training, strong)
    for seed in range(12):
        target = {"boxes": boxes.clone(), "labels": labels.clone(), "image_id": torch.tensor(7)}
        torch.manual_seed(seed)
        out, got = ours(image, target)
        torch.manual_seed(seed)
        canvas = tv_tensors.BoundingBoxes(boxes.clone(), format="XYXY", canvas_size=(60, 80))
        expected_image, expected = reference(image, {**target, "boxes": canvas})
        height, width = expected_image.shape[-2:]
        expected_boxes = box_xyxy_to_cxcywh(expected["boxes"].as_subclass(torch.Tensor)) / torch.tensor(
            [width, height, width, height]
        )
        assert torch.equal(out, expected_image.as_subclass(torch.Tensor)), f"seed {seed}"
        assert torch.equal(got["labels"], expected["labels"]) and got["image_id"] == 7, f"seed {seed}"
        torch.testing.assert_close(got["boxes"], expected_boxes, rtol=0, atol=1e-6)
        if training and not strong:
            assert got["labels"].tolist() in ([0, 1, 3], [0, 1, 3, 4]), "the 0.5-px-wide box is dropped"
