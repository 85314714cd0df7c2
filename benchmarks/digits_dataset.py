"""A COCO-format dataset of many small real objects: scikit-learn's handwritten digits (`load_digits`, 1797
8x8 grayscale scans, 10 classes) pasted 10-40 px tall onto 320x320 crops of real photos bundled offline
(scikit-learn's `load_sample_images` and scikit-image's `skimage.data`). Unlike the demo's coloured shapes at
many scales, every object is small, many (2 to 20 per image) and of one texture family, on cluttered photos.

    python3 benchmarks/digits_dataset.py --output datasets/digits                     # 2000 train / 200 val
    python3 benchmarks/digits_dataset.py --output /tmp/digits --train 200 --val 50 --seed 1

Benchmark-only dependencies (not the project's): `pip install scikit-learn scikit-image`.

The layout is that of `rtdetr.data.synthetic.generate_coco_dataset`: `<output>/annotations/instances_<split>.json`
and the images in `<output>/<split>/`. Category ids are digit + 1 (names "0".."9"). Train and val paste disjoint
digit scans (a seeded 80/20 split of the 1797), so val measures generalisation to unseen handwriting; the
background photos are shared, their crops are not. Boxes are the tight pixel boxes of the pasted strokes; a digit
may cover at most 15% of another's box (modest occlusion). Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

# Photos scikit-image ships inside its wheel (no download); text and logo images are left out.
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field",
                  "immunohistochemistry", "grass", "gravel", "brick", "moon", "coins")  # fmt: skip
CLASS_NAMES = tuple(str(d) for d in range(10))
VAL_FRACTION = 0.2
MIN_SIDE, MAX_SIDE = 10, 40  # digit height in pixels, drawn log-uniformly
MAX_COVER = 0.15  # the most of an earlier digit's box that a new one may cover
STROKE_THRESHOLD = 0.2  # alpha above which a pixel belongs to the digit's box


@dataclass(frozen=True)
class Digit:
    """One scan: alpha mask (8, 8) in [0, 1] (ink = 1) and its class 0..9."""

    alpha: np.ndarray
    label: int


def load_digits_split(seed: int) -> dict[str, list[Digit]]:
    """{"train": 80% of the scans, "val": the other 20%}, disjoint, split by a seeded permutation."""
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    n_val = round(VAL_FRACTION * len(order))
    scans = [Digit(digits.images[i] / 16.0, int(digits.target[i])) for i in order]
    return {"train": scans[n_val:], "val": scans[:n_val]}


def load_photos() -> list[np.ndarray]:
    """The bundled photos as RGB uint8 arrays (H, W, 3); grayscale ones are stacked to three channels."""
    photos = list(load_sample_images().images)
    photos += [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]
    return [np.repeat(p[..., None], 3, axis=2) if p.ndim == 2 else p[..., :3] for p in photos]


def background(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> np.ndarray:
    """A random square crop (a third of the shorter side up to all of it) of a random photo, resized to
    `size`, flipped at random, its brightness and contrast jittered: float32 (size, size, 3) in [0, 255]."""
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    side = int(rng.uniform(min(h, w) / 3, min(h, w)))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.Resampling.BILINEAR)
    image = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if rng.random() < 0.2:
        image = image[::-1]
    mean = image.mean()
    return np.clip((image - mean) * rng.uniform(0.6, 1.2) + mean * rng.uniform(0.7, 1.3), 0, 255)


def digit_alpha(rng: np.random.Generator, digit: Digit) -> np.ndarray:
    """The scan upscaled (bicubic) to 10-40 px tall with a 0.75-1.25 aspect jitter, its edges sharpened:
    float32 (h, w) in [0, 1]."""
    height = int(np.exp(rng.uniform(np.log(MIN_SIDE), np.log(MAX_SIDE))))
    width = max(int(height * rng.uniform(0.75, 1.25)), 6)
    scan = Image.fromarray(digit.alpha.astype(np.float32)).resize((width, height), Image.Resampling.BICUBIC)
    # A steeper ramp than the interpolated one: pen strokes with soft edges rather than a blurred blob.
    return np.clip((np.asarray(scan) - 0.2) / 0.5, 0.0, 1.0)


def ink_colour(rng: np.random.Generator, patch: np.ndarray) -> np.ndarray:
    """A random colour, moved 90 (of 255) away from the patch's mean luminance when it is closer than 70."""
    luminance = float(patch.mean())
    colour = rng.uniform(0, 255, size=3)
    if abs(colour.mean() - luminance) < 70:
        target = luminance - 90 if luminance > 127 else luminance + 90
        colour = np.clip(colour + (target - colour.mean()), 0, 255)
    return colour.astype(np.float32)


def covers_too_much(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]]) -> bool:
    """Whether `box` (xyxy) covers more than MAX_COVER of any box in `boxes`, or they cover as much of it."""
    x0, y0, x1, y1 = box
    for a0, b0, a1, b1 in boxes:
        overlap = max(0, min(x1, a1) - max(x0, a0)) * max(0, min(y1, b1) - max(y0, b0))
        smaller = min((x1 - x0) * (y1 - y0), (a1 - a0) * (b1 - b0))
        if overlap > MAX_COVER * smaller:
            return True
    return False


def free_spot(
    rng: np.random.Generator, alpha: np.ndarray, size: int, boxes: list[tuple[int, int, int, int]]
) -> tuple[int, int, tuple[int, int, int, int]] | None:
    """A top-left corner (y, x) for `alpha` inside the image, and the digit's tight xyxy box there, that leaves
    the earlier `boxes` visible; None after 10 tries."""
    ys, xs = np.nonzero(alpha > STROKE_THRESHOLD)
    h, w = alpha.shape
    for _ in range(10):
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        box = (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1)
        if not covers_too_much(box, boxes):
            return y, x, box
    return None


def paste_digits(
    rng: np.random.Generator, image: np.ndarray, digits: list[Digit]
) -> list[tuple[int, tuple[int, int, int, int]]]:
    """Paste 2-20 random digits into `image` (in place) at free spots; returns (label, tight xyxy box) each."""
    objects: list[tuple[int, tuple[int, int, int, int]]] = []
    for _ in range(rng.integers(2, 21)):
        digit = digits[rng.integers(len(digits))]
        alpha = digit_alpha(rng, digit) * rng.uniform(0.75, 1.0)  # ink opacity: contrast jitter
        spot = free_spot(rng, alpha, image.shape[0], [box for _, box in objects])
        if spot is None:
            continue
        y, x, box = spot
        region = image[y : y + alpha.shape[0], x : x + alpha.shape[1]]
        colour = ink_colour(rng, region)
        region[:] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        objects.append((digit.label, box))
    return objects


def write_split(root: Path, split: str, count: int, rng: np.random.Generator, photos: list[np.ndarray],
                digits: list[Digit], size: int) -> None:  # fmt: skip
    """`count` images into root/split/ and their COCO annotations into root/annotations/instances_<split>.json."""
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        image = background(rng, photos, size)
        objects = paste_digits(rng, image, digits)
        file_name = f"{image_id:06d}.jpg"
        Image.fromarray(image.round().astype(np.uint8)).save(root / split / file_name, quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for label, (x0, y0, x1, y1) in objects:
            w, h = x1 - x0, y1 - y0
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
    categories = [{"id": i + 1, "name": name, "supercategory": "digit"} for i, name in enumerate(CLASS_NAMES)]
    (root / "annotations").mkdir(exist_ok=True)
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def generate_digits_dataset(
    root: str | Path, splits: dict[str, int] | None = None, image_size: int = 320, seed: int = 0
) -> Path:
    """Write the dataset under `root`; `splits` maps "train" / "val" to image counts (default 2000 / 200).
    Returns `root`."""
    root = Path(root)
    splits = splits or {"train": 2000, "val": 200}
    digits, photos = load_digits_split(seed), load_photos()
    for offset, (split, count) in enumerate(splits.items()):
        if split not in digits:
            raise ValueError(f"split '{split}': the digit scans are split into 'train' and 'val' only")
        write_split(root, split, count, np.random.default_rng([seed, offset]), photos, digits[split], image_size)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="dataset folder to write")
    parser.add_argument("--train", type=int, default=2000, help="train images (default: %(default)s)")
    parser.add_argument("--val", type=int, default=200, help="val images (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=320, help="square image side (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = generate_digits_dataset(args.output, {"train": args.train, "val": args.val}, args.img_size, args.seed)
    for split in ("train", "val"):
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        print(f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} digits -> {root / split}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
