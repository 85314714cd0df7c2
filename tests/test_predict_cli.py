"""`rtdetr predict` end to end (in-process): odd image files, batching, videos, ONNX weights, deploy mode and
the --decoder-layers knob."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import png_declaring
from PIL import Image
from test_onnx_export import randomized_model  # the tests folder is on sys.path (pytest rootdir-relative import)

from rtdetr import RTDETR
from rtdetr.cli import main
from rtdetr.export.onnx import sample_image as sample_image_path
from rtdetr.export.onnx import export_onnx, matched_max_diff
from rtdetr import load_detector
from rtdetr.models.rtdetr import RTDETRModel
from rtdetr.postprocess import Detections

NAMES, IDS = ["cat", "dog", "kite"], [17, 18, 38]
BOX = (0.25, 0.5, 0.2, 0.4)  # the patched model's one box: normalised cx, cy, w, h
LABEL = 2  # ... of class "kite"


def expected_box(width: int, height: int) -> list[float]:
    cx, cy, w, h = BOX
    return [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]


@pytest.fixture
def one_box_model(monkeypatch) -> list[int]:
    """Patch the network to output one confident box at BOX per image; returns the batch sizes it was called with."""
    batches: list[int] = []

    def forward(self, images, targets=None):
        batches.append(images.shape[0])
        b, q, c = images.shape[0], self.decoder.num_queries, self.decoder.num_classes
        logits = torch.full((b, q, c), -10.0)
        logits[:, 0, LABEL] = 10.0
        return {"pred_logits": logits, "pred_boxes": torch.tensor(BOX).expand(b, q, 4)}

    monkeypatch.setattr(RTDETRModel, "forward", forward)
    return batches


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    randomized_model("rtdetr_tiny", seed=11, class_names=NAMES, category_ids=IDS).save(path)
    return path


@pytest.fixture(scope="module")
def onnx_file(checkpoint) -> Path:
    return export_onnx(RTDETR.from_checkpoint(checkpoint), checkpoint.with_suffix(".onnx"), check=False)


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> Path:
    """A corrupt file, a grayscale PNG, an RGBA PNG and a JPEG stored 64x32 with EXIF 'rotate 90' (shown 32x64)."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "corrupt.jpg").write_bytes(b"this is not a JPEG")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 48), dtype=np.uint8), "L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (60, 100, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image must be rotated 90 degrees clockwise for display
    Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(folder / "rotated.jpg", exif=exif)
    return folder


def run_predict(tmp_path: Path, *args: str) -> dict:
    output = tmp_path / "out"
    assert main(["predict", *args, "--output", str(output)]) == 0
    return json.loads((output / "predictions.json").read_text())


def coco_detections(output: Path) -> dict[int, list[torch.Tensor]]:
    """predictions_coco.json -> {image_id: [category ids, boxes xyxy, scores]}."""
    per_image: dict[int, list] = {}
    for r in json.loads((output / "predictions_coco.json").read_text()):
        x, y, w, h = r["bbox"]
        per_image.setdefault(r["image_id"], []).append((r["category_id"], [x, y, x + w, y + h], r["score"]))
    return {
        i: [torch.tensor([d[0] for d in dets]), torch.tensor([d[1] for d in dets]), torch.tensor([d[2] for d in dets])]
        for i, dets in per_image.items()
    }


def as_triplet(dets: Detections) -> list[torch.Tensor]:
    return [dets.labels, dets.boxes, dets.scores]


def test_odd_files_are_read_upright_batched_and_the_bad_one_reported(tmp_path, odd_images, checkpoint, one_box_model):
    result = run_predict(tmp_path, str(odd_images), "--weights", str(checkpoint), "--batch-size", "4")
    assert one_box_model == [3], "the three readable images go through the network as one batch"
    assert [Path(f["file"]).name for f in result["failed"]] == ["corrupt.jpg"]
    sizes = {Path(r["file"]).name: (r["width"], r["height"]) for r in result["images"]}
    assert sizes == {"gray.png": (48, 80), "rgba.png": (100, 60), "rotated.jpg": (32, 64)}
    for record in result["images"]:
        (det,) = record["detections"]
        assert det["class_name"] == "kite" and det["category_id"] == 38
        assert det["box_xyxy"] == pytest.approx(expected_box(*sizes[Path(record["file"]).name]), abs=0.01)
        assert Path(record["annotated"]).is_file()
    coco = json.loads((tmp_path / "out" / "predictions_coco.json").read_text())
    assert len(coco) == 3 and {r["category_id"] for r in coco} == {38}


def test_a_decompression_bomb_is_reported_and_the_run_goes_on(tmp_path, odd_images, checkpoint, one_box_model):
    """Regression: PIL's DecompressionBombError used to end the whole run with a traceback and no JSON."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a_bomb.png").write_bytes(png_declaring(20000, 20000))
    (folder / "b_gray.png").write_bytes((odd_images / "gray.png").read_bytes())
    result = run_predict(tmp_path, str(folder), "--weights", str(checkpoint))
    assert [Path(r["file"]).name for r in result["images"]] == ["b_gray.png"]
    (failure,) = result["failed"]
    assert Path(failure["file"]).name == "a_bomb.png" and "pixels" in failure["error"]


def test_glob_pattern_and_missing_file(tmp_path, odd_images, checkpoint, one_box_model):
    result = run_predict(
        tmp_path, str(odd_images / "*.png"), str(odd_images / "missing.jpg"), "--weights", str(checkpoint)
    )
    assert sorted(Path(r["file"]).name for r in result["images"]) == ["gray.png", "rgba.png"]
    assert [Path(f["file"]).name for f in result["failed"]] == ["missing.jpg"]


def test_only_unreadable_files_fail_with_a_report(tmp_path, odd_images, checkpoint):
    output = tmp_path / "out"
    assert main(["predict", str(odd_images / "corrupt.jpg"), "--weights", str(checkpoint), "--output", str(output)]) == 1
    result = json.loads((output / "predictions.json").read_text())
    assert result["images"] == [] and [Path(f["file"]).name for f in result["failed"]] == ["corrupt.jpg"]


def test_video_is_annotated_frame_by_frame_at_the_same_fps(tmp_path, checkpoint, one_box_model):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 7.0, (96, 64))
    for i in range(5):
        writer.write(np.full((64, 96, 3), 40 * i, dtype=np.uint8))
    writer.release()
    result = run_predict(tmp_path, str(video), "--weights", str(checkpoint), "--batch-size", "2")
    assert one_box_model == [2, 2, 1]
    (record,) = result["videos"]
    assert record["frames"] == 5 and record["fps"] == pytest.approx(7.0)
    for (det,) in record["detections_per_frame"]:
        assert det["box_xyxy"] == pytest.approx(expected_box(96, 64), abs=0.01)
    capture = cv2.VideoCapture(record["annotated"])
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(7.0)
    frames = 0
    while capture.read()[0]:
        frames += 1
    assert frames == 5


def test_onnx_weights_give_the_checkpoints_detections(tmp_path, odd_images, checkpoint, onnx_file):
    sources = [str(sample_image_path()), str(odd_images / "rgba.png"), str(odd_images / "rotated.jpg")]
    common = ["--score-threshold", "0", "--max-detections", "30", "--batch-size", "2"]
    outputs = {}
    for name, weights in [("pt", checkpoint), ("onnx", onnx_file)]:
        run_predict(tmp_path / name, *sources, "--weights", str(weights), *common)
        outputs[name] = coco_detections(tmp_path / name / "out")
    assert sorted(outputs["onnx"]) == [1, 2, 3]
    for image_id, expected in outputs["pt"].items():
        compared, score_diff, box_diff = matched_max_diff(expected, outputs["onnx"][image_id], box_scale=640.0)
        assert compared >= 20 and score_diff <= 1e-4 and box_diff <= 1e-4, (image_id, compared, score_diff, box_diff)


def test_deploy_mode_predicts_like_eval_mode(checkpoint):
    deployed = load_detector(checkpoint, device="cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules()), "load_detector deploys"
    reference = RTDETR.from_checkpoint(checkpoint)
    image = sample_image_path()
    got, expected = (m.predict(image, 0.0, max_detections=50)[0] for m in (deployed, reference))
    compared, score_diff, box_diff = matched_max_diff(as_triplet(expected), as_triplet(got), box_scale=640.0)
    assert compared >= 40 and score_diff <= 1e-4 and box_diff <= 1e-4


def test_decoder_layers_gives_that_layers_head(tmp_path, checkpoint):
    image = sample_image_path()
    run_predict(tmp_path, str(image), "--weights", str(checkpoint), "--decoder-layers", "1",
                "--score-threshold", "0", "--max-detections", "30")  # fmt: skip
    got = coco_detections(tmp_path / "out")[1]
    full = RTDETR.from_checkpoint(checkpoint)
    last_layer = full.predict(image, 0.0, max_detections=30)[0]
    full.decoder.eval_idx = 0
    first_layer = full.predict(image, 0.0, max_detections=30)[0]
    compared, score_diff, box_diff = matched_max_diff(as_triplet(first_layer), got, box_scale=640.0)
    assert compared >= 20 and score_diff <= 1e-4 and box_diff <= 1e-4
    assert matched_max_diff(as_triplet(last_layer), got, box_scale=640.0)[1] > 1e-2, "the layers differ"


def test_onnx_weights_refuse_decoder_layers_and_other_sizes(tmp_path, onnx_file):
    with pytest.raises(ValueError, match="fixed at export"):
        load_detector(onnx_file, num_decoder_layers=1)
    assert main(["predict", str(sample_image_path()), "--weights", str(onnx_file), "--img-size", "640",
                 "--output", str(tmp_path / "out")]) == 2  # fmt: skip


def test_bf16_autocast_runs_the_network_in_bf16(tmp_path, checkpoint, monkeypatch):
    seen = []
    forward = RTDETRModel.forward

    def spy(self, images, targets=None):
        out = forward(self, images, targets)
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out["pred_boxes"].dtype))
        return out

    monkeypatch.setattr(RTDETRModel, "forward", spy)
    records = run_predict(tmp_path, str(sample_image_path()), "--weights", str(checkpoint), "--amp", "bf16",
                          "--score-threshold", "0", "--max-detections", "5")  # fmt: skip
    assert seen == [(True, torch.bfloat16, torch.bfloat16)]
    record = records["images"][0]
    boxes = torch.tensor([d["box_xyxy"] for d in record["detections"]])
    # fp32 post-processing of sigmoid boxes: cx, w in [0, 1], so x1 = (cx - w/2) * W in [-W/2, W] and x2 in [0, 3W/2]
    scale = torch.tensor([record["width"], record["height"]] * 2)
    assert len(boxes) == 5 and ((boxes / scale >= -0.5) & (boxes / scale <= 1.5)).all()
    assert ((boxes[:, :2] / scale[:2] <= 1.0) & (boxes[:, 2:] / scale[2:] >= 0.0)).all()


def test_bf16_features_are_close_to_fp32(checkpoint):
    model = load_detector(checkpoint)
    image = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = model.backbone(image)
        reference += model.encoder(reference)
        with torch.autocast("cpu", torch.bfloat16):
            low = model.backbone(image)
            low += model.encoder(low)
    errors = [((got.float() - ref).norm() / ref.norm()).item() for ref, got in zip(reference, low)]
    assert all(got.dtype == torch.bfloat16 for got in low)
    # bf16 rounds every op to ~2^-9 relative; the error compounds with depth on random weights: 2.5% after the
    # backbone's first 7 convs, 11% at the encoder's last output (fp32 everywhere would give 0).
    assert 0 < errors[0] < 0.05 and max(errors) < 0.25, errors


def test_onnx_weights_refuse_autocast(tmp_path, onnx_file):
    with pytest.raises(ValueError, match="runs as exported"):
        load_detector(onnx_file).predict(sample_image_path(), amp="bf16")
