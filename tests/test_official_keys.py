"""Our presets have exactly the official state_dict names and shapes (key lists of the official checkpoints,
kept in tests/data/)."""

import json
from pathlib import Path

import pytest
import torch

from rtdetr.config import preset
from rtdetr.models.rtdetr import RTDETRModel

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


@pytest.fixture(scope="module")
def storage():
    return torch.empty(max(PARAM_COUNTS.values())[0] + 10**6)


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
    official = pytest.importorskip("rtdetr.weights.official")
    normalize = getattr(official, "normalize_official_state_dict", None)
    if normalize is None:
        pytest.skip("rtdetr.weights.official has no normalize_official_state_dict yet")
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
    official = pytest.importorskip("rtdetr.weights.official")
    normalize = getattr(official, "normalize_official_state_dict", None)
    if normalize is None:
        pytest.skip("rtdetr.weights.official has no normalize_official_state_dict yet")
    sd = distinct_state_dict(official_keys("r18vd"))
    assert list(normalize(sd)) == list(sd)
    prefixed = normalize({f"module.{k}": v for k, v in sd.items()})
    assert list(prefixed) == list(sd) and all(torch.equal(prefixed[k], sd[k]) for k in sd)
