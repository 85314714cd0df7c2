"""Multi-object tracking on video: the detections of any `Detector`, frame by frame, associated by ByteTrack
(Zhang et al., ECCV 2022) as `supervision` implements it.

    result = track_video(detector, "clip.mp4", "runs/track")
    # runs/track/clip_track.mp4 (boxes with track ids and trails), clip_tracks.json (per frame), clip_mot.txt

ByteTrack's defaults were tuned on YOLOX scores after NMS, where a detection above 0.25 is an object. RT-DETR's are
sigmoid scores of every query with no NMS: true objects score ~0.4-0.8 and near-duplicate queries of the same
objects reach 0.5-0.6 (the demo model on a generated video: 23 false detections, 20 of them on a true object, for 63
true ones in 0.5-0.6; 12 for 179 above 0.6). With ByteTrack's defaults every duplicate starts a track. So here only
detections from 0.6 take part in the first association and tracks start from 0.7 (ByteTrack adds 0.1); every
detection above 0.1 still reaches the second, low-score association, which extends existing tracks through
occlusions (dropping it, with detections above 0.3 only, lost 0.03-0.07 MOTA); a track is reported after 3 consecutive
frames (a duplicate rarely lasts that long). Chosen on one generated video, measured on another
(benchmarks/bench_tracking.py): MOTA 0.76, IDF1 0.73, 6 id switches, against 0.41 / 0.50 / 30 with ByteTrack's
defaults on the same detections (0.61 / 0.47 / 20 with those defaults on detections above 0.5, as YOLO setups run
them). One query can be reported once per class with the very same box: only its best class reaches the tracker.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import supervision as sv
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from tqdm import tqdm

from ..postprocess import Detections
from ..viz import class_color, draw_detections
from .detector import Detector
from .sources import DEFAULT_VIDEO_FPS, PredictOptions, read_frames


@dataclass(frozen=True)
class TrackerOptions:
    """ByteTrack's settings for RT-DETR scores (see the module docstring). detection_threshold: the lowest score
    the tracker sees; track_threshold: scores from which detections take part in the first association (new
    tracks need 0.1 more); match_threshold: the largest accepted association cost, 1 - IoU x score;
    lost_frames: frames (at 30 fps; scaled by the video's rate) a lost track waits to be found again;
    min_frames: consecutive frames before a track is reported; trail: the frames of trail drawn per track."""

    detection_threshold: float = 0.1
    track_threshold: float = 0.6
    match_threshold: float = 0.8
    lost_frames: int = 30
    min_frames: int = 3
    trail: int = 30


@dataclass
class TrackedDetections(Detections):
    """`Detections` of one frame with the id of the track each belongs to: track_ids int64 [N] (from 1)."""

    track_ids: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))


class Tracker:
    """ByteTrack over one video's `Detections`, frame after frame (`update`)."""

    def __init__(self, options: TrackerOptions | None = None, frame_rate: float = DEFAULT_VIDEO_FPS) -> None:
        self.options = options or TrackerOptions()
        # supervision >= 0.28 marks ByteTrack deprecated in favour of the `trackers` package, which requires the
        # GUI build of OpenCV (opencv-python) that clashes with our opencv-python-headless: keep sv.ByteTrack.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ByteTrack.*deprecated", category=FutureWarning)
            self.byte_track = sv.ByteTrack(
                track_activation_threshold=self.options.track_threshold,
                lost_track_buffer=self.options.lost_frames,
                minimum_matching_threshold=self.options.match_threshold,
                frame_rate=frame_rate,
                minimum_consecutive_frames=self.options.min_frames,
            )

    def update(self, detections: Detections) -> TrackedDetections:
        """The detections of the next frame that belong to a track, with their track ids, sorted by score."""
        keep = one_per_query(detections.boxes, detections.scores, self.options.detection_threshold)
        names = np.array(detections.class_names, dtype=object)
        found = sv.Detections(
            xyxy=detections.boxes[keep].double().cpu().numpy().reshape(-1, 4),
            confidence=detections.scores[keep].double().cpu().numpy(),
            class_id=detections.labels[keep].cpu().numpy(),
            data={"class_name": names[keep.numpy()] if len(names) else names},
        )  # fmt: skip
        tracked = self.byte_track.update_with_detections(found)
        if not len(tracked):
            return TrackedDetections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), [])
        return TrackedDetections(
            torch.from_numpy(tracked.xyxy).float(), torch.from_numpy(tracked.confidence).float(),
            torch.from_numpy(tracked.class_id).to(torch.int64), [str(n) for n in tracked.data["class_name"]],
            torch.from_numpy(tracked.tracker_id).to(torch.int64),
        )  # fmt: skip


def one_per_query(boxes: Tensor, scores: Tensor, threshold: float) -> Tensor:
    """Indices of the detections scoring above `threshold` whose box no higher-scoring detection has exactly:
    the top-K post-processor can report one query with several classes, at the very same box."""
    candidates = torch.nonzero(scores > threshold).flatten().cpu()
    _, first = np.unique(boxes[candidates].cpu().numpy().reshape(-1, 4), axis=0, return_index=True)
    return candidates[np.sort(first)] if len(candidates) else candidates


@dataclass
class TrackResult:
    """A tracked video: per frame the tracked detections, and the files written."""

    frames: list[TrackedDetections]
    fps: float
    annotated: Path
    json: Path
    mot: Path

    @property
    def track_ids(self) -> list[int]:
        return sorted({int(i) for frame in self.frames for i in frame.track_ids})


def track_video(
    detector: Detector, path: str | Path, output: str | Path, options: PredictOptions | None = None,
    tracker: TrackerOptions | None = None,
) -> TrackResult:  # fmt: skip
    """Detect (`options`, its score threshold replaced by the tracker's detection threshold) and track every
    frame of the video `path`; write `<stem>_track.mp4`, `<stem>_tracks.json` and `<stem>_mot.txt` to `output`."""
    tracker = tracker or TrackerOptions()
    options = replace(options or PredictOptions(), score_threshold=tracker.detection_threshold)
    path, output = Path(path), Path(output)
    output.mkdir(parents=True, exist_ok=True)
    capture = cv2.VideoCapture(str(path))
    if not path.is_file() or not capture.isOpened():
        raise ValueError(f"cannot read video {path}" + ("" if path.exists() else ": no such file"))
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and fps > 0 else DEFAULT_VIDEO_FPS
    size = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    annotated = output / f"{path.stem}_track.mp4"
    writer = cv2.VideoWriter(str(annotated), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    association, trails = Tracker(tracker, fps), TrailPainter(tracker.trail)
    frames: list[TrackedDetections] = []
    try:
        if not writer.isOpened():
            raise ValueError(f"cannot write {annotated} ({size[0]}x{size[1]} mp4v): is OpenCV built with FFmpeg?")
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        with tqdm(total=total, desc=path.name, unit="frame") as progress:
            while batch := read_frames(capture, options.batch_size):
                for frame, detections in zip(batch, options.run(detector, batch)):
                    frames.append(association.update(detections))
                    drawn = trails.draw(Image.fromarray(frame), frames[-1])
                    writer.write(cv2.cvtColor(np.asarray(drawn), cv2.COLOR_RGB2BGR))
                progress.update(len(batch))
    finally:
        capture.release()
        writer.release()
    if not frames:
        annotated.unlink(missing_ok=True)
        raise ValueError(f"cannot read video {path}: no frames decoded")
    result = TrackResult(frames, fps, annotated, output / f"{path.stem}_tracks.json", output / f"{path.stem}_mot.txt")
    write_track_json(result, path, size)
    write_mot(result.frames, result.mot)
    return result


class TrailPainter:
    """Draws a frame's tracked boxes ('#id name score', a colour per track) and each track's recent centres."""

    def __init__(self, length: int) -> None:
        self.centres: dict[int, deque] = defaultdict(lambda: deque(maxlen=max(1, length)))

    def draw(self, image: Image.Image, tracked: TrackedDetections) -> Image.Image:
        ids = tracked.track_ids.tolist()
        names = [f"#{i} {name}" for i, name in zip(ids, tracked.class_names)]
        canvas = draw_detections(image, Detections(tracked.boxes, tracked.scores, tracked.track_ids, names))
        draw = ImageDraw.Draw(canvas)
        for track_id, (x0, y0, x1, y1) in zip(ids, tracked.boxes.tolist()):
            self.centres[track_id].append(((x0 + x1) / 2, (y0 + y1) / 2))
            if len(self.centres[track_id]) > 1:
                draw.line(list(self.centres[track_id]), fill=class_color(track_id), width=max(2, image.width // 320))
        return canvas


def write_track_json(result: TrackResult, source: Path, size: tuple[int, int]) -> None:
    """Per frame: each tracked detection with its track id, pixel xyxy box, score, category id, class name."""
    per_frame = [
        [
            {"track_id": int(i), "box_xyxy": [round(v, 2) for v in box], "score": round(float(s), 4),
             "category_id": int(c), "class_name": n}
            for i, box, s, c, n in zip(f.track_ids, f.boxes.tolist(), f.scores, f.labels, f.class_names)
        ]
        for f in result.frames
    ]  # fmt: skip
    summary = {
        "file": str(source), "annotated": str(result.annotated), "mot": str(result.mot), "fps": result.fps,
        "width": size[0], "height": size[1], "frames": len(result.frames), "tracks": len(result.track_ids),
        "detections_per_frame": per_frame,
    }  # fmt: skip
    result.json.write_text(json.dumps(summary, indent=1))


def write_mot(frames: list[TrackedDetections], path: Path) -> None:
    """MOT challenge text: one line per tracked box, `frame,id,left,top,width,height,score,-1,-1,-1`, frames
    and pixel coordinates from 1 as in the benchmark's files (the devkit's MATLAB convention; motmetrics'
    `mot15-2D` reader subtracts the 1 again)."""
    lines = []
    for index, frame in enumerate(frames, start=1):
        for track_id, (x0, y0, x1, y1), score in zip(frame.track_ids.tolist(), frame.boxes.tolist(), frame.scores):
            box = f"{x0 + 1:.2f},{y0 + 1:.2f},{x1 - x0:.2f},{y1 - y0:.2f}"
            lines.append(f"{index},{track_id},{box},{float(score):.4f},-1,-1,-1")
    path.write_text("".join(line + "\n" for line in lines))
