"""Tracking: ByteTrack keeps ids through a crossing of two objects of one class (scripted detections on a
generated video, judged by motmetrics against the known trajectories), the MOT text parses, one query reported
with two classes makes one track, and `rtdetr track` / `RTDETR.track` end to end with a patched network."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import motmetrics as mm
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import ColorDetector
from torchvision.ops import box_iou

from rtdetr import RTDETR
from rtdetr.cli import main
from rtdetr.inference.tracking import Tracker, track_video
from rtdetr.models.rtdetr import RTDETRModel
from rtdetr.postprocess import Detections

RED, BLUE = (255, 0, 0), (0, 0, 255)
SIZE = (240, 160)  # width, height
FRAMES = 40


def crossing_boxes(frame: int) -> dict[int, tuple[int, int, int, int]]:
    """Ground truth of frame `frame` (from 0): object 1 (red) moves right, object 2 (blue, drawn on top) left;
    they overlap from about frame 14 to 26, where blue hides half of red."""
    x1, x2 = 10 + round(frame * 4.5), 200 - round(frame * 4.5)
    return {1: (x1, 50, x1 + 30, 80), 2: (x2, 65, x2 + 30, 95)}


@pytest.fixture(scope="module")
def crossing_video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "crossing.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, SIZE)
    for frame in range(FRAMES):
        image = np.full((SIZE[1], SIZE[0], 3), 200, np.uint8)
        for object_id, (x0, y0, x1, y1) in crossing_boxes(frame).items():
            image[y0:y1, x0:x1] = RED if object_id == 1 else BLUE
        writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def mot_summary(hypotheses: pd.DataFrame) -> pd.DataFrame:
    """motmetrics' metrics of `hypotheses` (its `mot15-2D` reader's frame) against `crossing_boxes`. The
    distances (1 - IoU, no pairing below IoU 0.5) are computed here: motmetrics 1.4's `iou_matrix` calls
    `np.asfarray`, which NumPy 2 removed."""
    accumulator = mm.MOTAccumulator(auto_id=False)
    for frame in range(1, FRAMES + 1):
        truth = crossing_boxes(frame - 1)
        found = hypotheses.loc[frame] if frame in hypotheses.index.get_level_values(0) else hypotheses.iloc[:0]
        xyxy = torch.tensor(found[["X", "Y", "Width", "Height"]].to_numpy(), dtype=torch.float64).reshape(-1, 4)
        xyxy[:, 2:] += xyxy[:, :2]
        distances = 1 - box_iou(torch.tensor(list(truth.values()), dtype=torch.float64), xyxy).numpy()
        distances[distances > 0.5] = np.nan
        accumulator.update(list(truth), found.index.get_level_values(-1).tolist(), distances, frameid=frame)
    return mm.metrics.create().compute(accumulator, metrics=["num_switches", "idf1", "mota", "num_misses"])


def test_ids_stay_stable_through_a_crossing_and_the_mot_text_parses(tmp_path, crossing_video):
    detector = ColorDetector({RED: (1, "square"), BLUE: (1, "square")})  # one class: only motion tells them apart
    result = track_video(detector, crossing_video, tmp_path)
    assert len(result.frames) == FRAMES and result.track_ids == [1, 2]

    hypotheses = mm.io.loadtxt(str(result.mot), fmt="mot15-2D")
    assert len(hypotheses) == sum(len(f) for f in result.frames)
    assert [len(f) for f in result.frames[:3]] == [0, 0, 2], "tracks are reported from their third frame"
    first = hypotheses.loc[3].sort_index()
    frame = result.frames[2]
    by_id = frame.track_ids.argsort()
    assert first.index.tolist() == frame.track_ids[by_id].tolist()
    xywh = torch.cat([frame.boxes[:, :2], frame.boxes[:, 2:] - frame.boxes[:, :2]], 1)[by_id]
    np.testing.assert_allclose(first[["X", "Y", "Width", "Height"]].to_numpy(), xywh.numpy(), atol=0.01)

    summary = mot_summary(hypotheses)
    assert summary["num_switches"].item() == 0, summary
    assert summary["idf1"].item() > 0.95 and summary["mota"].item() > 0.9, summary

    record = json.loads(result.json.read_text())
    assert record["frames"] == FRAMES and record["tracks"] == 2
    assert {d["track_id"] for d in record["detections_per_frame"][20]} == {1, 2}
    capture = cv2.VideoCapture(str(result.annotated))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES
    capture.release()


def test_one_query_reported_with_two_classes_makes_one_track():
    tracker = Tracker()
    box = torch.tensor([[10.0, 10.0, 50.0, 40.0]])
    for step in range(3):
        moved = box + 2 * step
        two_classes = Detections(moved.repeat(2, 1), torch.tensor([0.8, 0.6]), torch.tensor([3, 5]), ["a", "b"])
        tracked = tracker.update(two_classes)
    assert tracked.track_ids.tolist() == [1] and tracked.class_names == ["a"]
    torch.testing.assert_close(tracked.boxes, box + 4, atol=0.5, rtol=0)


def test_detr_scores_start_tracks_from_07_and_low_scores_only_extend_them():
    """RT-DETR's near-duplicate queries reach 0.5-0.6: tracks start from 0.7 and are reported after 3 frames;
    a 0.2 (ByteTrack's second association) continues a track but never starts one."""
    tracker = Tracker()
    sure = torch.tensor([[10.0, 10, 50, 40], [100, 10, 140, 40], [200, 10, 240, 40]])
    found = [tracker.update(Detections(sure + step, torch.tensor([0.75, 0.65, 0.2]), torch.tensor([1, 1, 1]),
                                       ["a"] * 3)) for step in range(3)]  # fmt: skip
    assert [f.track_ids.tolist() for f in found] == [[], [], [1]], "only the 0.75 object, from its third frame"
    weak = Detections(sure[:1] + 3, torch.tensor([0.2]), torch.tensor([1]), ["a"])
    assert tracker.update(weak).track_ids.tolist() == [1]


@pytest.fixture
def one_box_network(monkeypatch):
    """Patch the network to output one confident box at the same place in every frame."""

    def forward(self, images, targets=None):
        b, q, c = images.shape[0], self.decoder.num_queries, self.decoder.num_classes
        logits = torch.full((b, q, c), -10.0)
        logits[:, 0, 1] = 10.0
        return {"pred_logits": logits, "pred_boxes": torch.tensor([0.25, 0.5, 0.2, 0.4]).expand(b, q, 4)}

    monkeypatch.setattr(RTDETRModel, "forward", forward)


def test_track_cli_and_api(tmp_path, crossing_video, one_box_network):
    weights = tmp_path / "tiny.pt"
    RTDETR.from_preset("rtdetr_tiny", num_classes=2, image_size=(128, 128)).save(weights)
    output = tmp_path / "out"
    assert main(["track", str(crossing_video), "--weights", str(weights), "--output", str(output)]) == 0
    lines = (output / "crossing_mot.txt").read_text().splitlines()
    assert len(lines) == FRAMES - 2 and {line.split(",")[1] for line in lines} == {"1"}, "from the third frame"
    # the box (0.25, 0.5, 0.2, 0.4) of a 240x160 frame: left 36, top 48, 48 x 64; MOT pixels count from 1
    assert [float(v) for v in lines[0].split(",")[2:6]] == pytest.approx([37.0, 49.0, 48.0, 64.0], abs=0.01)
    assert (output / "crossing_track.mp4").is_file() and (output / "crossing_tracks.json").is_file()

    result = RTDETR.from_checkpoint(weights).track(crossing_video, tmp_path / "api", batch_size=16)
    assert result.track_ids == [1] and [len(f) for f in result.frames] == [0, 0] + [1] * (FRAMES - 2)


def test_track_cli_names_a_missing_video(tmp_path, capsys):
    assert main(["track", str(tmp_path / "nope.mp4"), "--preset", "rtdetr_tiny", "--output", str(tmp_path)]) == 2
    assert "nope.mp4: no such file" in capsys.readouterr().err
