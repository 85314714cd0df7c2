"""Hugging Face `RTDetrForObjectDetection` and `RTDetrV2ForObjectDetection` tensor names <-> our (official v1)
names.

HF splits every self-attention `in_proj` into q/k/v projections and renames most modules (see `_RULES`).
Two HF naming generations exist: the in-memory names of transformers 5.x (`self_attn.o_proj`, `mlp.fc1`,
`encoder.aifi.N`) and the checkpoint names of transformers 4.x (`out_proj`, `fc1`, `encoder.encoder.N`), which
transformers 5.x still writes in `save_pretrained` and renames on load. Both are read; folders are written
with the checkpoint names (`checkpoint_names`), so transformers 4.x and 5.x both load them.

RTDetrV2 has the same names (transformers maps "rt_detr_v2" to the "rt_detr" renames) plus one persistent
buffer per decoder layer, `model.decoder.layers.N.encoder_attn.n_points_scale` (1 / n_points for each point),
which our model recomputes (`num_points_scale`, not persistent): `hf_to_official` drops it, `points_scale_tensors`
makes it for writing, and `points_scale_buffers` lists it for checking.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

# Names with {placeholders}: {leaf} is a parameter name (no dot), {rest} any tail, every other one an index.
_PLACEHOLDER_PATTERNS = {"leaf": r"[A-Za-z_]+", "rest": r".+"}


def _conv_norm(official: str, hf: str) -> list[tuple[str, str]]:
    """An official ConvNormLayer (conv, norm) and HF's ResNet conv layer (convolution, normalization)."""
    return [
        (f"{official}.conv.{{leaf}}", f"{hf}.convolution.{{leaf}}"),
        (f"{official}.norm.{{leaf}}", f"{hf}.normalization.{{leaf}}"),
    ]


_BLOCK = "backbone.res_layers.{stage}.blocks.{block}"
_HF_BLOCK = "model.backbone.model.encoder.stages.{stage}.layers.{block}"
_AIFI = "encoder.encoder.{aifi}.layers.{layer}"
_HF_AIFI = "model.encoder.aifi.{aifi}.layers.{layer}"
_DEC = "decoder.decoder.layers.{layer}"
_HF_DEC = "model.decoder.layers.{layer}"

# (official name, HF 5.x name). Self-attention `in_proj_*` stands for HF's q/k/v projections joined.
_RULES: list[tuple[str, str]] = [
    *_conv_norm("backbone.conv1.conv1_1", "model.backbone.model.embedder.embedder.0"),
    *_conv_norm("backbone.conv1.conv1_2", "model.backbone.model.embedder.embedder.1"),
    *_conv_norm("backbone.conv1.conv1_3", "model.backbone.model.embedder.embedder.2"),
    *_conv_norm(f"{_BLOCK}.branch2a", f"{_HF_BLOCK}.layer.0"),
    *_conv_norm(f"{_BLOCK}.branch2b", f"{_HF_BLOCK}.layer.1"),
    *_conv_norm(f"{_BLOCK}.branch2c", f"{_HF_BLOCK}.layer.2"),
    *_conv_norm(f"{_BLOCK}.short.conv", f"{_HF_BLOCK}.shortcut.1"),  # AvgPool + 1x1 conv (variant D, stride 2)
    *_conv_norm(f"{_BLOCK}.short", f"{_HF_BLOCK}.shortcut"),  # stride-1 projection (first stage)
    ("encoder.input_proj.{level}.{index}.{leaf}", "model.encoder_input_proj.{level}.{index}.{leaf}"),
    (f"{_AIFI}.self_attn.out_proj.{{leaf}}", f"{_HF_AIFI}.self_attn.o_proj.{{leaf}}"),
    (f"{_AIFI}.self_attn.{{leaf}}", f"{_HF_AIFI}.self_attn.{{leaf}}"),
    (f"{_AIFI}.linear1.{{leaf}}", f"{_HF_AIFI}.mlp.fc1.{{leaf}}"),
    (f"{_AIFI}.linear2.{{leaf}}", f"{_HF_AIFI}.mlp.fc2.{{leaf}}"),
    (f"{_AIFI}.norm1.{{leaf}}", f"{_HF_AIFI}.self_attn_layer_norm.{{leaf}}"),
    (f"{_AIFI}.norm2.{{leaf}}", f"{_HF_AIFI}.final_layer_norm.{{leaf}}"),
    *[(f"encoder.{m}.{{rest}}", f"model.encoder.{m}.{{rest}}") for m in ("lateral_convs", "fpn_blocks")],
    *[(f"encoder.{m}.{{rest}}", f"model.encoder.{m}.{{rest}}") for m in ("downsample_convs", "pan_blocks")],
    ("decoder.input_proj.{level}.conv.{leaf}", "model.decoder_input_proj.{level}.0.{leaf}"),
    ("decoder.input_proj.{level}.norm.{leaf}", "model.decoder_input_proj.{level}.1.{leaf}"),
    (f"{_DEC}.self_attn.out_proj.{{leaf}}", f"{_HF_DEC}.self_attn.o_proj.{{leaf}}"),
    (f"{_DEC}.self_attn.{{leaf}}", f"{_HF_DEC}.self_attn.{{leaf}}"),
    (f"{_DEC}.cross_attn.{{rest}}", f"{_HF_DEC}.encoder_attn.{{rest}}"),
    (f"{_DEC}.norm1.{{leaf}}", f"{_HF_DEC}.self_attn_layer_norm.{{leaf}}"),
    (f"{_DEC}.norm2.{{leaf}}", f"{_HF_DEC}.encoder_attn_layer_norm.{{leaf}}"),
    (f"{_DEC}.norm3.{{leaf}}", f"{_HF_DEC}.final_layer_norm.{{leaf}}"),
    (f"{_DEC}.linear1.{{leaf}}", f"{_HF_DEC}.mlp.fc1.{{leaf}}"),
    (f"{_DEC}.linear2.{{leaf}}", f"{_HF_DEC}.mlp.fc2.{{leaf}}"),
    ("decoder.denoising_class_embed.{leaf}", "model.denoising_class_embed.{leaf}"),
    ("decoder.query_pos_head.{rest}", "model.decoder.query_pos_head.{rest}"),
    ("decoder.enc_output.{rest}", "model.enc_output.{rest}"),
    ("decoder.enc_score_head.{leaf}", "model.enc_score_head.{leaf}"),
    ("decoder.enc_bbox_head.{rest}", "model.enc_bbox_head.{rest}"),
    ("decoder.dec_score_head.{rest}", "model.decoder.class_embed.{rest}"),
    ("decoder.dec_bbox_head.{rest}", "model.decoder.bbox_embed.{rest}"),
]

# transformers 4.x checkpoint names -> 5.x names: the "rt_detr" renames of transformers' conversion_mapping.py.
_CHECKPOINT_TO_HF5 = [
    (re.compile(r"\.out_proj\."), ".o_proj."),
    (re.compile(r"\.layers\.(\d+)\.fc([12])\."), r".layers.\1.mlp.fc\2."),
    (re.compile(r"^model\.encoder\.encoder\.(\d+)\.layers\."), r"model.encoder.aifi.\1.layers."),
    # transformers 4.x also exposed the decoder heads at the top level (tied to model.decoder.*).
    (re.compile(r"^(class_embed|bbox_embed)\."), r"model.decoder.\1."),
]
_HF5_TO_CHECKPOINT = [
    (re.compile(r"\.o_proj\."), ".out_proj."),
    (re.compile(r"\.layers\.(\d+)\.mlp\.fc([12])\."), r".layers.\1.fc\2."),
    (re.compile(r"^model\.encoder\.aifi\.(\d+)\.layers\."), r"model.encoder.encoder.\1.layers."),
]
_POINTS_SCALE = re.compile(r"model\.decoder\.layers\.(?P<layer>\d+)\.encoder_attn\.n_points_scale")
_QKV = re.compile(r"(?P<attn>.+\.self_attn)\.(?P<part>[qkv])_proj\.(?P<leaf>weight|bias)")
_IN_PROJ = re.compile(r"(?P<attn>.+\.self_attn)\.in_proj_(?P<leaf>weight|bias)")


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile(
        "".join(
            re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_PLACEHOLDER_PATTERNS.get(p, r'[0-9]+')})"
            for i, p in enumerate(parts)
        )
    )


_TO_HF = [(_compile(official), hf) for official, hf in _RULES]
_TO_OFFICIAL = [(_compile(hf), official) for official, hf in _RULES]


def _rename(state_dict: dict[str, Tensor], rules: list[tuple[re.Pattern[str], str]], what: str) -> dict[str, Tensor]:
    """Rename every key by the first rule whose pattern matches it whole; unknown keys raise."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        for pattern, template in rules:
            if match := pattern.fullmatch(key):
                out[template.format(**match.groupdict())] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} tensors are not {what} tensors of RT-DETR: {_preview(unknown)}")
    return out


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _hf5_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers 4.x checkpoint names -> 5.x names; a head stored under both of its tied names is kept once."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for pattern, replacement in _CHECKPOINT_TO_HF5:
            key = pattern.sub(replacement, key)
        if key in out and not torch.equal(out[key], value):
            raise ValueError(f"two different tensors are stored for '{key}' (tied Hugging Face heads must be equal)")
        out[key] = value
    return out


def _join_qkv(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF's q/k/v projections -> one `in_proj_weight` / `in_proj_bias` (rows q, k, v, as nn.MultiheadAttention)."""
    out: dict[str, Any] = {}
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        match = _QKV.fullmatch(key)
        if match is None:
            out[key] = value
            continue
        joined = f"{match['attn']}.in_proj_{match['leaf']}"
        out.setdefault(joined, None)  # keeps the joined tensor where its parts were
        parts.setdefault(joined, {})[match["part"]] = value
    for joined, found in parts.items():
        if sorted(found) != ["k", "q", "v"]:
            raise ValueError(f"'{joined}': Hugging Face q/k/v projections incomplete, found only {sorted(found)}")
        out[joined] = torch.cat([found["q"], found["k"], found["v"]])
    return out


def _split_qkv(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """`in_proj_weight` / `in_proj_bias` -> HF's q/k/v projections (copies: safetensors refuses shared storage)."""
    out = {}
    for key, value in state_dict.items():
        match = _IN_PROJ.fullmatch(key)
        if match is None:
            out[key] = value
            continue
        for part, chunk in zip("qkv", value.chunk(3)):
            out[f"{match['attn']}.{part}_proj.{match['leaf']}"] = chunk.clone()
    return out


def points_scale_buffers(state_dict: dict[str, Tensor]) -> dict[int, Tensor]:
    """RTDetrV2's `n_points_scale` buffers of an HF state dict, by decoder layer (none in v1)."""
    return {int(m["layer"]): v for k, v in state_dict.items() if (m := _POINTS_SCALE.fullmatch(k))}


def points_scale_tensors(num_points: int, num_layers: int, num_levels: int = 3) -> dict[str, Tensor]:
    """The `n_points_scale` buffers RTDetrV2 saves (and reports missing without): 1 / n for each point."""
    scale = torch.tensor([1 / num_points] * (num_points * num_levels), dtype=torch.float32)
    return {f"model.decoder.layers.{i}.encoder_attn.n_points_scale": scale.clone() for i in range(num_layers)}


def hf_to_official(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Hugging Face `RTDetrForObjectDetection` / `RTDetrV2ForObjectDetection` state dict (transformers 5.x
    names or 4.x checkpoint names) -> official v1 names, q/k/v joined into `in_proj_*`.

    HF's frozen backbone norms store no `num_batches_tracked`; `weights.loading.fit_state_dict` adds them.
    RTDetrV2's `n_points_scale` buffers are dropped: derived from the number of points (see
    `points_scale_buffers` to check them).
    """
    state_dict = {k: v for k, v in state_dict.items() if not _POINTS_SCALE.fullmatch(k)}
    return _rename(_join_qkv(_hf5_names(state_dict)), _TO_OFFICIAL, "Hugging Face")


def official_to_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official v1 names -> the transformers 5.x `RTDetrForObjectDetection` state dict names (in_proj split);
    for RTDetrV2 add `points_scale_tensors`."""
    return _split_qkv(_rename(state_dict, _TO_HF, "official"))


def checkpoint_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers 5.x names -> the names transformers writes to disk (its 4.x names), read by 4.x and 5.x."""
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _HF5_TO_CHECKPOINT:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out
