"""`rtdetr eval` of exported artifacts: an fp32 .onnx file and an OpenVINO IR score as their checkpoint does."""

from __future__ import annotations

import json

import pytest

from rtdetr import RTDETR
from rtdetr.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def metrics_of(weights, data, output) -> dict:
    assert main(["eval", "--weights", str(weights), "--data", str(data), "--output", str(output)]) == 0
    return json.loads((output / "metrics.json").read_text())


@pytest.fixture(scope="module")
def checkpoint_metrics(trained_tiny, tmp_path_factory) -> dict:
    weights, data = trained_tiny
    return metrics_of(weights, data, tmp_path_factory.mktemp("eval_pt"))


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_eval_of_the_fp32_export_equals_eval_of_the_checkpoint(trained_tiny, checkpoint_metrics, tmp_path, fmt):
    weights, data = trained_tiny
    artifact = RTDETR.from_checkpoint(weights).export(tmp_path / ("m.onnx" if fmt == "onnx" else "ir"), format=fmt)
    got = metrics_of(artifact, data, tmp_path / "eval")
    assert checkpoint_metrics["AP"] > 0.3, "the fixture's model detects something"
    for key in ("AP", "AP50", "AP75"):
        assert abs(got[key] - checkpoint_metrics[key]) <= 1e-3, (key, got[key], checkpoint_metrics[key])
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert predictions and {p["category_id"] for p in predictions} <= {1, 2, 3, 4, 5}


def test_eval_of_an_artifact_refuses_amp(trained_tiny, tmp_path, capsys):
    weights, data = trained_tiny
    artifact = RTDETR.from_checkpoint(weights).export(tmp_path / "m.onnx")
    argv = ["eval", "--weights", str(artifact), "--data", str(data), "--amp", "bf16", "--output", str(tmp_path / "e")]
    assert main(argv) == 2 and "precision it was exported with" in capsys.readouterr().err
