"""COCO-format detection data: `CocoDetection`, `find_split` to locate a split in a COCO or Roboflow dataset
folder, and `BatchCollator` with the official multi-scale training. `datasets.open_split` opens a split of any
layout (COCO, Roboflow, YOLO) as a `CocoDetection`.

    ann_file, image_dir = find_split("datasets/my_data", "train")
    dataset = CocoDetection(ann_file, image_dir, train_transforms((640, 640), stop_epoch=71))
    loader = DataLoader(dataset, batch_size=16, shuffle=True, drop_last=True,
                        collate_fn=BatchCollator(MULTISCALE_SIZES, stop_epoch=71))
    for epoch in range(72):
        dataset.set_epoch(epoch); loader.collate_fn.set_epoch(epoch)   # before iterating the loader
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .images import load_image
from .rules import listed, read_annotations, refusal, size_mismatch
from .transforms import eval_transforms

logger = logging.getLogger(__name__)

# Official v2 `BatchImageCollateFunction` (and v1 `RTDETR.multi_scale`): 640 three times, so it is drawn most.
MULTISCALE_SIZES = (480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800)


def read_coco_json(path: str | Path) -> dict[str, Any]:
    """The parsed annotation file; malformed JSON raises ValueError naming the file, line and column."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"malformed JSON in {path}: {error.msg} at line {error.lineno} column {error.colno}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 JSON: {error}") from None
    return require_coco_lists(data, path)


def require_coco_lists(data: Any, ann_file: Path) -> dict[str, Any]:
    """`data` if it is a COCO detection dict ('images' and 'categories' lists), else ValueError naming `ann_file`."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
        data.get("categories"), list
    ):
        raise ValueError(f"{ann_file} is not a COCO detection file: it needs 'images' and 'categories' lists")
    return data


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset with labels remapped to 0..C-1 by the file's own categories.

    The annotations follow the rules of `rules.py`, the same ones `check_dataset` reports: any error (malformed
    entries, duplicate ids, an unknown category or image id, a bbox that is not 4 finite numbers) raises
    ValueError listing them, naming the file and the annotation or image ids; malformed JSON names the line and
    column. As the official loader: crowd boxes (iscrowd=1) are dropped; images without boxes are kept as
    negatives; boxes xywh -> xyxy clamped to the image; boxes without area inside their image dropped with one
    warning at construction naming their annotation ids. Images are read with their EXIF orientation applied, so
    boxes must refer to the displayed (EXIF-rotated) image; grayscale, palette, RGBA (composited on black) and
    16-bit images become RGB.

    From `__getitem__`, an image that is unreadable or whose size differs from the entry's width/height raises
    ValueError (FileNotFoundError if missing) naming the file; with `skip_bad_images=True` it is instead logged
    once per process (each DataLoader worker) and the next good image is returned, so a long run survives a few
    bad files (run `check_data` first to list them all).

    coco: the COCO dict itself (e.g. converted from another layout, see `open_split`) instead of reading
    `ann_file`, which then only names the source in messages; annotation_names: how messages name annotations
    of `coco`, by id (e.g. "labels/a.txt line 3"). `coco` (property) is the ground truth for `CocoEvaluator`.

    Item: (image, target) after `transforms` (default: no resize, to float) — image float [3, H, W] RGB in
    [0, 1]; target `labels` int64 [n] (0..C-1), `boxes` float [n, 4] normalised cx,cy,w,h, `image_id`
    int64 scalar (the file's id), `orig_size` int64 [2] = (width, height) of the image as read.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        transforms: Callable | None = None,
        skip_bad_images: bool = False,
        *,
        coco: dict[str, Any] | None = None,
        annotation_names: Mapping[int, str] | None = None,
    ) -> None:
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        self.transforms = transforms if transforms is not None else eval_transforms(None)
        self.skip_bad_images = skip_bad_images
        self._coco = None if coco is None else require_coco_lists(coco, self.ann_file)
        annotations = read_annotations(self.coco, self.ann_file, annotation_names)
        if annotations.errors:
            raise ValueError(refusal(self.ann_file, annotations.errors))
        if annotations.dropped:
            _log_dropped(self.ann_file, annotations.dropped, annotation_names)
        self.class_names: list[str] = annotations.class_names
        self.category_ids: list[int] = annotations.category_ids
        self.image_ids, self.file_names = annotations.image_ids, annotations.file_names
        self._sizes = annotations.sizes
        self._boxes = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in annotations.boxes]
        self._labels = [np.asarray(c, dtype=np.int64) for c in annotations.labels]
        self._bad_images: set[int] = set()

    @property
    def coco(self) -> dict[str, Any]:
        """The ground truth as a COCO dict ('images', 'annotations', 'categories'), as `CocoEvaluator` takes it:
        the dict given, or else `ann_file` read again (not kept: a big dict in every DataLoader worker costs
        memory)."""
        return self._coco if self._coco is not None else read_coco_json(self.ann_file)

    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the transforms' `stop_epoch` policy (if they have one)."""
        set_epoch = getattr(self.transforms, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        index, image = self._read_image(index)
        return self.transforms(image, self._target(index, image.size))

    def _read_image(self, index: int) -> tuple[int, Image.Image]:
        """(index, image) of `index`, or with `skip_bad_images` of the first readable image from there on."""
        candidates = range(index, index + len(self)) if self.skip_bad_images else [index]
        for candidate in candidates:
            candidate %= len(self)
            if candidate in self._bad_images:
                continue
            try:
                return candidate, self._load(candidate)
            except (FileNotFoundError, ValueError) as error:  # the errors name the file
                if not self.skip_bad_images:
                    raise
                self._bad_images.add(candidate)
                logger.error("%s (image id %d); skipping it", error, self.image_ids[candidate])
        raise RuntimeError(f"none of the {len(self)} images in {self.image_dir} is readable")

    def _load(self, index: int) -> Image.Image:
        """The image; ValueError naming it if its size is not the stated one (its boxes would not fit it)."""
        image = load_image(self.image_dir / self.file_names[index])
        mismatch = size_mismatch(
            self.ann_file, self.image_ids[index], self.file_names[index], self._sizes[index], image.size
        )
        if mismatch is not None:
            raise ValueError(mismatch)
        return image

    def _target(self, index: int, size: tuple[int, int]) -> dict[str, Tensor]:
        """Target with pixel xyxy boxes clamped to the image as read, for the transforms."""
        width, height = size
        boxes = torch.from_numpy(self._boxes[index]).clone()
        # The image as read has the stated size (`_load`) or none was stated: clamp to it, as `rules.place_box`.
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return {
            "boxes": boxes[keep],
            "labels": torch.from_numpy(self._labels[index])[keep],
            "image_id": torch.tensor(self.image_ids[index], dtype=torch.int64),
            "orig_size": torch.tensor([width, height], dtype=torch.int64),
        }


def _log_dropped(ann_file: Path, dropped: list[int], annotation_names: Mapping[int, str] | None) -> None:
    """One warning for all the boxes dropped for having no area inside their image."""
    which = listed([annotation_names[i] for i in dropped]) if annotation_names else f"annotation ids {listed(dropped)}"
    logger.warning("%s: dropped %d boxes with no area inside their image: %s", ann_file, len(dropped), which)


def split_names(split: str) -> list[str]:
    """Folder/file names a split goes by: COCO 2017 adds a year, Roboflow calls val 'valid'."""
    aliases = {"val": ["valid"], "valid": ["val"]}.get(split, [])
    return [split, f"{split}2017", *aliases]


def find_split(data: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of `split` ('train', 'val', ...) in the dataset folder `data`.

    Tries the COCO layout `data/annotations/instances_<split>.json` with images in `data/<split>/` (or
    `data/images/<split>/`), then the Roboflow layout `data/<split>/_annotations.coco.json`, each also under
    the names `<split>2017` and, for val, `valid`. FileNotFoundError lists every path tried.
    """
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    tried = []
    for name in split_names(split):
        ann_file = root / "annotations" / f"instances_{name}.json"
        tried.append(ann_file)
        if ann_file.is_file():
            image_dirs = [root / name, root / "images" / name]
            image_dir = next((d for d in image_dirs if d.is_dir()), None)
            if image_dir is None:
                tried_dirs = ", ".join(map(str, image_dirs))
                raise FileNotFoundError(f"found {ann_file} but no image folder: tried {tried_dirs}")
            return ann_file, image_dir
    for name in split_names(split):
        ann_file = root / name / "_annotations.coco.json"
        tried.append(ann_file)
        if ann_file.is_file():
            return ann_file, ann_file.parent
    raise FileNotFoundError(
        f"no '{split}' split in {root}; tried:\n  " + "\n  ".join(map(str, tried))
        + "\n(COCO layout: annotations/instances_<split>.json + <split>/ images; "
        "Roboflow layout: <split>/_annotations.coco.json next to the images)"
    )  # fmt: skip


class BatchCollator:
    """`collate_fn` for detection: stacks the images [B, 3, H, W] and lists the targets.

    With `multiscale_sizes`, while `epoch < stop_epoch` (always if None) the whole batch is resized
    (nearest) to a square `random.choice(multiscale_sizes)` (official v2 `BatchImageCollateFunction`);
    boxes are normalised so they stay valid. The epoch reaches DataLoader workers only if they are created
    after `set_epoch` (the default, `persistent_workers=False`, re-creates them every epoch).
    """

    def __init__(self, multiscale_sizes: Sequence[int] | None = None, stop_epoch: int | None = None) -> None:
        self.multiscale_sizes = list(multiscale_sizes or [])
        self.stop_epoch = stop_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, batch: Sequence[tuple[Tensor, dict]]) -> tuple[Tensor, list[dict]]:
        images = torch.stack([image for image, _ in batch])
        targets = pack_targets([target for _, target in batch])
        if self.multiscale_sizes and (self.stop_epoch is None or self.epoch < self.stop_epoch):
            size = random.choice(self.multiscale_sizes)
            images = F.interpolate(images, size=size)  # mode 'nearest', as the official
        return images, targets


def pack_targets(targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """The same targets, each key's tensors turned into views of one tensor: a DataLoader worker then hands
    the main process one shared-memory storage per key instead of one per image and key (measured: ~20 ms
    less per 16-image batch on 2 CPU cores, where each storage costs a file-descriptor round trip)."""
    packed: list[dict[str, Tensor]] = [{} for _ in targets]
    for key in targets[0] if targets else ():
        values = [t[key] for t in targets]
        if values[0].dim() == 0:
            parts = torch.stack(values).unbind(0)
        else:
            parts = torch.cat(values).split([len(v) for v in values])
        for target, part in zip(packed, parts):
            target[key] = part
    return packed
