"""ONNX export: ONNX Runtime against PyTorch (matched detections), metadata, checker, and the self-check."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from rtdetr import RTDETR, ModelConfig
from rtdetr.export.onnx import (
    EndToEndDetector,
    ExportCheckError,
    check_onnx,
    export_onnx,
    matched_max_diff,
    read_metadata,
    twin_share,
)
from rtdetr.inference.onnxruntime import OnnxDetector
from rtdetr.models.hybrid_encoder import RepVggBlock

TOLERANCE = 1e-4  # scores absolute; boxes normalised by the image size


def randomized_model(name: str, seed: int = 0, image_size: tuple[int, int] = (320, 320), **kwargs) -> RTDETR:
    """A random preset that behaves like a trained one where the comparisons need it.

    BatchNorm: random affine parameters, then running statistics measured on random images (O(1) activations;
    with the init statistics the signal fades through the random backbone and every token looks alike, so
    query selection is decided by float noise). The zero-initialised last bbox-head layers and the score heads
    are perturbed so that boxes and scores vary across queries.
    """
    torch.manual_seed(seed)
    model = RTDETR.from_preset(name, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in norms:
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
        model.train()(torch.rand(2, 3, *image_size, generator=g))
        for mlp in [model.decoder.enc_bbox_head, *model.decoder.dec_bbox_head]:
            last = mlp.layers[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.05)
            last.bias.copy_(torch.randn(last.bias.shape, generator=g) * 0.5)
        for head in [model.decoder.enc_score_head, *model.decoder.dec_score_head]:
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.1)
            head.bias.add_(torch.randn(head.bias.shape, generator=g))
    return model.eval()


def random_batch(batch: int, height: int, width: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and (width, height) original sizes that differ per image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, height, width, generator=g)
    sizes = torch.tensor([[640 + 17 * i, 480 - 31 * i] for i in range(batch)], dtype=torch.int64)
    return images, sizes


def assert_onnx_matches(path, model: RTDETR, batch: int, height: int, width: int) -> None:
    """ORT vs the PyTorch eval model (not deployed: export must keep the eval outputs), detection by detection."""
    images, sizes = random_batch(batch, height, width)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["labels", "boxes", "scores"], {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})
    with torch.no_grad():
        expected = EndToEndDetector(model)(images, sizes)
    assert got[0].shape == (batch, 300) and got[1].shape == (batch, 300, 4) and got[2].shape == (batch, 300)
    for i in range(batch):
        scale = float(sizes[i].max())
        compared, score_diff, box_diff = matched_max_diff(
            [t[i] for t in expected], [torch.from_numpy(a[i]) for a in got], box_scale=scale
        )
        assert compared >= 100, "most detections are compared (near-ties at the top-K cut-off are left out)"
        assert score_diff <= TOLERANCE and box_diff <= TOLERANCE, (i, score_diff, box_diff)
        # The check is not trivial: boxes and scores spread out.
        assert expected[1][i].std(0).min() > 0.01 * scale and expected[2][i].std() > 1e-2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[RTDETR, object]:
    model = randomized_model(
        "rtdetr_tiny", num_classes=3, class_names=["cat", "dog", "traffic light"], category_ids=[17, 18, 10]
    )
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx", check=False)
    return model, path


@pytest.mark.parametrize("batch", [1, 2])
def test_tiny_onnx_runtime_matches_pytorch(tiny, batch):
    model, path = tiny
    assert_onnx_matches(path, model, batch, 320, 320)


def test_tiny_non_square_export(tmp_path):
    model = randomized_model("rtdetr_tiny", seed=5)
    path = export_onnx(model, tmp_path / "wide.onnx", image_size=(320, 448), check=False)
    assert read_metadata(path)["image_size"] == "[320, 448]"
    assert_onnx_matches(path, model, 2, 320, 448)


def test_r18vd_onnx_runtime_matches_pytorch(tmp_path):
    # At 320x320 to keep the test short; the spatial size is a constant of the graph, not a code path.
    model = randomized_model("rtdetr_r18vd", seed=7)
    path = export_onnx(model, tmp_path / "r18vd.onnx", image_size=(320, 320), check=False)
    assert_onnx_matches(path, model, 1, 320, 320)
    assert_onnx_matches(path, model, 2, 320, 320)


def graph_ops(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_discrete_core_in_onnx_runtime_equals_pytorch(tmp_path):
    """The gather that replaces GridSample, alone: the same cells in ONNX Runtime, on non-square levels."""
    from rtdetr.models.deform_attn import deformable_attention_core

    class Core(nn.Module):
        def forward(self, v0, v1, locations, weights):
            return deformable_attention_core([v0, v1], locations, weights, [2, 3], method="discrete")

    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 8, 5, 7, generator=g), torch.randn(2, 8, 3, 4, generator=g),
              torch.rand(2, 6, 2, 5, 2, generator=g) * 1.4 - 0.2, torch.rand(2, 6, 2, 5, generator=g))  # fmt: skip
    path = tmp_path / "core.onnx"
    torch.onnx.export(Core(), inputs, str(path), input_names=["v0", "v1", "loc", "w"], dynamo=False)
    assert "GridSample" not in graph_ops(path)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, dict(zip(["v0", "v1", "loc", "w"], (t.numpy() for t in inputs)))
    )[0]
    np.testing.assert_allclose(got, Core()(*inputs).numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, size", [("rtdetr_tiny", (320, 448)), ("rtdetrv2_r18vd", (320, 320))])
def test_discrete_sampling_exports_without_grid_sample(tmp_path, name, size):
    """RT-DETRv2's discrete sampling is a gather: the graph NPUs and old TensorRT versions need. Nearest-cell
    sampling is discontinuous (`twin_share`), so per image at least 95% of the detections must have a twin in
    PyTorch's (same label, score and normalised box within 1e-3); the exact core is checked above."""
    model = randomized_model(name, seed=11, image_size=size, cross_attn_method="discrete", num_points=(1, 2, 3))
    path = export_onnx(model, tmp_path / "dsp.onnx", image_size=size, check=False)
    assert "GridSample" not in graph_ops(path) and "GatherElements" in graph_ops(path)
    images, sizes = random_batch(2, *size)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["labels", "boxes", "scores"], {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})
    with torch.no_grad():
        expected = EndToEndDetector(model)(images, sizes)
    for i in range(2):
        share = twin_share([t[i] for t in expected], [torch.from_numpy(a[i]) for a in got], float(sizes[i].max()), 1e-3)
        assert share >= 0.95, (i, share)
        assert expected[2][i].std() > 1e-2  # not trivial
    assert check_onnx(path, model).twin_share >= 0.95  # the export self-check judges it the same way


def test_twin_share_counts_detections_with_a_twin():
    labels, boxes, scores = torch.tensor([0, 1, 2, 1]), torch.rand(4, 4) * 100, torch.tensor([0.9, 0.8, 0.7, 0.6])
    moved = boxes.clone()
    moved[3] += 5.0  # one box moved 5 px: beyond 1e-3 x 100 px
    relabelled = torch.tensor([0, 1, 0, 1])  # one label changed
    assert twin_share([labels, boxes, scores], [labels, boxes + 0.05, scores + 5e-4], 100.0, 1e-3) == 1.0
    assert twin_share([labels, boxes, scores], [labels, moved, scores], 100.0, 1e-3) == 0.75
    assert twin_share([labels, boxes, scores], [relabelled, boxes, scores], 100.0, 1e-3) == 0.75


def test_bilinear_sampling_exports_grid_sample(tiny):
    assert "GridSample" in graph_ops(tiny[1])


def test_metadata_round_trips_and_checker_passes(tiny):
    model, path = tiny
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    meta = read_metadata(path)
    assert json.loads(meta["class_names"]) == ["cat", "dog", "traffic light"]
    assert json.loads(meta["category_ids"]) == [17, 18, 10]
    assert ModelConfig(**json.loads(meta["model_config"])) == model.config
    assert "no mean/std" in meta["preprocessing"] and "320x320" in meta["preprocessing"]
    detector = OnnxDetector(path)
    assert detector.class_names == ["cat", "dog", "traffic light"] and detector.image_size == (320, 320)


def test_export_leaves_the_callers_model_untouched(tmp_path):
    model = randomized_model("rtdetr_tiny").train()
    export_onnx(model, tmp_path / "m.onnx", check=False)
    assert model.training
    assert all(hasattr(b, "conv1") and not hasattr(b, "conv") for b in model.modules() if isinstance(b, RepVggBlock))
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_self_check_passes_on_a_good_export(tiny):
    model, path = tiny
    result = check_onnx(path, model)
    assert result.passed and result.compared >= 100 and result.max_score_diff <= TOLERANCE


@pytest.mark.parametrize("output, offset", [("scores", 1e-3), ("boxes", 1.0)])
def test_self_check_catches_a_broken_export(tiny, monkeypatch, output, offset):
    model, path = tiny
    real_run = ort.InferenceSession.run

    def off_run(self, names, feeds, *args, **kwargs):
        outputs = real_run(self, names, feeds, *args, **kwargs)
        return [a + np.asarray(offset, a.dtype) if n == output else a for n, a in zip(names, outputs)]

    monkeypatch.setattr(ort.InferenceSession, "run", off_run)
    with pytest.raises(ExportCheckError, match="FAILED"):
        check_onnx(path, model)


def test_export_rejects_a_size_that_is_not_a_multiple_of_32(tiny, tmp_path):
    with pytest.raises(ValueError, match="multiples of 32"):
        export_onnx(tiny[0], tmp_path / "bad.onnx", image_size=(320, 330))


def test_matching_pairs_reordered_near_ties_and_flags_label_mismatches():
    labels = torch.tensor([0, 1, 2, 0])
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2], [3, 3, 9, 9]])
    scores = torch.tensor([0.9, 0.80001, 0.8, 0.1])
    order = [0, 2, 1, 3]
    assert matched_max_diff([labels, boxes, scores], [labels[order], boxes[order], scores[order]]) == (4, 0.0, 0.0)
    relabelled = [torch.tensor([0, 2, 2, 0]), boxes, scores]
    assert matched_max_diff([labels, boxes, scores], relabelled)[1] == float("inf")
    shifted = [labels, boxes, scores + 1e-3]
    assert matched_max_diff([labels, boxes, scores], shifted)[1] == pytest.approx(1e-3, rel=1e-4)


def test_matching_ignores_a_swap_at_the_top_k_cut_off():
    labels, scores = torch.tensor([0, 1, 2]), torch.tensor([0.9, 0.5, 0.1])
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2]])
    # The last detection of `got` is another (query, class) whose score ties the cut-off.
    got = [torch.tensor([0, 1, 1]), boxes.clone(), torch.tensor([0.9, 0.5, 0.10001])]
    got[1][2] = torch.tensor([30.0, 30, 40, 40])
    assert matched_max_diff([labels, boxes, scores], got) == (2, 0.0, 0.0)
    got[2][2] = 0.2  # not a near-tie any more: a real disagreement
    assert matched_max_diff([labels, boxes, scores], got)[1] == float("inf")
