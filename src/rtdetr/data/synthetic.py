"""A small synthetic detection dataset in COCO format: coloured shapes at many scales on textured
backgrounds, with clutter (distractor strokes), occlusion (later shapes drawn over earlier ones) and
negative images without objects. Deterministic for a given seed."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "star")


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        corners = [(angle + k * 2 * math.pi / 3, r) for k in range(3)]
    elif kind == "star":
        corners = [(angle + k * math.pi / 5, r if k % 2 == 0 else r * 0.45) for k in range(10)]
    else:  # cross: a plus sign of width r/2.5
        t = r / 2.5
        pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
        return [(cx + x, cy + y) for x, y in pts]
    return [(cx + d * math.cos(a), cy + d * math.sin(a)) for a, d in corners]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, color, angle: float):
    """Draw one shape; returns its tight xyxy box."""
    if kind == "circle":
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, fill=color)
        return box
    if kind == "square":
        box = (cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r * 0.8)
        draw.rectangle(box, fill=color)
        return box
    points = _polygon(kind, cx, cy, r, angle)
    draw.polygon(points, fill=color)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return (min(xs), min(ys), max(xs), max(ys))


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    base = tuple(rng.randint(0, 255) for _ in range(3))
    image = Image.new("RGB", (width, height), base)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(0, 12)):  # clutter: lines that are not objects
        color = tuple(rng.randint(0, 255) for _ in range(3))
        points = [(rng.uniform(0, width), rng.uniform(0, height)) for _ in range(2)]
        draw.line(points, fill=color, width=rng.randint(1, 4))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))


def render_scene(
    rng: random.Random, width: int = 320, height: int = 320, max_objects: int = 8, negative_rate: float = 0.1
) -> tuple[Image.Image, list[tuple[str, tuple[float, float, float, float]]]]:
    """One image and its objects as (class name, xyxy pixel box), clipped to the image and visible."""
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    objects = []
    count = 0 if rng.random() < negative_rate else rng.randint(1, max_objects)
    for _ in range(count):
        kind = rng.choice(SHAPE_CLASSES)
        r = min(width, height) * math.exp(rng.uniform(math.log(0.03), math.log(0.3)))  # many scales
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        color = tuple(rng.randint(0, 255) for _ in range(3))
        x0, y0, x1, y1 = _draw_shape(draw, kind, cx, cy, r, color, rng.uniform(0, 2 * math.pi))
        box = (max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1))
        if box[2] - box[0] >= 4 and box[3] - box[1] >= 4:
            objects.append((kind, box))
    return image, objects


def generate_coco_dataset(
    root: str | Path, splits: dict[str, int] | None = None, image_size: tuple[int, int] = (320, 320), seed: int = 0
) -> Path:
    """Write `root/<split>/*.jpg` and `root/annotations/instances_<split>.json` (COCO layout).

    `splits` maps split name to image count (default train 400, val 100). Returns `root`.
    """
    root = Path(root)
    splits = splits or {"train": 400, "val": 100}
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)]
    category_id = {c["name"]: c["id"] for c in categories}
    for offset, (split, count) in enumerate(splits.items()):
        rng = random.Random(seed * 1000 + offset)
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            image, objects = render_scene(rng, image_size[1], image_size[0])
            file_name = f"{image_id:06d}.jpg"
            image.save(root / split / file_name, quality=92)
            images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
            for kind, (x0, y0, x1, y1) in objects:
                w, h = x1 - x0, y1 - y0
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id[kind],
                    "bbox": [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)], "area": round(w * h, 2),
                    "iscrowd": 0,
                })  # fmt: skip
        (root / "annotations").mkdir(exist_ok=True)
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root
