"""The Python API on the facade: fit, evaluate, export, save_pretrained, load_detector, each against the lower
layer it calls (the same numbers must come out of both)."""

from __future__ import annotations

import json

import pytest
import torch

from rtdetr import RTDETR, load_detector
from rtdetr.data.synthetic import generate_coco_dataset
from rtdetr.engine.evaluation import evaluate
from rtdetr.inference.onnxruntime import OnnxDetector
from rtdetr.weights.checkpoint import torch_load

FAST = dict(num_workers=0, device="cpu", eval_batch_size=8, batch_size=4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_coco_dataset(tmp_path_factory.mktemp("shapes"), {"train": 8, "val": 4}, image_size=(64, 64))


@pytest.fixture(scope="module")
def fitted(shapes, tmp_path_factory):
    """A tiny model with 3 classes of its own, fine-tuned on the 5-class shapes data for one epoch."""
    torch.manual_seed(0)
    model = RTDETR.from_preset("rtdetr_tiny", class_names=["a", "b", "c"], image_size=(64, 64), num_queries=20,
                               num_denoising=10)  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = model.fit(shapes, epochs=1, output=str(tmp_path_factory.mktemp("run")), **FAST)
    return model, result, before


def test_fit_leaves_the_best_weights_of_the_run_in_the_model(fitted, shapes):
    model, result, before = fitted
    assert (result.output / "best.pt").is_file() and (result.output / "last.pt").is_file()
    val = json.loads((shapes / "annotations" / "instances_val.json").read_text())
    assert model.class_names == [c["name"] for c in sorted(val["categories"], key=lambda c: c["id"])]
    assert model.config.num_classes == 5 and not model.training
    best = torch_load(result.output / "best.pt")
    assert result.metrics == best["metrics"] and result.best_epoch == best["epoch"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, best["model"][name]), name
    # Fine-tuning trains the backbone too (not frozen): its weights moved away from the starting ones.
    assert not torch.equal(model.backbone.conv1.conv1_1.conv.weight, before["backbone.conv1.conv1_1.conv.weight"])


def test_evaluate_equals_the_engine_on_the_saved_weights(fitted, shapes):
    model, result, _ = fitted
    ours = model.evaluate(shapes, device="cpu", num_workers=0, verbose=False)
    theirs = evaluate(result.output / "best.pt", shapes, device="cpu", num_workers=0, verbose=False)
    assert ours == theirs and ours["AP"] == pytest.approx(result.metrics["AP"])


def test_export_runs_in_onnx_runtime_with_the_model_classes(fitted, tmp_path):
    model, _, _ = fitted
    path = model.export(tmp_path / "model.onnx")  # the self-check against PyTorch runs inside
    detector = load_detector(path)
    assert isinstance(detector, OnnxDetector)
    assert detector.class_names == model.class_names and detector.category_ids == model.category_ids
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ours = model.predict(list(images), score_threshold=0.0)
    onnx = detector.predict(list(images), score_threshold=0.0)
    for a, b in zip(ours, onnx):
        torch.testing.assert_close(a.scores[:20], b.scores[:20], atol=1e-4, rtol=0)


def test_save_pretrained_round_trips_through_a_hugging_face_folder(tmp_path):
    torch.manual_seed(0)
    model = RTDETR.from_preset("rtdetr_r18vd", class_names=["cat", "dog"], num_denoising=0).eval()
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog"}
    back = RTDETR.from_checkpoint(tmp_path / "hf")
    assert back.class_names == ["cat", "dog"]
    images = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(images)["pred_logits"], model(images)["pred_logits"])
