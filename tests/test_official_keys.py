"""Our presets have exactly the official state_dict names and shapes (key lists of the official checkpoints,
kept in tests/data/)."""

import json
import re
from pathlib import Path

import pytest
import torch

from rtdetr.config import preset
from rtdetr import RTDETR
from rtdetr.models.rtdetr import RTDETRModel
from rtdetr.weights.official import normalize_official_state_dict as normalize
from rtdetr.weights.official import official_version, read_official

REFERENCE = Path(__file__).resolve().parent / "data"

# variant -> (parameters, trainable parameters) measured from the official code
PARAM_COUNTS = {
    "r18vd": (20_184_464, 20_184_464),
    "r34vd": (31_441_668, 31_441_668),
    "r50vd_m": (36_593_772, 36_565_260),
    "r50vd": (42_891_372, 42_862_860),
    "r101vd": (76_556_268, 76_527_756),
}


def official_keys(name: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(s)) for k, s in json.loads((REFERENCE / f"official_keys_{name}.json").read_text())]


def distinct_state_dict(
    keys: list[tuple[str, tuple[int, ...]]], storage: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Tensors of exactly these shapes whose values differ from key to key (tensor i holds random values in
    [i, i + 1)), so a tensor loaded under the wrong name shows. Float tensors are views into `storage` when
    given (reusing memory keeps the 76M-value models fast)."""
    g = torch.Generator().manual_seed(0)
    sd, offset = {}, 0
    for i, (key, shape) in enumerate(keys):
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(i, dtype=torch.int64).reshape(shape)
        elif key.endswith("valid_mask"):
            sd[key] = torch.rand(shape, generator=g) > 0.5
        else:
            n = torch.Size(shape).numel()
            t = storage[offset : offset + n].view(shape) if storage is not None else torch.empty(shape)
            offset += n
            sd[key] = t.uniform_(i, i + 1, generator=g)
    return sd


# official v2 key list -> (our preset, overrides, parameters, trainable parameters) measured from the official code
V2_MODELS = {
    "v2_r18vd": ("rtdetrv2_r18vd", {}, 20_184_464, 20_184_464),
    "v2_r18vd_sp1": ("rtdetrv2_r18vd", {"num_points": (1, 1, 1)}, None, None),
    "v2_r50vd": ("rtdetrv2_r50vd", {}, 42_891_372, 42_862_860),
    "v2_hgnetv2_l": ("rtdetrv2_hgnetv2_l", {}, 32_925_036, 32_900_108),
    "v2_hgnetv2_x": ("rtdetrv2_hgnetv2_x", {}, 67_374_188, 67_348_748),
    "v2_hgnetv2_h": ("rtdetrv2_hgnetv2_h", {}, 125_584_348, 125_527_756),
}


@pytest.fixture(scope="module")
def storage():
    return torch.empty(125_584_348 + 10**6)


@pytest.fixture(scope="module", params=list(PARAM_COUNTS))
def variant(request):
    name = request.param
    torch.manual_seed(0)
    return name, RTDETRModel(preset(f"rtdetr_{name}"))


def test_names_and_shapes_equal_official(variant):
    name, model = variant
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = dict(official_keys(name))
    assert sorted(set(ref) - set(ours)) == [], "missing"
    assert sorted(set(ours) - set(ref)) == [], "extra"
    assert {k: s for k, s in ours.items() if ref[k] != s} == {}, "shape mismatch"
    assert len(ours) == len(official_keys(name))


def test_state_dict_order_equals_official(variant):
    """Same order too (optimizer states and positional tools depend on it; BottleNeck registers `short` last)."""
    name, model = variant
    assert list(model.state_dict()) == [k for k, _ in official_keys(name)]


def test_parameter_counts_equal_official(variant):
    name, model = variant
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (total, trainable) == PARAM_COUNTS[name]


def test_official_state_dict_loads_strictly(variant, storage):
    name, model = variant
    sd = distinct_state_dict(official_keys(name), storage)
    model.load_state_dict(sd, strict=True)
    loaded = model.state_dict()
    for key, value in sd.items():
        assert torch.equal(loaded[key], value), key


def test_normalized_v2_state_dict_loads_into_r18vd():
    v2 = distinct_state_dict(official_keys("v2_r18vd"))
    for i in range(3):
        v2[f"decoder.decoder.layers.{i}.cross_attn.num_points_scale"] = torch.full((12,), 0.25)
    sd = normalize(v2)
    v1 = official_keys("r18vd")
    assert {k: tuple(v.shape) for k, v in sd.items()} == dict(v1)
    # renamed tensors keep their values
    assert torch.equal(sd["encoder.input_proj.1.0.weight"], v2["encoder.input_proj.1.conv.weight"])
    assert torch.equal(sd["encoder.input_proj.2.1.running_var"], v2["encoder.input_proj.2.norm.running_var"])
    assert torch.equal(sd["decoder.enc_output.0.weight"], v2["decoder.enc_output.proj.weight"])
    assert torch.equal(sd["decoder.enc_output.1.bias"], v2["decoder.enc_output.norm.bias"])
    model = RTDETRModel(preset("rtdetr_r18vd"))
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.state_dict()["decoder.enc_output.1.weight"], v2["decoder.enc_output.norm.weight"])


def test_normalize_is_identity_on_v1_names_and_strips_ddp_prefix():
    sd = distinct_state_dict(official_keys("r18vd"))
    assert list(normalize(sd)) == list(sd)
    prefixed = normalize({f"module.{k}": v for k, v in sd.items()})
    assert list(prefixed) == list(sd) and all(torch.equal(prefixed[k], sd[k]) for k in sd)


@pytest.mark.parametrize("name", V2_MODELS)
def test_official_v2_key_lists_load_strictly_into_the_v2_presets(name, storage):
    """Every official v2 parameter list (derived anchors / valid_mask / num_points_scale included), with
    distinct values, loads strictly into its preset, each tensor under its own name; counts equal."""
    preset_name, overrides, params, trainable = V2_MODELS[name]
    torch.manual_seed(0)
    model = RTDETRModel(preset(preset_name, **overrides))
    if params is not None:
        counts = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad))
        assert counts == (params, trainable)
    keys = official_keys(name)
    raw = distinct_state_dict(keys, storage)
    sd = normalize(raw)
    model.load_state_dict(sd, strict=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    dropped = {k for k, _ in keys} - set(sd) - {k for k in raw if ".input_proj." in k or ".enc_output." in k}
    assert all(re.search(r"anchors|valid_mask|num_points_scale", k) for k in dropped), dropped


@pytest.mark.parametrize("name", ["v2_r18vd", "v2_r18vd_sp1", "v2_hgnetv2_l"])
def test_v2_config_is_read_off_the_weights(name):
    keys = official_keys(name)
    raw = {k: torch.zeros(s) for k, s in keys}
    points = 1 if name.endswith("sp1") else 4
    for k in raw:
        if k.endswith("num_points_scale"):
            raw[k] = torch.full(raw[k].shape, 1.0 / points)
    config, _ = read_official({"ema": {"module": raw}})
    preset_name, overrides, _, _ = V2_MODELS[name]
    assert config == preset(preset_name, **overrides)
    assert config.version == 2 and config.num_points == (points,) * 3


@pytest.mark.parametrize("v1, v2", [("r18vd", "v2_r18vd"), ("r50vd", "v2_r50vd")])
def test_a_v1_and_a_v2_checkpoint_of_the_same_backbone_are_told_apart(v1, v2):
    first = {k: torch.zeros(s) for k, s in official_keys(v1)}
    second = {k: torch.zeros(s) for k, s in official_keys(v2)}
    second.update({k: torch.full(v.shape, 0.25) for k, v in second.items() if k.endswith("num_points_scale")})
    assert (official_version(first), official_version(second)) == (1, 2)
    assert read_official(first)[0] == preset(f"rtdetr_{v1}")
    assert read_official(second)[0] == preset(f"rtdetrv2_{v1}")
    # a DDP-prefixed v2 state dict is still v2
    assert official_version({f"module.{k}": v for k, v in second.items()}) == 2


def test_a_dsp_file_loads_discrete_and_the_override_wins(tmp_path, caplog):
    """A dsp checkpoint has its bilinear parent's tensors: 'dsp' in the file name selects discrete sampling
    (with a warning saying so), `cross_attn_method=` overrides either way, and the two really differ."""
    torch.manual_seed(0)
    parent = RTDETRModel(preset("rtdetrv2_r18vd"))
    with torch.no_grad():
        for layer in parent.decoder.decoder.layers:
            layer.cross_attn.sampling_offsets.bias.mul_(1.37)  # off the cell centres
            layer.cross_attn.attention_weights.weight.normal_(0, 0.2)
        for head in parent.decoder.dec_score_head:
            head.weight.normal_(0, 0.2)
    state = {k.replace("enc_output.0", "enc_output.proj").replace("enc_output.1", "enc_output.norm"): v
             for k, v in parent.state_dict().items()}  # fmt: skip
    for i in range(3):
        state[f"decoder.decoder.layers.{i}.cross_attn.num_points_scale"] = torch.full((12,), 0.25)
    torch.save({"ema": {"module": state}}, tmp_path / "rtdetrv2_r18vd_dsp_3x_coco.pth")
    torch.save({"ema": {"module": state}}, tmp_path / "rtdetrv2_r18vd_120e_coco.pth")
    with caplog.at_level("WARNING"):
        dsp = RTDETR.from_checkpoint(tmp_path / "rtdetrv2_r18vd_dsp_3x_coco.pth")
    assert dsp.config.cross_attn_method == "discrete" and "dsp" in caplog.text
    assert RTDETR.from_checkpoint(tmp_path / "rtdetrv2_r18vd_120e_coco.pth").config.cross_attn_method == "default"
    bilinear = RTDETR.from_checkpoint(tmp_path / "rtdetrv2_r18vd_dsp_3x_coco.pth", cross_attn_method="default")
    forced = RTDETR.from_checkpoint(tmp_path / "rtdetrv2_r18vd_120e_coco.pth", cross_attn_method="discrete")
    assert bilinear.config.cross_attn_method == "default" and forced.config.cross_attn_method == "discrete"
    images = torch.rand(1, 3, 320, 320)
    with torch.no_grad():
        a, b, c = (m(images)["pred_logits"] for m in (dsp, forced, bilinear))
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3
