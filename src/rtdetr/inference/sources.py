"""Prediction on what users point at: files, folders, glob patterns and videos, with annotated copies and JSON.

    summary = predict_sources(detector, ["photos/", "clip.mp4"], "runs/predict", score_threshold=0.5)
    # runs/predict/<stem>_pred.jpg|.mp4, predictions.json (per image/video, plus every skipped file and why),
    # predictions_coco.json (COCO results of the images)

Every file is either processed or listed under "failed" with its reason, whatever it holds (missing, not an
image, truncated, a decompression bomb, an unreadable video): one bad file never ends the run, and the JSON
files are written even when the run is interrupted.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from ..data.images import load_image
from ..postprocess import Detections
from ..viz import draw_detections
from .detector import Detector
from .tiling import TileOptions, predict_tiled

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
DEFAULT_VIDEO_FPS = 30.0  # when a video file does not say its frame rate


@dataclass
class PredictOptions:
    """How `predict_sources` runs the detector (the arguments of `Detector.predict`; with `tiles`, each image
    is cut into tiles that run as batches of `batch_size`: `inference.tiling`)."""

    score_threshold: float = 0.5
    image_size: tuple[int, int] | None = None
    batch_size: int = 8
    max_detections: int = 300
    amp: str = "off"
    tiles: TileOptions | None = None

    def run(self, detector: Detector, images: list[Any]) -> list[Detections]:
        if self.tiles is not None:
            return predict_tiled(detector, images, self.tiles, self.score_threshold, self.image_size,
                                 self.batch_size, self.max_detections, amp=self.amp)  # fmt: skip
        return detector.predict(images, self.score_threshold, self.image_size, max(1, len(images)),
                                self.max_detections, amp=self.amp)  # fmt: skip


@dataclass
class PredictSummary:
    """What `predict_sources` did: per-image and per-video records, COCO results, and every skipped file."""

    images: list[dict] = field(default_factory=list)
    videos: list[dict] = field(default_factory=list)
    coco: list[dict] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)

    def fail(self, path: Path | str, error: Exception | str) -> None:
        message = str(error) if isinstance(error, (ValueError, FileNotFoundError)) else f"{type(error).__name__}: {error}"
        self.failed.append({"file": str(path), "error": message})
        tqdm.write(f"skipped {path}: {message}")

    def write(self, output: Path) -> None:
        (output / "predictions_coco.json").write_text(json.dumps(self.coco))
        summary = {"images": self.images, "videos": self.videos, "failed": self.failed}
        (output / "predictions.json").write_text(json.dumps(summary, indent=1))


def expand_sources(sources: list[str]) -> tuple[list[Path], list[dict[str, str]]]:
    """Files, folders (their images and videos, sorted) and glob patterns -> (paths, failures).

    Explicitly named files are kept even if missing or of an unknown type: reading them reports the problem.
    """
    known = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    paths: list[Path] = []
    failures: list[dict[str, str]] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in known)
        elif any(ch in source for ch in "*?[") and not path.exists():
            matches = sorted(p for p in map(Path, glob.glob(source, recursive=True)) if p.suffix.lower() in known)
            paths += matches
            if not matches:
                failures.append({"file": source, "error": f"no image or video matches the pattern {source}"})
        else:
            paths.append(path)
    return paths, failures


def predict_sources(
    detector: Detector, sources: list[str], output: str | Path, options: PredictOptions | None = None
) -> PredictSummary:
    """Detect in every image and video of `sources`; write annotated copies and the JSON files to `output`."""
    options = options or PredictOptions()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths, failures = expand_sources(sources)
    summary = PredictSummary(failed=failures)
    used: set[Path] = set()
    try:
        images = [p for p in paths if p.suffix.lower() not in VIDEO_SUFFIXES]
        predict_images(detector, images, output, options, used, summary)
        for path in (p for p in paths if p.suffix.lower() in VIDEO_SUFFIXES):
            try:
                summary.videos.append(predict_video(detector, path, output, options, used))
            except Exception as error:  # any failure of one video: reported, the others go on
                summary.fail(path, error)
    finally:
        summary.write(output)
    return summary


def predict_images(
    detector: Detector, paths: list[Path], output: Path, options: PredictOptions, used: set[Path],
    summary: PredictSummary,
) -> None:  # fmt: skip
    """Detect in `paths` a batch at a time; records, COCO results and failures go to `summary`."""
    progress = tqdm(total=len(paths), desc="images", unit="img")
    for start in range(0, len(paths), options.batch_size):
        batch: list[tuple[Path, Image.Image]] = []
        for path in paths[start : start + options.batch_size]:
            try:
                batch.append((path, load_image(path)))
            except Exception as error:  # whatever the file holds, it is named with its reason
                summary.fail(path, error)
        for (path, image), det in zip(batch, options.run(detector, [image for _, image in batch]) if batch else []):
            image_id = len(summary.images) + 1
            annotated = unique_output(output, path, ".jpg", used)
            draw_detections(image, det).save(annotated, quality=92)
            summary.coco += det.to_coco_results(image_id)
            summary.images.append({
                "file": str(path), "image_id": image_id, "width": image.width, "height": image.height,
                "annotated": str(annotated), "detections": detection_records(det),
            })  # fmt: skip
        progress.update(len(paths[start : start + options.batch_size]))
    progress.close()


def predict_video(detector: Detector, path: Path, output: Path, options: PredictOptions, used: set[Path]) -> dict:
    """Annotate every frame of a video into `<stem>_pred.mp4` at the same frame rate; per-frame detections."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ValueError(f"cannot read video {path}")
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and fps > 0 else DEFAULT_VIDEO_FPS
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    annotated = unique_output(output, path, ".mp4", used)
    writer = cv2.VideoWriter(str(annotated), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    per_frame: list[list[dict]] = []
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    try:
        if not writer.isOpened():
            raise ValueError(f"cannot write {annotated} ({width}x{height} mp4v): is OpenCV built with FFmpeg?")
        with tqdm(total=total, desc=path.name, unit="frame") as progress:
            while frames := read_frames(capture, options.batch_size):
                for frame, det in zip(frames, options.run(detector, frames)):
                    drawn = np.asarray(draw_detections(Image.fromarray(frame), det))
                    writer.write(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
                    per_frame.append(detection_records(det))
                progress.update(len(frames))
    finally:
        capture.release()
        writer.release()
    if not per_frame:
        annotated.unlink(missing_ok=True)
        raise ValueError(f"cannot read video {path}: no frames decoded")
    return {
        "file": str(path), "annotated": str(annotated), "fps": fps, "frames": len(per_frame),
        "width": width, "height": height, "detections_per_frame": per_frame,
    }  # fmt: skip


def read_frames(capture: cv2.VideoCapture, count: int) -> list[np.ndarray]:
    """Up to `count` next frames as RGB uint8 arrays (fewer at the end of the video)."""
    frames = []
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    return frames


def unique_output(output: Path, source: Path, suffix: str, used: set[Path]) -> Path:
    """output/<stem>_pred<suffix>, numbered when two sources share a stem."""
    candidate, n = output / f"{source.stem}_pred{suffix}", 1
    while candidate in used:
        candidate, n = output / f"{source.stem}_{n}_pred{suffix}", n + 1
    used.add(candidate)
    return candidate


def detection_records(dets: Detections) -> list[dict[str, Any]]:
    """Detections as JSON records with class names."""
    columns = zip(dets.boxes.tolist(), dets.scores.tolist(), dets.labels.tolist(), dets.class_names)
    return [
        {"box_xyxy": [round(v, 2) for v in box], "score": round(score, 4), "category_id": cat, "class_name": name}
        for box, score, cat, name in columns
    ]
