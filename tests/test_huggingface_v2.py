"""Parity with Hugging Face transformers' RT-DETRv2 (`RTDetrV2ForObjectDetection`), an independent implementation.

HF v2 is HF v1 with a v2 cross-attention: `decoder_method` ('default' bilinear | 'discrete' nearest cell, each
axis clamped into its map), `decoder_offset_scale`, one `decoder_n_points` for every level, and a persistent
`n_points_scale` buffer. Random HF models (nothing is downloaded; redrawn by `randomize_` so no output is
trivial) read through the public path give HF's detections per query at square and non-square sizes, and our
models written as HF v2 folders give ours in HF. The helpers are those of tests/test_huggingface.py.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    RTDetrForObjectDetection,
    RTDetrResNetConfig,
    RTDetrV2Config,
    RTDetrV2ForObjectDetection,
)

from test_huggingface import (  # noqa: E402
    assert_same_outputs,
    assert_same_tensors,
    config_differences,
    hf_config,
    randomize_,
)  # noqa: E402
from rtdetr import RTDETR  # noqa: E402
from rtdetr.config import PRESETS, ModelConfig, preset  # noqa: E402
from rtdetr.models.rtdetr import RTDETRModel  # noqa: E402
from rtdetr.weights.hf_names import hf_to_official, official_to_hf, points_scale_tensors  # noqa: E402
from rtdetr.weights.huggingface import (  # noqa: E402
    fit_to_model,
    hf_config_from_model_config,
    model_config_from_hf,
    read_hf_folder,
    save_hf_folder,
)

V2_FIELDS = ("decoder_n_levels", "decoder_method", "decoder_offset_scale")


def hf_v2_config(name: str, **changes: object) -> RTDetrV2Config:
    """The HF v2 config of preset `name` as HF's conversion script builds it (not via our converter)."""
    if name == "rtdetrv2_r18vd":
        backbone = RTDetrResNetConfig(
            depths=[2, 2, 2, 2], layer_type="basic", hidden_sizes=[64, 128, 256, 512], out_indices=[2, 3, 4]
        )
        return RTDetrV2Config(
            backbone_config=backbone, encoder_in_channels=[128, 256, 512], hidden_expansion=0.5, decoder_layers=3,
            num_labels=80, **changes,
        )  # fmt: skip
    return RTDetrV2Config(num_labels=80, **changes)  # HF's defaults are the r50vd


@functools.cache
def hf_v2_model(name: str, method: str = "default", points: int = 4, scale: float = 0.5) -> RTDetrV2ForObjectDetection:
    """A randomised HF v2 model, built once per setting (backbone norms frozen, HF's default)."""
    torch.manual_seed(0)
    config = hf_v2_config(name, decoder_method=method, decoder_n_points=points, decoder_offset_scale=scale)
    return randomize_(RTDetrV2ForObjectDetection(config), seed=1)


class InFloat64(nn.Module):
    """A copy of `model` run in float64, inputs cast. Discrete sampling picks cell int(x * W + 0.5): a point
    within float32 noise (~1e-7) of a cell boundary lands in another cell in HF than in ours (measured: about
    one of the 86k samples of an r18 image per decoder layer), which moves its query by up to 1e-2. In float64
    the noise is ~1e-16 and no sample is that close; the computation compared is the same."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).double().eval()

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor):
        return self.model(*(a.double() for a in args), **{k: v.double() for k, v in kwargs.items()})


def compared(ours: nn.Module, hf: nn.Module, method: str) -> tuple[nn.Module, nn.Module]:
    return (InFloat64(ours), InFloat64(hf)) if method == "discrete" else (ours, hf)


def expected_config(name: str, method: str, points: int, scale: float) -> ModelConfig:
    return preset(name, cross_attn_method=method, num_points=(points,) * 3, offset_scale=scale)


@pytest.mark.parametrize(
    ("name", "method", "points", "scale", "sizes"),
    [
        ("rtdetrv2_r18vd", "default", 4, 0.5, [(1, 640, 640), (1, 480, 640)]),
        ("rtdetrv2_r18vd", "discrete", 4, 0.5, [(1, 640, 640), (1, 640, 384)]),
        ("rtdetrv2_r18vd", "default", 2, 0.5, [(1, 640, 640), (1, 640, 384)]),
        ("rtdetrv2_r18vd", "discrete", 2, 0.75, [(1, 480, 640)]),
        ("rtdetrv2_r50vd", "default", 4, 0.5, [(1, 640, 640), (1, 640, 384)]),
    ],
)
def test_hf_v2_folder_gives_hf_outputs_in_our_model(
    name: str, method: str, points: int, scale: float, sizes: list, tmp_path
) -> None:
    """save_pretrained -> RTDETR.from_checkpoint(folder): HF's config read as our v2 preset, HF's detections."""
    hf = hf_v2_model(name, method, points, scale)
    hf.save_pretrained(tmp_path)
    assert any(k.endswith("encoder_attn.n_points_scale") for k in load_file(tmp_path / "model.safetensors"))
    ours = RTDETR.from_checkpoint(tmp_path)
    assert config_differences(ours.config, expected_config(name, method, points, scale)) == {}
    assert_same_outputs(*compared(ours, hf, method), sizes)


def test_our_v2_weights_give_our_outputs_in_hf(tmp_path) -> None:
    """Discrete sampling, 2 points per level: saved with save_hf_folder, loaded by RTDetrV2 with nothing missing."""
    config = preset("rtdetrv2_r18vd", cross_attn_method="discrete", num_points=(2, 2, 2))
    torch.manual_seed(2)
    ours = randomize_(RTDETRModel(config), seed=3)
    save_hf_folder(ours, config, tmp_path)
    hf, info = RTDetrV2ForObjectDetection.from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # nothing missing, unexpected, mis-shaped
    assert (hf.config.model_type, hf.config.decoder_method, hf.config.decoder_n_points) == ("rt_detr_v2", "discrete", 2)
    assert_same_outputs(*compared(ours, hf, "discrete"), [(1, 640, 640), (1, 640, 384)])
    assert config_differences(read_hf_folder(tmp_path)[0], config) == {}


def test_v1_and_v2_folders_told_apart(tmp_path) -> None:
    """The same weights in a v1 and a v2 folder: version 1 and 2, the v2 options read only from the v2 one."""
    hf = hf_v2_model("rtdetrv2_r18vd", "discrete", 4)
    hf.save_pretrained(tmp_path / "v2")
    (tmp_path / "v1").mkdir()
    v1_dict = {**hf_config("rtdetr_r18vd").to_dict(), "architectures": ["RTDetrForObjectDetection"]}
    (tmp_path / "v1" / "config.json").write_text(json.dumps(v1_dict))
    weights = {k: v for k, v in load_file(tmp_path / "v2" / "model.safetensors").items() if "n_points_scale" not in k}
    save_file(weights, tmp_path / "v1" / "model.safetensors")
    v1, v2 = read_hf_folder(tmp_path / "v1")[0], read_hf_folder(tmp_path / "v2")[0]
    assert (v1.version, v1.cross_attn_method) == (1, "default")
    assert (v2.version, v2.cross_attn_method) == (2, "discrete")
    assert config_differences(v1, PRESETS["rtdetr_r18vd"]) == {}
    # The folder's tensors equal the in-memory conversion (HF 5.x names, tied top-level heads held twice).
    in_memory = fit_to_model(hf_to_official(hf.state_dict()), v2)
    assert_same_tensors(read_hf_folder(tmp_path / "v2")[1], in_memory)
    # The v1 folder loads in HF v1 (bilinear) and our model reads it the same way.
    hf_v1 = RTDetrForObjectDetection.from_pretrained(tmp_path / "v1").eval()
    assert_same_outputs(RTDETR.from_checkpoint(tmp_path / "v1"), hf_v1, [(1, 320, 480)])


@pytest.mark.parametrize(
    "config",
    [
        *(PRESETS[n] for n in ("rtdetrv2_r18vd", "rtdetrv2_r34vd", "rtdetrv2_r50vd", "rtdetrv2_r101vd")),
        preset("rtdetrv2_r18vd", cross_attn_method="discrete", num_points=(3, 3, 3)),
        preset("rtdetrv2_r50vd", offset_scale=0.25, num_points=(1, 1, 1)),
    ],
    ids=["r18vd", "r34vd", "r50vd", "r101vd", "r18vd_dsp_3pt", "r50vd_scale_1pt"],
)
def test_v2_names_shapes_and_config_round_trip(config: ModelConfig) -> None:
    """config -> HF config.json -> config is the identity; HF v2 builds from it exactly our tensors (meta)."""
    hf_dict = hf_config_from_model_config(config)
    assert (hf_dict["model_type"], hf_dict["architectures"]) == ("rt_detr_v2", ["RTDetrV2ForObjectDetection"])
    with torch.device("meta"):
        hf = RTDetrV2ForObjectDetection(RTDetrV2Config.from_dict(json.loads(json.dumps(hf_dict))))
        ours = RTDETRModel(config)
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}  # noqa: E731
    # Without HF's top-level copies of the tied heads (meta tensors cannot be compared for equality).
    hf_state = {k: v for k, v in hf.state_dict().items() if k.startswith("model.")}
    scales = points_scale_tensors(config.num_points[0], config.num_decoder_layers)
    assert shapes({**official_to_hf(ours.state_dict()), **scales}) == shapes(hf_state)
    assert shapes(hf_to_official(hf_state)) == shapes(ours.state_dict())
    assert config_differences(model_config_from_hf(hf_dict), config) == {}
    assert config_differences(model_config_from_hf(hf.config.to_dict()), config) == {}


def test_v1_configs_keep_the_v1_folder() -> None:
    """v1 configs write exactly the v1 config.json; a v2-only option on a v1 config writes a v2 one."""
    v1 = hf_config_from_model_config(PRESETS["rtdetr_r18vd"])
    v2 = hf_config_from_model_config(PRESETS["rtdetrv2_r18vd"])
    assert (v1["model_type"], v1["architectures"]) == ("rt_detr", ["RTDetrForObjectDetection"])
    assert not set(V2_FIELDS) & v1.keys()
    assert {k: v for k, v in v2.items() if k not in V2_FIELDS} == {
        **v1, "model_type": "rt_detr_v2", "architectures": ["RTDetrV2ForObjectDetection"]
    }  # fmt: skip
    for option in ({"cross_attn_method": "discrete"}, {"offset_scale": 1.0}):
        written = hf_config_from_model_config(PRESETS["rtdetr_r18vd"].replace(**option))
        assert written["model_type"] == "rt_detr_v2"
        assert model_config_from_hf(written) == PRESETS["rtdetrv2_r18vd"].replace(**option)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_points": (4, 4, 2)}, "num_points"),
        ({"query_select_method": "one2many"}, "query_select_method"),
        ({"query_select_method": "agnostic"}, "query_select_method"),
        ({"eval_idx": 1}, "eval_idx"),
    ],
)
def test_v2_models_hf_cannot_express_raise(changes: dict, field: str, tmp_path) -> None:
    config = PRESETS["rtdetrv2_r18vd"].replace(**changes)
    with pytest.raises(ValueError, match=field):
        hf_config_from_model_config(config)
    with pytest.raises(ValueError, match=field):
        save_hf_folder(RTDETRModel(config), config, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written
    with pytest.raises(ValueError, match="backbone"):
        hf_config_from_model_config(PRESETS["rtdetrv2_hgnetv2_l"])


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"decoder_method": "bilinear"}, "decoder_method"),
        ({"decoder_n_levels": 4}, "decoder_n_levels"),
        ({"decoder_n_points": [4, 4, 2]}, "decoder_n_points"),
        ({"decoder_offset_scale": "half"}, "decoder_offset_scale"),
        ({"model_type": "rt_detr_v3"}, "model_type"),
        ({"architectures": ["RTDetrForObjectDetection"]}, "model_type"),
    ],
)
def test_unsupported_hf_v2_settings_raise(changes: dict, field: str) -> None:
    hf_dict = {**hf_config_from_model_config(PRESETS["rtdetrv2_r18vd"]), **changes}
    with pytest.raises(ValueError, match=rf"some/config\.json.*{field}"):
        model_config_from_hf(hf_dict, source="some/config.json")


def test_stored_points_scale_must_match_the_points(tmp_path) -> None:
    """Our model recomputes n_points_scale from decoder_n_points: a stored one that disagrees raises."""
    config = PRESETS["rtdetrv2_r18vd"]
    save_hf_folder(RTDETRModel(config), config, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    key = "model.decoder.layers.1.encoder_attn.n_points_scale"
    assert torch.equal(weights[key], torch.full((12,), 0.25))
    weights[key] = torch.full((12,), 0.5)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors.*layers\.1\.encoder_attn\.n_points_scale"):
        read_hf_folder(tmp_path)
