"""Official (lyuwenyu/RT-DETR) checkpoints: unwrap, normalise v2 key names to v1, infer the variant.

Our module names equal the official v1 state_dict names, so an official v1 checkpoint loads as is; the v2
code names a few modules differently and stores some derived buffers (`_V2_RENAMES`, `_DERIVED`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from ..config import PRESETS, ModelConfig, preset
from ..models.backbone import BLOCKS_PER_DEPTH

# Modules the v2 code names differently: (module, child in v1 = ours, child in v2)
_V2_CHILD_NAMES = (
    (r"encoder\.input_proj\.\d+", "0", "conv"),
    (r"encoder\.input_proj\.\d+", "1", "norm"),
    (r"decoder\.enc_output", "0", "proj"),
    (r"decoder\.enc_output", "1", "norm"),
)
_V2_RENAMES = tuple((re.compile(rf"^({module})\.{v2}\."), rf"\1.{v1}.") for module, v1, v2 in _V2_CHILD_NAMES)
_V1_RENAMES = tuple((re.compile(rf"^({module})\.{v1}\."), rf"\1.{v2}.") for module, v1, v2 in _V2_CHILD_NAMES)


def official_v2_name(name: str) -> str:
    """The official v2 name of one of our (= v1) parameter names: `encoder.input_proj.0.1.weight` ->
    `encoder.input_proj.0.norm.weight` (what the v2 configs' parameter-group regexes see)."""
    for pattern, replacement in _V1_RENAMES:
        name = pattern.sub(replacement, name)
    return name
# Derived buffers the v2 code persists: recomputed here from the input size and `num_points`.
_DERIVED = re.compile(r"^decoder\.(anchors|valid_mask|decoder\.layers\.\d+\.cross_attn\.num_points_scale)$")
# RepVGG blocks re-parameterised by the official `deploy()`: conv1/conv2 remain and are what we load.
_DEPLOYED_REPVGG = re.compile(r"\.bottlenecks\.\d+\.conv\.(weight|bias)$")


def unwrap_official(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The model weights of an official training checkpoint: `ema.module` if present, else `model`
    (as the official export and hub code do); a bare state dict is returned unchanged."""
    if isinstance(checkpoint.get("ema"), dict) and isinstance(checkpoint["ema"].get("module"), dict):
        return checkpoint["ema"]["module"]
    if isinstance(checkpoint.get("model"), dict):
        return checkpoint["model"]
    return checkpoint


def normalize_official_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """v1 names for a v1 or v2 state dict: v2 renames undone, derived buffers and deploy-fused RepVGG
    convs dropped, a DistributedDataParallel `module.` prefix stripped."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if _DERIVED.match(key) or _DEPLOYED_REPVGG.search(key):
            continue
        for pattern, replacement in _V2_RENAMES:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out


def _count(state_dict: dict[str, Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state_dict if (m := regex.match(k))})


def _shape(state_dict: dict[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise KeyError(key)
    return tuple(state_dict[key].shape)


def infer_model_config(
    state_dict: dict[str, Tensor], num_points_scale: Tensor | None = None, version: int = 1
) -> ModelConfig:
    """The ModelConfig of an official-named state dict, read off the tensor shapes.

    Starts from the official preset of the same backbone and version (r50: `*_r50vd_m` when the CSP expansion
    is 0.5, which also sets its eval_idx 2) and overrides every field the weights determine. The number of
    attention heads is not visible in the weights: the official 8 is kept. Neither is the v2 cross-attention
    method (a dsp checkpoint has its bilinear parent's tensors): 'default' unless overridden.
    """
    sd = state_dict
    try:
        backbone, base_name = _backbone_fields(sd, version)
        encoder_hidden = _shape(sd, "encoder.input_proj.0.0.weight")[0]
        csp_hidden = _shape(sd, "encoder.fpn_blocks.0.conv1.conv.weight")[0]
        heads = 8
        offsets = _shape(sd, "decoder.decoder.layers.0.cross_attn.sampling_offsets.weight")[0]
        inferred = dict(
            backbone,
            encoder_hidden_dim=encoder_hidden,
            encoder_ffn_dim=_shape(sd, "encoder.encoder.0.layers.0.linear1.weight")[0],
            num_encoder_layers=_count(sd, r"encoder\.encoder\.0\.layers\.(\d+)\."),
            expansion=csp_hidden / encoder_hidden,
            depth_mult=_count(sd, r"encoder\.fpn_blocks\.0\.bottlenecks\.(\d+)\.") / 3,
            hidden_dim=_shape(sd, "decoder.input_proj.0.conv.weight")[0],
            decoder_ffn_dim=_shape(sd, "decoder.decoder.layers.0.linear1.weight")[0],
            num_decoder_layers=_count(sd, r"decoder\.decoder\.layers\.(\d+)\."),
            num_classes=_shape(sd, "decoder.dec_score_head.0.weight")[0],
            num_points=_points_per_level(offsets, heads, num_points_scale),
            version=version,
        )
        if _shape(sd, "decoder.enc_score_head.weight")[0] == 1 and inferred["num_classes"] > 1:
            inferred["query_select_method"] = "agnostic"  # v2: a 1-class encoder score head
    except KeyError as missing:
        raise ValueError(f"not an RT-DETR state dict: tensor {missing} is missing") from None
    if round(inferred["depth_mult"] * 3) == 3:
        inferred["depth_mult"] = 1.0  # keep the official value exactly
    if base_name.endswith("r50vd") and inferred["expansion"] == 0.5:
        base_name += "_m"
    base = preset(base_name)
    if inferred["num_decoder_layers"] <= base.resolved_eval_idx:
        inferred["eval_idx"] = -1
    return base.replace(**inferred)


# HGNetv2 arch by the stem's output channels (official arch tables: L 48, X 64, H 96)
_HGNETV2_BY_STEM = {48: "l", 64: "x", 96: "h"}


def _backbone_fields(sd: dict[str, Tensor], version: int) -> tuple[dict[str, Any], str]:
    """(the backbone's ModelConfig fields, the name of the preset to start from) read off the weights."""
    prefix = "rtdetr" if version == 1 else "rtdetrv2"
    if "backbone.stem.stem1.conv.weight" in sd:  # HGNetv2
        stem = _shape(sd, "backbone.stem.stem4.conv.weight")[0]
        if stem not in _HGNETV2_BY_STEM:
            raise ValueError(f"an HGNetv2 stem of {stem} channels is none of the official L, X, H")
        arch = _HGNETV2_BY_STEM[stem]
        name = f"{prefix}_hgnetv2_{arch}" if f"{prefix}_hgnetv2_{arch}" in PRESETS else f"rtdetrv2_hgnetv2_{arch}"
        return {"use_lab": "backbone.stem.stem1.lab.scale" in sd}, name
    stage_blocks = tuple(_count(sd, rf"backbone\.res_layers\.{i}\.blocks\.(\d+)\.") for i in range(4))
    bottleneck = "backbone.res_layers.0.blocks.0.branch2c.conv.weight" in sd
    depth = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 50 if bottleneck else 34, (3, 4, 23, 3): 101}.get(stage_blocks)
    if depth is None:  # a custom stage layout (not an official model): basic blocks -> 18, bottlenecks -> 50
        depth = 50 if bottleneck else 18
    fields: dict[str, Any] = dict(
        depth=depth,
        stem_channels=_shape(sd, "backbone.conv1.conv1_3.conv.weight")[0],
        stage_channels=tuple(_shape(sd, f"backbone.res_layers.{i}.blocks.0.branch2a.conv.weight")[0] for i in range(4)),
    )
    if stage_blocks != BLOCKS_PER_DEPTH[depth]:
        fields["stage_blocks"] = stage_blocks
    return fields, f"{prefix}_r{depth}vd"


def _points_per_level(offsets: int, heads: int, num_points_scale: Tensor | None) -> tuple[int, ...]:
    """Points per level from v2's persisted `num_points_scale` (1/P_l per point) if given, else equal
    points on the 3 levels from the sampling-offset width heads * 3 * P * 2."""
    if num_points_scale is not None:
        counts = torch.round(1.0 / num_points_scale).to(torch.int64).tolist()
        levels, i = [], 0
        while i < len(counts):
            levels.append(counts[i])
            i += counts[i]
        return tuple(levels)
    return (offsets // (heads * 3 * 2),) * 3


def official_version(state_dict: dict[str, Tensor]) -> int:
    """2 for a checkpoint of the v2 code (`rtdetrv2_pytorch`: v2 module names or the persisted
    `num_points_scale`), else 1. The DDP `module.` prefix is ignored."""
    keys = {k.removeprefix("module.") for k in state_dict}
    v2_names = ("encoder.input_proj.0.conv.weight", "decoder.enc_output.proj.weight",
                "decoder.decoder.layers.0.cross_attn.num_points_scale")  # fmt: skip
    return 2 if any(name in keys for name in v2_names) else 1


def read_official(checkpoint: dict[str, Any]) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(config, v1-named state dict) of an official v1 or v2 checkpoint, or of a bare official state dict."""
    raw = unwrap_official(checkpoint)
    scale = next((v for k, v in raw.items() if k.endswith("decoder.decoder.layers.0.cross_attn.num_points_scale")), None)
    state_dict = normalize_official_state_dict(raw)
    return infer_model_config(state_dict, scale, official_version(raw)), state_dict
