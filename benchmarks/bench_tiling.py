"""Tiled inference against full-frame inference with the same model, on generated large images with small objects:
COCO AP (pycocotools) and the time per image of each way.

    rtdetr demo --output runs/demo                  # rtdetr_tiny trained on 160-px shape scenes (9 minutes)
    flock /tmp/cpu.lock python3 benchmarks/bench_tiling.py --weights runs/demo/train/best.pt

The images: each a mosaic of `render_scene` cells (`rtdetr.data.synthetic`, the demo's generator) of 160 x 160
pixels, 8 x 6 cells = 1280 x 960 pixels, 0-2 shapes per cell (5-48 px radius). The model sees the whole image at
its input size (160 px: a shape shrinks 8x to a few pixels), or the image at 640 px, or tiles at its input size.
Every way runs through `RTDETR.predict` (tiles: `predict(..., tile=TileOptions(...))`), score threshold 0.01,
batch 8; AP over all images by `CocoEvaluator` (COCOeval keeps the best 100 detections per image). Time: the
wall-clock of predicting all images (decoding included, after one warm-up image), divided by their number.
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import torch

from rtdetr import RTDETR
from rtdetr.data.synthetic import SHAPE_CLASSES, render_scene
from rtdetr.engine.evaluator import CocoEvaluator
from rtdetr.inference.tiling import TileOptions

CELL = 160


def mosaic_set(count: int, columns: int, rows: int, seed: int) -> tuple[list, dict]:
    """`count` images of `columns` x `rows` scene cells and their COCO ground truth (category ids from 1)."""
    from PIL import Image

    rng = random.Random(seed)
    images, annotations = [], []
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(SHAPE_CLASSES)]
    for image_id in range(1, count + 1):
        canvas = Image.new("RGB", (columns * CELL, rows * CELL))
        for row in range(rows):
            for column in range(columns):
                cell, objects = render_scene(rng, CELL, CELL, max_objects=2, negative_rate=0.3)
                canvas.paste(cell, (column * CELL, row * CELL))
                for name, (x0, y0, x1, y1) in objects:
                    box = [x0 + column * CELL, y0 + row * CELL, x1 - x0, y1 - y0]
                    annotations.append({
                        "id": len(annotations) + 1, "image_id": image_id, "bbox": box, "iscrowd": 0,
                        "category_id": SHAPE_CLASSES.index(name) + 1, "area": box[2] * box[3],
                    })  # fmt: skip
        images.append(canvas)
    info = [{"id": i, "width": im.width, "height": im.height, "file_name": f"{i}.png"}
            for i, im in enumerate(images, 1)]  # fmt: skip
    return images, {"images": info, "annotations": annotations, "categories": categories}


def measure(model: RTDETR, images: list, truth: dict, **predict_options) -> dict:
    model.predict(images[:1], score_threshold=0.01, **predict_options)  # warm-up
    start = time.perf_counter()
    detections = model.predict(images, score_threshold=0.01, batch_size=8, **predict_options)
    seconds = (time.perf_counter() - start) / len(images)
    evaluator = CocoEvaluator(truth)
    evaluator.update(list(range(1, len(images) + 1)), detections)
    metrics = evaluator.summarize()
    return {"AP": metrics["AP"], "AP50": metrics["AP50"], "APs": metrics["APs"], "AR100": metrics["AR100"],
            "ms_per_image": seconds * 1000,
            "detections_per_image": sum(map(len, detections)) / len(images)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="a model trained on the demo's shapes (rtdetr demo)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()

    model = RTDETR.from_checkpoint(args.weights).eval().deploy()
    images, truth = mosaic_set(args.images, args.columns, args.rows, args.seed)
    size = tuple(model.config.image_size)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; {len(images)} images {images[0].width}x{images[0].height}, {len(truth['annotations'])} objects; "
          f"model input {size[0]}x{size[1]}")  # fmt: skip
    ways = {
        f"full frame at {size[0]} px (the model's input)": {},
        "full frame at 640 px": {"image_size": (640, 640)},
        f"tiles {CELL}, overlap 0.2, nms (the default)": {"tile": TileOptions(CELL, 0.2)},
        f"tiles {CELL}, overlap 0.2, nmm": {"tile": TileOptions(CELL, 0.2, merge="nmm")},
        f"tiles {CELL}, overlap 0.2, nms + full frame": {"tile": TileOptions(CELL, 0.2, full_frame=True)},
        f"tiles {2 * CELL}, overlap 0.2, nms": {"tile": TileOptions(2 * CELL, 0.2)},
    }
    print("| inference | AP | AP50 | APs | AR100 | ms / image | detections / image |\n|---|---|---|---|---|---|---|")
    for name, options in ways.items():
        r = measure(model, images, truth, **options)
        print(f"| {name} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['APs']:.3f} | {r['AR100']:.3f} | "
              f"{r['ms_per_image']:.0f} | {r['detections_per_image']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
