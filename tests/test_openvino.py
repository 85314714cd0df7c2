"""OpenVINO IR export: OpenVINO against PyTorch (matched detections), explicit precision, metadata, the
self-check, the OpenVINO detector behind `predict` and `load_detector`, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest
import torch
from test_onnx_export import random_batch, randomized_model  # the tests folder is on sys.path

from rtdetr import RTDETR, load_detector
from rtdetr.cli import main
from rtdetr.export import openvino as openvino_export
from rtdetr.export.onnx import EndToEndDetector, ExportCheckError, matched_max_diff
from rtdetr.export.openvino import (
    check_openvino, compile_ir, export_openvino, openvino_core, read_ir_metadata, run_compiled, runtime_precision,
)  # fmt: skip
from rtdetr.config import native_bf16
from rtdetr.inference.openvino import OpenVinoDetector

TOLERANCE = 1e-4  # scores absolute; boxes normalised by the image size (as the ONNX export)
NAMES, IDS = ["cat", "dog", "traffic light"], [17, 18, 10]


def assert_openvino_matches(path, model: RTDETR, batch: int, height: int, width: int) -> None:
    """The IR in OpenVINO (fp32) vs the PyTorch eval model, detection by detection, on a batch of random images."""
    images, sizes = random_batch(batch, height, width)
    compiled = compile_ir(path, "fp32", batch_size=batch)
    got = run_compiled(compiled, {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})
    with torch.no_grad():
        expected = EndToEndDetector(model)(images, sizes)
    for i in range(batch):
        scale = float(sizes[i].max())
        compared, score_diff, box_diff = matched_max_diff(
            [t[i] for t in expected], [torch.from_numpy(a[i]) for a in got], box_scale=scale
        )
        assert compared >= 100, "most detections are compared (near-ties at the top-K cut-off are left out)"
        assert score_diff <= TOLERANCE and box_diff <= TOLERANCE, (i, score_diff, box_diff)
        assert expected[1][i].std(0).min() > 0.01 * scale and expected[2][i].std() > 1e-2  # not trivial


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[RTDETR, object]:
    model = randomized_model("rtdetr_tiny", num_classes=3, class_names=NAMES, category_ids=IDS)
    path = export_openvino(model, tmp_path_factory.mktemp("ov") / "tiny", check=False)
    return model, path


@pytest.mark.parametrize("batch", [1, 2])
def test_tiny_openvino_matches_pytorch(tiny, batch):
    model, path = tiny
    assert_openvino_matches(path, model, batch, 320, 320)


def test_r18vd_openvino_matches_pytorch(tmp_path):
    model = randomized_model("rtdetr_r18vd", seed=7)
    path = export_openvino(model, tmp_path / "r18vd", image_size=(320, 320), check=False)
    assert_openvino_matches(path, model, 1, 320, 320)


def test_fp32_is_fp32_weights_and_f32_inference_on_any_cpu(tiny, tmp_path):
    """OpenVINO's two silent defaults are off: weights are not compressed to fp16, and the CPU plugin does not
    run bf16 although this CPU may have bf16 instructions (its default there)."""
    model, path = tiny
    assert real_constants(path) == {ov.Type.f32}
    assert runtime_precision(compile_ir(path, "fp32")) == "f32"
    fp16 = export_openvino(model, tmp_path / "fp16", precision="fp16", check=False)
    assert ov.Type.f16 in real_constants(fp16)
    assert fp16.with_suffix(".bin").stat().st_size < 0.6 * path.with_suffix(".bin").stat().st_size


def real_constants(path) -> set:
    """The element types of an IR's floating-point constants (its weights)."""
    return {op.get_element_type() for op in openvino_core().read_model(str(path)).get_ordered_ops()
            if op.get_type_name() == "Constant" and op.get_element_type().is_real()}  # fmt: skip


@pytest.mark.skipif(not native_bf16("cpu"), reason="bf16 inference needs a CPU with AVX512-BF16 or AMX")
def test_bf16_export_runs_bf16_and_is_reported_not_gated(tiny, tmp_path):
    model, _ = tiny
    path = export_openvino(model, tmp_path / "bf16", precision="bf16", check=False)
    assert read_ir_metadata(path)["precision"] == "bf16"
    assert runtime_precision(compile_ir(path, "bf16")) == "bf16"
    result = check_openvino(path, model)
    assert not result.gated and result.passed and "reported" in str(result)
    assert result.twin_share is not None and result.twin_share > 0.2  # bf16 moves scores, it keeps many detections


def test_metadata_round_trips(tiny):
    model, path = tiny
    meta = read_ir_metadata(path.parent)  # the folder works as well as the .xml
    assert json.loads(meta["class_names"]) == NAMES and json.loads(meta["category_ids"]) == IDS
    assert json.loads(meta["image_size"]) == [320, 320] and meta["precision"] == "fp32"
    assert "no mean/std" in meta["preprocessing"] and "f32" in meta["inference"]
    converted = openvino_core().read_model(str(path))
    assert [i.get_any_name() for i in converted.inputs] == ["images", "orig_target_sizes"]
    assert [o.get_any_name() for o in converted.outputs] == ["labels", "boxes", "scores"]


def test_detector_predicts_as_pytorch(tiny):
    model, path = tiny
    detector = load_detector(path.parent)
    assert isinstance(detector, OpenVinoDetector) and isinstance(load_detector(path), OpenVinoDetector)
    images = [torch.rand(3, 240, 300, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    expected = model.predict(images, score_threshold=0.05)
    got = detector.predict(images, score_threshold=0.05, batch_size=2)  # batches of 2 and 1: two compiled shapes
    assert sorted(detector.compiled) == [1, 2]
    for e, g in zip(expected, got):
        assert len(e) > 5 and g.class_names == e.class_names and set(g.labels.tolist()) <= set(IDS)
        assert torch.allclose(g.scores, e.scores, atol=TOLERANCE) and torch.allclose(g.boxes, e.boxes, atol=0.05)
    with pytest.raises(ValueError, match="export again with --precision"):
        detector.predict(images, amp="bf16")


def test_self_check_passes_and_catches_a_broken_ir(tiny, monkeypatch):
    model, path = tiny
    result = check_openvino(path, model)
    assert result.passed and result.gated and result.max_score_diff <= TOLERANCE and "OpenVINO fp32" in str(result)
    real = openvino_export.run_compiled
    monkeypatch.setattr(openvino_export, "run_compiled",
                        lambda compiled, feeds: [a + np.float32(1e-3) if a.dtype == np.float32 and a.ndim == 2 else a
                                                 for a in real(compiled, feeds)])  # fmt: skip
    with pytest.raises(ExportCheckError, match="FAILED"):
        check_openvino(path, model)


def test_missing_ir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.xml"):
        OpenVinoDetector(tmp_path)


def test_cli_exports_an_ir_folder(tmp_path, capsys):
    weights = tmp_path / "tiny.pt"
    randomized_model("rtdetr_tiny", num_classes=3, class_names=NAMES, category_ids=IDS).save(weights)
    argv = ["export", "--weights", str(weights), "--img-size", "128", "--output"]
    assert main([*argv, str(tmp_path / "ir"), "--format", "openvino"]) == 0
    out = capsys.readouterr().out
    assert "OpenVINO fp32 vs PyTorch" in out and "passed" in out
    assert (tmp_path / "ir" / "model.xml").is_file() and (tmp_path / "ir" / "model.bin").is_file()
    assert main([*argv, str(tmp_path / "m.onnx"), "--format", "onnx", "--precision", "bf16"]) == 2
    assert "use --format openvino" in capsys.readouterr().err
