"""Parity with Hugging Face transformers' RT-DETR, an independent implementation (facts section 10).

HF equals the official model on eval outputs with `eval_size=None`, and gives each token its true (row,
column) on non-square inputs, as we do: converted weights must give the same detections at 640 x 640 and at
non-square sizes. Models are random (nothing is downloaded), redrawn so that no output is trivial.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("transformers")
from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig  # noqa: E402

from rtdetr import RTDETR
from rtdetr.config import PRESETS, ModelConfig  # noqa: E402
from rtdetr.weights.hf_names import hf_to_official, official_to_hf  # noqa: E402
from rtdetr.weights.huggingface import (  # noqa: E402
    fit_to_model,
    hf_config_from_model_config,
    model_config_from_hf,
    read_hf_folder,
    save_hf_folder,
)
from rtdetr.models.rtdetr import RTDETRModel  # noqa: E402
from rtdetr.ops.boxes import inverse_sigmoid  # noqa: E402

ATOL = 1e-4
# (batch, height, width) per variant: square and non-square inputs
SIZES = {
    "rtdetr_r18vd": [(2, 640, 640), (1, 480, 640), (1, 640, 384)],
    "rtdetr_r50vd": [(1, 640, 640), (1, 640, 384)],
}
# transformers 4.x checkpoint names (what 5.x still writes to disk), from its conversion_mapping.py renames
LEGACY_NAMES = [
    (r"\.o_proj\.", ".out_proj."),
    (r"\.layers\.(\d+)\.mlp\.fc([12])\.", r".layers.\1.fc\2."),
    (r"^model\.encoder\.aifi\.", "model.encoder.encoder."),
]


def hf_config(name: str) -> RTDetrConfig:
    """The HF config of a preset as HF's own conversion script builds it (not via our converter)."""
    if name == "rtdetr_r18vd":
        backbone = RTDetrResNetConfig(
            depths=[2, 2, 2, 2], layer_type="basic", hidden_sizes=[64, 128, 256, 512], out_indices=[2, 3, 4]
        )
        return RTDetrConfig(
            backbone_config=backbone, encoder_in_channels=[128, 256, 512], hidden_expansion=0.5, decoder_layers=3,
            num_labels=80,
        )  # fmt: skip
    return RTDetrConfig(num_labels=80)  # HF's defaults are the r50vd


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Redraw every parameter and BatchNorm statistic, the same way for HF and us, so no output is trivial.

    HF's init draws BatchNorm weights from N(0, 0.01), so features vanish and every query ties, and zero-
    initialised heads (box deltas, sampling offsets, attention weights) would hide mapping errors. Here:
    BatchNorm (also frozen) weight U(0.5, 1.5), bias N(0, 0.1), running mean N(0, 0.1), running var
    U(0.5, 1.5); LayerNorm weights U(0.5, 1.5); matrices N(0, 1/fan_in) (activations keep their scale);
    biases N(0, 0.1). The bias of `enc_output`'s Linear is zeroed: invalid border anchors have their memory
    zeroed, so they share one score; at the score head's bias it sits mid-pack instead of possibly
    flooding the top-K with hundreds of identical queries.
    """
    g = torch.Generator().manual_seed(seed)
    uniform = lambda t: torch.rand(t.shape, generator=g) + 0.5  # noqa: E731
    normal = lambda t, std: std * torch.randn(t.shape, generator=g)  # noqa: E731
    norms = [m for m in model.modules() if getattr(m, "running_var", None) is not None]
    for norm in norms:
        norm.weight.copy_(uniform(norm.weight))
        norm.bias.copy_(normal(norm.bias, 0.1))
        norm.running_mean.copy_(normal(norm.running_mean, 0.1))
        norm.running_var.copy_(uniform(norm.running_var))
    done = {id(t) for m in norms for t in (m.weight, m.bias)}
    for name, param in model.named_parameters():
        if id(param) in done:
            continue
        if param.dim() >= 2:
            param.copy_(normal(param, param[0].numel() ** -0.5))
        else:
            param.copy_(uniform(param) if name.endswith("weight") else normal(param, 0.1))
    next(m for name, m in model.named_modules() if name.endswith("enc_output.0")).bias.zero_()
    return model.eval()


def assert_not_trivial(logits: Tensor, boxes: Tensor) -> None:
    """Boxes spread in every coordinate (measured in logit space: widths near 0 vary by ratios), varied
    logits, and queries far apart compared with ATOL (so matching them is unambiguous)."""
    spread = inverse_sigmoid(boxes).std(dim=0)
    assert spread.min() > 0.05, f"boxes barely differ: logit-space std per coordinate {spread.tolist()}"
    assert logits.std() > 0.5, "logits barely differ"
    rows = torch.cat([logits, boxes], dim=-1)
    gaps = torch.cdist(rows, rows, p=math.inf).fill_diagonal_(math.inf)
    assert gaps.min() > 10 * ATOL, f"two queries are nearly identical (distance {gaps.min().item():.2e})"


def assert_same_detections(ours: dict[str, Tensor], logits: Tensor, boxes: Tensor) -> tuple[float, float]:
    """Each of our queries matched one-to-one to HF's nearest (logits, box) row; the max abs differences.

    Queries come out in top-K order, and scores equal up to float rounding may swap places: rows are
    matched, not compared by index.
    """
    worst_logit = worst_box = 0.0
    for b in range(len(boxes)):
        mine = torch.cat([ours["pred_logits"][b], ours["pred_boxes"][b]], dim=-1)
        theirs = torch.cat([logits[b], boxes[b]], dim=-1)
        assert_not_trivial(ours["pred_logits"][b], ours["pred_boxes"][b])
        match = torch.cdist(mine, theirs, p=math.inf).argmin(dim=1)
        assert match.unique().numel() == len(match), "our queries do not match HF's one-to-one"
        diff = (mine - theirs[match]).abs()
        worst_logit = max(worst_logit, diff[:, :-4].max().item())
        worst_box = max(worst_box, diff[:, -4:].max().item())
    assert max(worst_logit, worst_box) <= ATOL, f"max abs diff: logits {worst_logit:.2e}, boxes {worst_box:.2e}"
    return worst_logit, worst_box


def assert_same_outputs(ours: nn.Module, hf: RTDetrForObjectDetection, sizes: list[tuple[int, int, int]]) -> None:
    for batch, height, width in sizes:
        images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(height + width))
        with torch.no_grad():
            mine, theirs = ours(images), hf(pixel_values=images)
        diffs = assert_same_detections(mine, theirs.logits, theirs.pred_boxes)
        print(f"{batch}x{height}x{width}: max abs diff logits {diffs[0]:.2e}, boxes {diffs[1]:.2e}")


def assert_same_tensors(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def config_differences(a: ModelConfig, b: ModelConfig) -> dict[str, tuple]:
    return {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(ModelConfig)
            if getattr(a, f.name) != getattr(b, f.name)}  # fmt: skip


@functools.cache
def hf_model(name: str) -> RTDetrForObjectDetection:
    """A randomised HF model of preset `name`, built once. Its backbone norms are frozen (HF's default, as in
    the published checkpoints), so they store no BatchNorm counters."""
    torch.manual_seed(0)
    return randomize_(RTDetrForObjectDetection(hf_config(name)), seed=1)


@pytest.mark.parametrize("name", ["rtdetr_r18vd", "rtdetr_r50vd"])
def test_hf_weights_give_hf_outputs_in_our_model(name: str) -> None:
    config = PRESETS[name]
    ours = RTDETRModel(config).eval()
    ours.load_state_dict(fit_to_model(hf_to_official(hf_model(name).state_dict()), config), strict=True)
    assert_same_outputs(ours, hf_model(name), SIZES[name])


@pytest.mark.parametrize("name", ["rtdetr_r18vd", "rtdetr_r50vd"])
def test_read_hf_folder_of_save_pretrained(name: str, tmp_path) -> None:
    hf = hf_model(name)
    hf.save_pretrained(tmp_path / "safetensors")
    config, state_dict, class_names = read_hf_folder(tmp_path / "safetensors")
    assert config_differences(config, PRESETS[name]) == {}
    assert class_names is None  # HF's placeholder names LABEL_i
    # Equal to the in-memory conversion, whose outputs match HF's (test above).
    assert_same_tensors(state_dict, fit_to_model(hf_to_official(hf.state_dict()), config))
    RTDETRModel(config).load_state_dict(state_dict, strict=True)

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "safetensors" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert_same_tensors(read_hf_folder(tmp_path / "bin")[1], state_dict)


@pytest.mark.parametrize("name", ["rtdetr_r18vd", "rtdetr_r50vd"])
def test_transformers_4_names_read_as_5(name: str) -> None:
    """4.x checkpoints use out_proj / fc1 / encoder.encoder.N and may hold the tied heads twice."""
    state_dict = hf_model(name).state_dict()
    legacy = {}
    for key, value in state_dict.items():
        for pattern, replacement in LEGACY_NAMES:
            key = re.sub(pattern, replacement, key)
        legacy[key] = value
        if key.startswith(("model.decoder.class_embed.", "model.decoder.bbox_embed.")):
            legacy[key.removeprefix("model.decoder.")] = value
    assert legacy.keys() != state_dict.keys()
    assert_same_tensors(hf_to_official(legacy), hf_to_official(state_dict))


def test_api_from_checkpoint_on_hf_folder(tmp_path) -> None:
    from rtdetr.api import RTDETR

    hf_model("rtdetr_r18vd").save_pretrained(tmp_path)
    assert_same_outputs(RTDETR.from_checkpoint(tmp_path), hf_model("rtdetr_r18vd"), [(1, 640, 640)])


@pytest.mark.parametrize("name", ["rtdetr_r18vd", "rtdetr_r50vd"])
def test_our_weights_give_our_outputs_in_hf(name: str, tmp_path) -> None:
    config = PRESETS[name]
    torch.manual_seed(2)
    ours = randomize_(RTDETRModel(config), seed=3)
    class_names = [f"thing {i}" for i in range(config.num_classes)]
    save_hf_folder(ours, config, tmp_path, class_names)
    hf, info = RTDetrForObjectDetection.from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # nothing missing, unexpected, mis-shaped
    assert hf.config.id2label[3] == "thing 3"
    assert_same_outputs(ours, hf.eval(), [(1, 640, 640), (1, 640, 384)])
    config_back, _, names_back = read_hf_folder(tmp_path)
    assert config_differences(config_back, config) == {} and names_back == class_names


@pytest.mark.parametrize("name", ["rtdetr_r18vd", "rtdetr_r34vd", "rtdetr_r50vd", "rtdetr_r101vd"])
def test_names_shapes_and_config_round_trip(name: str) -> None:
    """Every tensor of every exportable preset has its HF twin of the same shape, and back (meta tensors)."""
    config = PRESETS[name]
    hf_dict = hf_config_from_model_config(config)
    with torch.device("meta"):
        hf = RTDetrForObjectDetection(RTDetrConfig.from_dict(json.loads(json.dumps(hf_dict))))
        ours = RTDETRModel(config)
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}  # noqa: E731
    assert shapes(official_to_hf(ours.state_dict())) == shapes(hf.state_dict())
    assert shapes(hf_to_official(hf.state_dict())) == shapes(ours.state_dict())
    assert config_differences(model_config_from_hf(hf_dict), config) == {}
    assert config_differences(model_config_from_hf(hf.config.to_dict()), config) == {}


@pytest.mark.parametrize(
    ("name", "field"), [("rtdetr_r50vd_m", "eval_idx"), ("rtdetr_tiny", "depth_mult")]
)  # fmt: skip
def test_models_hf_cannot_express_raise(name: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        hf_config_from_model_config(PRESETS[name])


def _backbone(**changes: object) -> dict:
    backbone = hf_config_from_model_config(PRESETS["rtdetr_r18vd"])["backbone_config"]
    return {"backbone_config": {**backbone, **changes}}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"learn_initial_query": True}, "learn_initial_query"),
        ({"with_box_refine": False}, "with_box_refine"),
        ({"model_type": "rt_detr_v2"}, "model_type"),
        ({"backbone": "resnet50", "use_timm_backbone": True}, "backbone"),
        ({"normalize_before": True}, "normalize_before"),
        ({"num_feature_levels": 4}, "num_feature_levels"),
        ({"encode_proj_layers": [1, 2]}, "encode_proj_layers"),
        ({"decoder_in_channels": [128, 128, 128]}, "decoder_in_channels"),
        ({"decoder_n_points": [4, 4, 4]}, "decoder_n_points"),
        (_backbone(model_type="resnet"), "model_type"),
        (_backbone(downsample_in_bottleneck=True), "downsample_in_bottleneck"),
        (_backbone(out_indices=[1, 2, 3]), "out_indices"),
        (_backbone(embedding_size=32), "embedding_size"),
    ],
)
def test_unsupported_hf_settings_raise(changes: dict, field: str) -> None:
    hf_dict = {**hf_config_from_model_config(PRESETS["rtdetr_r18vd"]), **changes}
    with pytest.raises(ValueError, match=rf"some/config\.json.*{field}"):
        model_config_from_hf(hf_dict, source="some/config.json")


def test_read_hf_folder_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(NotADirectoryError, match="nowhere"):
        read_hf_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        read_hf_folder(tmp_path)
    hf_dict = hf_config_from_model_config(PRESETS["rtdetr_r18vd"])
    (tmp_path / "config.json").write_text(json.dumps(hf_dict))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        read_hf_folder(tmp_path)
    torch.save({"classifier.weight": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*classifier\.weight"):
        read_hf_folder(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    save_hf_folder(RTDETRModel(PRESETS["rtdetr_r18vd"]), PRESETS["rtdetr_r18vd"], tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**hf_dict, "decoder_layers": 2}))
    with pytest.raises(ValueError, match=r"model\.safetensors.*unexpected: decoder\.dec_bbox_head\.2"):
        RTDETR.from_checkpoint(tmp_path)  # the weights are checked against the model when loaded
