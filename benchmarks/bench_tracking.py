"""Tracking accuracy on a generated video with known trajectories: MOTA, IDF1 and id switches from `motmetrics`,
for the tracker settings of `rtdetr track` and for ByteTrack's YOLO-tuned defaults on the same detections.

    rtdetr demo --output runs/demo                  # rtdetr_tiny trained on 160-px shape scenes (9 minutes)
    flock /tmp/cpu.lock python3 benchmarks/bench_tracking.py --weights runs/demo/train/best.pt

The video: 320 x 240 pixels, 30 fps, a still background of the demo's generator (`render_scene` without objects:
clutter strokes, blur) and circles and squares (two of the demo's classes, 12-22 px radius) moving at constant
speed, bouncing off the borders, drawn in a fixed order (later ones occlude earlier ones where they cross). The
ground truth is every shape's full box in every frame. Each setting runs `track_video` (the model at its input
size, batch 8) and writes MOT text, read back with `motmetrics.io.loadtxt`; the distances are 1 - IoU, no pairing
below IoU 0.5 (motmetrics' own `iou_matrix` calls `np.asfarray`, which NumPy 2 removed).
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import tempfile
import time
from pathlib import Path

import cv2
import motmetrics as mm
import numpy as np
import torch
from PIL import ImageDraw
from torchvision.ops import box_iou

from rtdetr import RTDETR
from rtdetr.data.synthetic import render_scene
from rtdetr.inference.sources import PredictOptions
from rtdetr.inference.tracking import TrackerOptions, track_video

SIZE = (320, 240)
SETTINGS = {  # TrackerOptions(detection_threshold, track_threshold, match_threshold, lost_frames, min_frames)
    "rtdetr track: detections > 0.1, first association from 0.6, tracks from 0.7, reported after 3 frames":
        TrackerOptions(),
    "the same, reported from the first frame": TrackerOptions(min_frames=1),
    "ByteTrack's defaults (0.25, 0.8, 1 frame), detections > 0.5 (a YOLO setup)": TrackerOptions(0.5, 0.25, 0.8, 30, 1),
    "ByteTrack's defaults, detections > 0.1": TrackerOptions(0.1, 0.25, 0.8, 30, 1),
}  # fmt: skip


def write_video(path: Path, frames: int, objects: int, seed: int) -> dict[int, dict[int, list[float]]]:
    """Render the video; returns the ground truth {frame (from 1): {object id (from 1): [x0, y0, x1, y1]}}."""
    rng = random.Random(seed)
    background, _ = render_scene(rng, *SIZE, negative_rate=1.0)
    movers = []
    for _ in range(objects):
        radius, angle = rng.uniform(12, 22), rng.uniform(0, 2 * math.pi)
        speed = rng.uniform(2, 5)
        movers.append({
            "kind": rng.choice(("circle", "square")), "r": radius,
            "speed": (speed * math.cos(angle), speed * math.sin(angle)),
            "xy": [rng.uniform(radius, SIZE[0] - radius), rng.uniform(radius, SIZE[1] - radius)],
            "color": tuple(rng.randint(0, 255) for _ in range(3)),
        })  # fmt: skip
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, SIZE)
    truth: dict[int, dict[int, list[float]]] = {}
    for frame in range(1, frames + 1):
        image = background.copy()
        draw = ImageDraw.Draw(image)
        truth[frame] = {}
        for object_id, m in enumerate(movers, start=1):
            for axis in (0, 1):  # bounce off the borders
                m["xy"][axis] += m["speed"][axis]
                if not m["r"] <= m["xy"][axis] <= SIZE[axis] - m["r"]:
                    m["speed"] = tuple(-v if a == axis else v for a, v in enumerate(m["speed"]))
                    m["xy"][axis] = min(max(m["xy"][axis], m["r"]), SIZE[axis] - m["r"])
            half = m["r"] if m["kind"] == "circle" else m["r"] * 0.8  # the demo's square: 0.8 r from its centre
            box = [m["xy"][0] - half, m["xy"][1] - half, m["xy"][0] + half, m["xy"][1] + half]
            (draw.ellipse if m["kind"] == "circle" else draw.rectangle)(box, fill=m["color"])
            truth[frame][object_id] = box
        writer.write(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR))
    writer.release()
    return truth


def mot_metrics(truth: dict[int, dict[int, list[float]]], mot_file: Path) -> dict[str, float]:
    hypotheses = mm.io.loadtxt(str(mot_file), fmt="mot15-2D")
    frames_found = set(hypotheses.index.get_level_values(0))
    accumulator = mm.MOTAccumulator(auto_id=False)
    for frame, objects in truth.items():
        found = hypotheses.loc[frame] if frame in frames_found else hypotheses.iloc[:0]
        xyxy = torch.tensor(found[["X", "Y", "Width", "Height"]].to_numpy(), dtype=torch.float64).reshape(-1, 4)
        xyxy[:, 2:] += xyxy[:, :2]
        distances = 1 - box_iou(torch.tensor(list(objects.values()), dtype=torch.float64), xyxy).numpy()
        distances[distances > 0.5] = np.nan
        accumulator.update(list(objects), found.index.get_level_values(-1).tolist(), distances, frameid=frame)
    names = ["mota", "idf1", "num_switches", "num_false_positives", "num_misses"]
    summary = mm.metrics.create().compute(accumulator, metrics=names)
    return {name: float(summary[name].iloc[0]) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="a model trained on the demo's shapes (rtdetr demo)")
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--objects", type=int, default=6)
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()

    model = RTDETR.from_checkpoint(args.weights).eval().deploy()
    folder = Path(tempfile.mkdtemp(prefix="bench_tracking_"))
    truth = write_video(folder / "moving.mp4", args.frames, args.objects, args.seed)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; {args.frames} frames {SIZE[0]}x{SIZE[1]}, {args.objects} objects; model input "
          f"{model.config.image_size[0]}x{model.config.image_size[1]}; files in {folder}")  # fmt: skip
    print("| tracker | MOTA | IDF1 | id switches | false positives | misses | tracks | ms / frame |")
    print("|---|---|---|---|---|---|---|---|")
    for index, (name, tracker) in enumerate(SETTINGS.items()):
        start = time.perf_counter()
        result = track_video(model, folder / "moving.mp4", folder / f"setting{index}", PredictOptions(), tracker)
        milliseconds = (time.perf_counter() - start) * 1000 / len(result.frames)
        m = mot_metrics(truth, result.mot)
        print(f"| {name} | {m['mota']:.3f} | {m['idf1']:.3f} | {m['num_switches']:.0f} | "
              f"{m['num_false_positives']:.0f} | {m['num_misses']:.0f} | {len(result.track_ids)} | "
              f"{milliseconds:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
