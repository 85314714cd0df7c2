"""int8 post-training quantisation (NNCF): on a trained tiny model the int8 IR keeps PyTorch's detections and its
AP within the gate, the decoder ops its split names stay float, and the AP gate rejects a bad quantisation."""

from __future__ import annotations

import re
import sys

import onnx
import pytest
import torch
from PIL import Image

from rtdetr import RTDETR, load_detector
from rtdetr.cli import main
from rtdetr.engine.evaluation import evaluate
from rtdetr.export.openvino import openvino_core
from rtdetr.export.quantize import DEFAULT_SPLIT, SPLITS, calibration_images, export_int8, quantized_layers
from rtdetr.ops.boxes import box_iou

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def int8_ir(trained_tiny, tmp_path_factory):
    weights, data = trained_tiny
    model = RTDETR.from_checkpoint(weights)
    return model, export_int8(model, tmp_path_factory.mktemp("int8") / "ir", calibration=data), data


def test_int8_keeps_the_trained_models_ap_and_detections(int8_ir):
    model, path, data = int8_ir
    detector = load_detector(path)
    reference = evaluate(model, data, "val", device="cpu", verbose=False, class_names=model.class_names,
                         category_ids=model.category_ids)["AP"]  # fmt: skip
    got = evaluate(detector, data, "val", verbose=False)["AP"]
    assert reference > 0.3, "the fixture's model detects something"
    assert (reference - got) * 100 <= 1.0, (reference, got)  # the gate: at most 1 AP point
    images = sorted((data / "train").glob("*.jpg"))
    found = kept = 0
    # PyTorch's confident detections, each found by int8 among its detections above a lower threshold (scores move
    # a little under int8: one at 0.41 may come out at 0.39)
    for expected, quantized in zip(model.predict(images, score_threshold=0.5), detector.predict(images, 0.3)):
        found += len(expected)
        if len(expected) and len(quantized):
            same = (box_iou(expected.boxes, quantized.boxes)[0] >= 0.8) & (expected.labels[:, None] == quantized.labels)
            kept += int(same.any(1).sum())
    assert found >= 10 and kept >= 0.9 * found, (kept, found)


def test_the_decoder_ops_of_the_split_stay_float(int8_ir):
    _, path, _ = int8_ir
    layers = quantized_layers(openvino_core().read_model(str(path)))
    patterns = SPLITS[DEFAULT_SPLIT].float_patterns
    kept_float = {name for name in layers if any(re.fullmatch(p, name) for p in patterns)}
    # sampling offsets + attention weights per layer, score and box heads, query selection: all present
    for part in ("sampling_offsets", "attention_weights", "dec_score_head", "dec_bbox_head", "enc_score_head"):
        assert any(part in name for name in kept_float), part
    assert not any(layers[name] for name in kept_float), sorted(n for n in kept_float if layers[n])
    # ... and the rest is int8: every backbone convolution, the decoder's FFNs
    assert all(quantized for name, quantized in layers.items() if "/backbone/" in name)
    assert all(layers[name] for name in layers if re.search(r"/decoder/layers\.\d+/linear[12]/", name))


def test_onnx_int8_is_a_qdq_graph_with_the_split_in_float(trained_tiny, tmp_path):
    weights, data = trained_tiny
    model = RTDETR.from_checkpoint(weights)
    path = export_int8(model, tmp_path / "int8.onnx", calibration_images(data, (96, 96), 16), fmt="onnx")
    graph = onnx.load(str(path)).graph
    produced_by = {out: node for node in graph.node for out in node.output}
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)
    offsets = [n for n in graph.node if "sampling_offsets" in n.name and n.op_type == "MatMul"]
    convs = [n for n in graph.node if "/backbone/" in n.name and n.op_type == "Conv"]
    assert offsets and convs
    assert not any(produced_by.get(i) is not None and produced_by[i].op_type == "DequantizeLinear"
                   for n in offsets for i in n.input)  # fmt: skip
    assert all(any(produced_by.get(i) is not None and produced_by[i].op_type == "DequantizeLinear" for i in n.input)
               for n in convs)  # fmt: skip
    dets = load_detector(path).predict(sorted((data / "train").glob("*.jpg"))[:2], score_threshold=0.4)
    assert sum(len(d) for d in dets) > 0


def test_the_ap_gate_rejects_a_bad_quantisation(trained_tiny, tmp_path, capsys):
    """Everything int8 and calibrated on black images: the activation ranges are wrong, the AP collapses, and
    export refuses, keeping the artifact as `.rejected`."""
    weights, data = trained_tiny
    black = tmp_path / "black"
    black.mkdir()
    for i in range(4):
        Image.new("RGB", (96, 96)).save(black / f"{i}.png")
    output = tmp_path / "bad"
    argv = ["export", "--weights", str(weights), "--format", "openvino", "--int8", "--int8-split", "all",
            "--calibration", str(black), "--verify", str(data), "--output", str(output)]  # fmt: skip
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "rejected" in captured.err and "--max-ap-drop" in captured.err and "PyTorch fp32" in captured.out
    assert not output.exists() and (tmp_path / "bad.rejected" / "model.xml").is_file()


def test_the_ap_gate_passes_a_good_quantisation(trained_tiny, tmp_path, capsys):
    weights, data = trained_tiny
    output = tmp_path / "good"
    argv = ["export", "--weights", str(weights), "--format", "openvino", "--int8", "--verify", str(data),
            "--calibration-images", "8", "--output", str(output)]  # fmt: skip
    assert main(argv) == 0
    assert "AP points" in capsys.readouterr().out and (output / "model.xml").is_file()


def test_int8_without_calibration_or_nncf_is_a_clear_error(trained_tiny, tmp_path, monkeypatch, capsys):
    weights, _ = trained_tiny
    argv = ["export", "--weights", str(weights), "--format", "openvino", "--int8", "--output", str(tmp_path / "x")]
    assert main(argv) == 2 and "--calibration DIR" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "nncf", None)  # as if NNCF were not installed
    images = [torch.rand(3, 96, 96)]
    with pytest.raises(ValueError, match=r"pip install 'rtdetr\[int8\]'"):
        export_int8(RTDETR.from_checkpoint(weights), tmp_path / "y", images)
