"""Tiled inference: windows, the merge across tile borders, boxes in original-image pixels (scripted detectors on
hand-made images, and RTDETR.predict(tile=) with a patched network), `predict --tile` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import ColorDetector
from PIL import Image, ImageDraw

import rtdetr.cli.predict
from rtdetr import RTDETR
from rtdetr.cli import main
from rtdetr.inference.tiling import TileOptions, predict_tiled, tile_windows
from rtdetr.models.rtdetr import RTDETRModel

RED, BLUE = (255, 0, 0), (0, 0, 255)
CLASSES = {RED: (1, "red"), BLUE: (2, "blue")}
# 400x300 image, 200-px tiles at overlap 0.25: columns at x 0, 100, 200 and rows at y 0, 100 (6 tiles).
RED_BOX = (180, 90, 230, 130)  # crosses the column border x=200 and the row border y=100
BLUE_BOX = (90, 170, 140, 220)  # crosses x=100 and y=200; another class, in tiles the red box is in too


def scene(*objects: tuple[tuple[int, int, int], tuple[int, int, int, int]], size=(400, 300)) -> Image.Image:
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for color, (x0, y0, x1, y1) in objects:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=color)  # PIL includes the last pixel
    return image


def test_windows_cover_the_image_with_the_overlap_and_end_at_the_border():
    assert tile_windows(1000, 500, 320, 0.2) == [
        (0, 0, 320, 320), (227, 0, 547, 320), (453, 0, 773, 320), (680, 0, 1000, 320),
        (0, 180, 320, 500), (227, 180, 547, 500), (453, 180, 773, 500), (680, 180, 1000, 500),
    ]  # fmt: skip
    assert tile_windows(400, 300, 200, 0.25) == [(x, y, x + 200, y + 200) for y in (0, 100) for x in (0, 100, 200)]
    assert tile_windows(150, 90, 200, 0.25) == [(0, 0, 150, 90)], "a side shorter than a tile: one window"
    assert tile_windows(800, 200, 200, 0.0) == [(x, 0, x + 200, 200) for x in (0, 200, 400, 600)]


@pytest.mark.parametrize("merge", ["nmm", "nms"])
def test_an_object_across_tile_borders_comes_out_once_in_image_pixels(merge):
    image = scene((RED, RED_BOX), (BLUE, BLUE_BOX))
    detector = ColorDetector(CLASSES)
    tiles = TileOptions(200, overlap=0.25, merge=merge)
    per_tile = detector.predict([image.crop(w) for w in tile_windows(400, 300, 200, 0.25)], score_threshold=0.0)
    views = sorted(n for d in per_tile for n in d.class_names)
    assert views == ["blue"] * 4 + ["red"] * 6, "the hand-made case: red is in 6 tiles (5 cut it), blue in 4 (3)"

    (found,) = predict_tiled(detector, image, tiles, score_threshold=0.5)
    (whole,) = detector.predict(image)  # the reference: the same detector on the whole image
    by_class = found.labels.argsort()
    assert [found.class_names[i] for i in by_class] == ["red", "blue"] and found.labels[by_class].tolist() == [1, 2]
    assert found.boxes[by_class].tolist() == whole.boxes.tolist() == [list(RED_BOX), list(BLUE_BOX)]
    if merge == "nms":
        assert found.scores.tolist() == pytest.approx([0.9, 0.9]), "NMS keeps the whole view"


def test_tensor_input_and_the_full_frame_pass_for_an_object_larger_than_a_tile():
    big = (20, 40, 370, 120)  # 350 px wide: no 200-px tile sees it whole
    image = scene((RED, big))
    detector = ColorDetector(CLASSES)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    without = predict_tiled(detector, tensor, TileOptions(200, overlap=0.25), score_threshold=0.5)[0]
    assert len(without) == 2, "tiles alone see two pieces that overlap too little to merge"
    calls = detector.calls
    (found,) = predict_tiled(detector, tensor, TileOptions(200, overlap=0.25, full_frame=True), score_threshold=0.5)
    assert detector.calls - calls == 7, "6 tiles and the whole image"
    assert found.boxes.tolist() == [list(big)]


def test_options_are_checked():
    for kwargs, message in (({"size": 8}, "at least 32"), ({"size": 64, "overlap": 1.0}, "fraction"),
                            ({"size": 64, "merge": "wbf"}, "nmm, nms")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            TileOptions(**kwargs)


@pytest.fixture
def centre_box_model(monkeypatch) -> list[tuple[int, int]]:
    """Patch the network to output one confident box in the middle fifth of every input; returns the input
    sizes it saw."""
    sizes: list[tuple[int, int]] = []

    def forward(self, images, targets=None):
        sizes.append(tuple(images.shape[2:]))
        b, q, c = images.shape[0], self.decoder.num_queries, self.decoder.num_classes
        logits = torch.full((b, q, c), -10.0)
        logits[:, 0, 1] = 10.0
        return {"pred_logits": logits, "pred_boxes": torch.tensor([0.5, 0.5, 0.2, 0.2]).expand(b, q, 4)}

    monkeypatch.setattr(RTDETRModel, "forward", forward)
    return sizes


def test_rtdetr_predict_tiled_maps_every_tile_back_to_image_pixels(centre_box_model):
    model = RTDETR.from_preset("rtdetr_tiny", num_classes=2, image_size=(96, 96))
    image = Image.new("RGB", (500, 180))
    (found,) = model.predict(image, tile=TileOptions(200, overlap=0.25), batch_size=2)
    # Columns at x 0, 150, 300 (200 wide), one row of the whole height (180 < 200): each tile's middle fifth.
    expected = [[x + 80, 72, x + 120, 108] for x in (0, 150, 300)]
    torch.testing.assert_close(found.boxes[found.boxes[:, 0].argsort()], torch.tensor(expected, dtype=torch.float32))
    assert centre_box_model == [(96, 96), (96, 96)], "3 tiles at the model's input size, in batches of 2"
    assert model.predict(image, tile=200)[0].boxes.shape == (3, 4), "an int is the tile size"


def test_predict_cli_tile_flags(tmp_path, monkeypatch):
    detector = ColorDetector(CLASSES)
    monkeypatch.setattr(rtdetr.cli.predict, "load_detector", lambda *args, **kwargs: detector)
    scene((RED, RED_BOX), (BLUE, BLUE_BOX)).save(tmp_path / "big.png")
    output = tmp_path / "out"
    arguments = ["predict", str(tmp_path / "big.png"), "--tile", "200", "--overlap", "0.25", "--output", str(output)]
    assert main(arguments) == 0
    (record,) = json.loads((output / "predictions.json").read_text())["images"]
    assert sorted(d["box_xyxy"] for d in record["detections"]) == [list(BLUE_BOX), list(RED_BOX)]
    assert detector.calls == 6
