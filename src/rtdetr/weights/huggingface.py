"""Hugging Face `RTDetrForObjectDetection` (v1) and `RTDetrV2ForObjectDetection` (v2) folders: `config.json`
<-> `ModelConfig`, reading and writing the folder. The tensor names are translated by `hf_names`; transformers
itself is never imported.

Equivalence (measured in tests/test_huggingface.py and tests/test_huggingface_v2.py): HF equals the official
model on eval outputs when `eval_size` is None; it has no `eval_idx` (always the last decoder layer), builds
exactly 3 RepVGG blocks per CSP layer, one number of sampling points for all levels and only the default query
selection (top-K of each token's best class score). Settings outside that raise ValueError naming the file and
field.

v2 (`model_type` "rt_detr_v2") is v1 with a v2 cross-attention: `decoder_method` ('default' bilinear |
'discrete' nearest cell) -> `cross_attn_method`, `decoder_offset_scale` -> `offset_scale`, and a persistent
`n_points_scale` buffer per decoder layer (derived from `decoder_n_points`: checked on reading, written for HF).
A folder is written as v2 when `config.version == 2` or a v2-only option is set; v1 configs give the v1 folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..config import ModelConfig
from ..models.backbone import BLOCKS_PER_DEPTH
from .checkpoint import torch_load
from .hf_names import checkpoint_names, hf_to_official, official_to_hf, points_scale_buffers, points_scale_tensors

def fit_to_model(state_dict: dict[str, Tensor], config: ModelConfig, source: str = "state dict") -> dict[str, Tensor]:
    """An official-named state dict converted from HF, completed to what `RTDETRModel(config)` keeps.

    HF's frozen backbone norms store no `num_batches_tracked`: a zero count is added to every BatchNorm that
    lacks one (it only matters for momentum=None), except the backbone's when `freeze_norm` (our frozen norms
    keep no counter); with `num_denoising` 0 HF builds no denoising class embedding, so a zero one (never used)
    is added. Whether the result fits the model is checked when it is loaded (`weights.loading.fit_state_dict`).
    """
    out = dict(state_dict)
    for key in state_dict:
        if key.endswith(".running_mean"):
            counter = key.removesuffix("running_mean") + "num_batches_tracked"
            frozen = config.freeze_norm and key.startswith("backbone.")
            if frozen:
                out.pop(counter, None)
            else:
                out.setdefault(counter, torch.zeros((), dtype=torch.long))
    embed = "decoder.denoising_class_embed.weight"
    if config.num_denoising == 0 and embed not in out:
        out[embed] = torch.zeros(config.num_classes + 1, config.hidden_dim)
    return out


# RTDetrConfig / RTDetrResNetConfig defaults (released transformers 4.x and 5.x agree) for fields config.json omits.
_HF_DEFAULTS: dict[str, Any] = {
    "model_type": "rt_detr",
    "backbone": None,
    "use_timm_backbone": False,
    "backbone_config": None,
    "encoder_hidden_dim": 256,
    "encoder_in_channels": [512, 1024, 2048],
    "feat_strides": [8, 16, 32],
    "encoder_layers": 1,
    "encoder_ffn_dim": 1024,
    "encoder_attention_heads": 8,
    "encode_proj_layers": [2],
    "positional_encoding_temperature": 10000,
    "encoder_activation_function": "gelu",
    "activation_function": "silu",
    "eval_size": None,
    "normalize_before": False,
    "hidden_expansion": 1.0,
    "d_model": 256,
    "num_queries": 300,
    "decoder_in_channels": [256, 256, 256],
    "decoder_ffn_dim": 1024,
    "num_feature_levels": 3,
    "decoder_n_points": 4,
    "decoder_layers": 6,
    "decoder_attention_heads": 8,
    "decoder_activation_function": "relu",
    "num_denoising": 100,
    "label_noise_ratio": 0.5,
    "box_noise_scale": 1.0,
    "learn_initial_query": False,
    "anchor_image_size": None,
    "with_box_refine": True,
    "layer_norm_eps": 1e-5,
    "batch_norm_eps": 1e-5,
    "num_labels": 2,
}
_RESNET_DEFAULTS: dict[str, Any] = {
    "model_type": "rt_detr_resnet",
    "num_channels": 3,
    "embedding_size": 64,
    "hidden_sizes": [256, 512, 1024, 2048],
    "depths": [3, 4, 6, 3],
    "layer_type": "bottleneck",
    "hidden_act": "relu",
    "downsample_in_first_stage": False,
    "downsample_in_bottleneck": False,
    "out_indices": [2, 3, 4],
    "out_features": ["stage2", "stage3", "stage4"],
}
# RTDetrV2Config's extra fields (its other defaults equal RTDetrConfig's); read only for v2 (v1 ignores them).
_HF_V2_DEFAULTS: dict[str, Any] = {
    **_HF_DEFAULTS,
    "model_type": "rt_detr_v2",
    "decoder_n_levels": 3,
    "decoder_offset_scale": 0.5,
    "decoder_method": "default",
}
_VERSIONS = {"rt_detr": (1, "RTDetr"), "rt_detr_v2": (2, "RTDetrV2")}  # model_type -> (version, class prefix)
# Fields that must keep these values for the HF model to be the official architecture.
_REQUIRED = (
    "backbone", "use_timm_backbone", "feat_strides", "encode_proj_layers", "encoder_activation_function",
    "activation_function", "normalize_before", "num_feature_levels", "decoder_activation_function",
    "learn_initial_query", "with_box_refine", "layer_norm_eps", "batch_norm_eps",
)  # fmt: skip
_RESNET_REQUIRED = (
    "model_type", "num_channels", "hidden_act", "downsample_in_first_stage", "downsample_in_bottleneck", "out_indices",
    "out_features",
)  # fmt: skip


def _field(config: dict[str, Any], defaults: dict[str, Any], name: str) -> Any:
    value = config.get(name, defaults[name])
    return list(value) if isinstance(value, tuple) else value


def _require(config: dict[str, Any], defaults: dict[str, Any], names: tuple[str, ...], where: str) -> None:
    for name in names:
        value = _field(config, defaults, name)
        if value != defaults[name]:
            raise ValueError(f"{where}: {name}={value!r} is not supported (RT-DETR needs {defaults[name]!r})")


def _check_shortcuts(stem: int, widths: list[int], bottleneck: bool, where: str) -> None:
    """HF builds the official projection shortcuts (plain 1x1 in the first stage, AvgPool + 1x1 after) only
    when the channel count changes between stages as in every ResNet-vd; anything else differs."""
    first_changes = stem != widths[0] if bottleneck else stem == widths[0]
    if not first_changes or any(a == b for a, b in zip(widths, widths[1:])):
        raise ValueError(
            f"{where}: embedding_size={stem}, hidden_sizes={widths} give Hugging Face shortcut layers that differ "
            "from the official ResNet-vd projections"
        )


def _backbone_fields(config: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig backbone fields from HF's `backbone_config` (None: HF's default ResNet-50-vd)."""
    backbone = config.get("backbone_config") or {}
    where = f"{where} backbone_config"
    _require(backbone, _RESNET_DEFAULTS, _RESNET_REQUIRED, where)
    depths = tuple(_field(backbone, _RESNET_DEFAULTS, "depths"))
    layer_type = _field(backbone, _RESNET_DEFAULTS, "layer_type")
    widths = _field(backbone, _RESNET_DEFAULTS, "hidden_sizes")
    stem = _field(backbone, _RESNET_DEFAULTS, "embedding_size")
    if layer_type not in ("basic", "bottleneck") or len(depths) != 4 or len(widths) != 4:
        raise ValueError(f"{where}: needs layer_type basic|bottleneck and 4 stages, got {layer_type}, {list(depths)}")
    bottleneck = layer_type == "bottleneck"
    _check_shortcuts(stem, widths, bottleneck, where)
    if bottleneck:
        depth = 101 if depths == BLOCKS_PER_DEPTH[101] else 50
    else:
        depth = 34 if depths == BLOCKS_PER_DEPTH[34] else 18
    expansion = 4 if bottleneck else 1
    if any(w % expansion for w in widths):
        raise ValueError(f"{where}: bottleneck hidden_sizes must be multiples of 4, got {widths}")
    large = depth >= 50  # the official r50/r101 freeze the stem and every backbone norm; r18/r34 train them
    return dict(
        depth=depth,
        freeze_at=0 if large else -1,
        freeze_norm=large,
        stem_channels=stem,
        stage_channels=tuple(w // expansion for w in widths),
        stage_blocks=None if depths == BLOCKS_PER_DEPTH[depth] else depths,
    )


def _image_size(config: dict[str, Any]) -> tuple[int, int]:
    """The fixed size HF was told about (anchor_image_size, else eval_size), else the official 640 x 640."""
    size = config.get("anchor_image_size") or config.get("eval_size") or (640, 640)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _num_labels(config: dict[str, Any]) -> int:
    id2label = config.get("id2label")
    return len(id2label) if id2label else int(config.get("num_labels", _HF_DEFAULTS["num_labels"]))


def _version(config: dict[str, Any], source: str) -> int:
    """1 for `model_type` "rt_detr", 2 for "rt_detr_v2"; `architectures`, when given, must name the same
    generation (an RTDetrForObjectDetection config with model_type rt_detr_v2 is contradictory)."""
    model_type = config.get("model_type", _HF_DEFAULTS["model_type"])
    if model_type not in _VERSIONS:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported (rt_detr or rt_detr_v2)")
    version, prefix = _VERSIONS[model_type]
    architectures = config.get("architectures") or []
    if any(name.removeprefix(prefix) not in ("ForObjectDetection", "Model") for name in architectures):
        raise ValueError(
            f"{source}: model_type={model_type!r} does not match architectures={architectures} "
            f"(expected {prefix}ForObjectDetection)"
        )
    return version


def _decoder_fields(config: dict[str, Any], version: int, source: str) -> dict[str, Any]:
    """version, num_points, cross_attn_method and offset_scale (v1 HF ignores the v2 fields: defaults)."""
    defaults = _HF_V2_DEFAULTS if version == 2 else _HF_DEFAULTS
    points = _field(config, defaults, "decoder_n_points")
    if not isinstance(points, int) or isinstance(points, bool) or points < 1:
        raise ValueError(f"{source}: decoder_n_points={points!r} must be one positive int (the same for all levels)")
    fields = dict(version=version, num_points=(points,) * 3)
    if version == 1:
        return fields
    _require(config, defaults, ("decoder_n_levels",), source)
    method = _field(config, defaults, "decoder_method")
    scale = _field(config, defaults, "decoder_offset_scale")
    if method not in ("default", "discrete"):
        raise ValueError(f"{source}: decoder_method={method!r} is not supported ('default' or 'discrete')")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"{source}: decoder_offset_scale={scale!r} must be a number")
    return dict(fields, cross_attn_method=method, offset_scale=float(scale))


def model_config_from_hf(config: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The ModelConfig of a parsed HF RT-DETR (v1) or RT-DETRv2 `config.json`; unsupported settings raise
    ValueError naming `source` and the field.

    HF has no eval_idx (eval_idx -1). Freezing follows the official presets by depth (r50/r101: stem and
    norms frozen), not HF's `freeze_backbone_batch_norms`. `eval_size`, which in HF drops the position
    embedding at eval, only sets `image_size`: the weights were trained with it.
    """
    version = _version(config, source)
    _require(config, _HF_DEFAULTS, _REQUIRED, source)
    field = lambda name: _field(config, _HF_DEFAULTS, name)  # noqa: E731
    hidden = field("encoder_hidden_dim")
    if field("decoder_in_channels") != [hidden] * 3 or len(field("encoder_in_channels")) != 3:
        raise ValueError(
            f"{source}: decoder_in_channels={field('decoder_in_channels')} must be [encoder_hidden_dim]*3 and "
            f"encoder_in_channels={field('encoder_in_channels')} must have 3 levels"
        )
    return ModelConfig(
        **_backbone_fields(config, source),
        **_decoder_fields(config, version, source),
        encoder_hidden_dim=hidden,
        encoder_ffn_dim=field("encoder_ffn_dim"),
        encoder_heads=field("encoder_attention_heads"),
        num_encoder_layers=field("encoder_layers"),
        expansion=float(field("hidden_expansion")),
        depth_mult=1.0,  # HF always builds 3 RepVGG blocks per CSP layer
        pe_temperature=float(field("positional_encoding_temperature")),
        hidden_dim=field("d_model"),
        decoder_ffn_dim=field("decoder_ffn_dim"),
        decoder_heads=field("decoder_attention_heads"),
        num_decoder_layers=field("decoder_layers"),
        eval_idx=-1,
        num_queries=field("num_queries"),
        num_classes=_num_labels(config),
        num_denoising=field("num_denoising"),
        label_noise_ratio=float(field("label_noise_ratio")),
        box_noise_scale=float(field("box_noise_scale")),
        image_size=_image_size(config),
    )


def is_hf_v2(config: ModelConfig) -> bool:
    """Whether `config` is written as an HF RT-DETRv2 folder: version 2, or an option only HF v2 has."""
    return config.version == 2 or config.cross_attn_method != "default" or config.offset_scale != 0.5


def _check_exportable(config: ModelConfig) -> None:
    """Raise for the settings HF's RTDetr / RTDetrV2 cannot express."""
    problems = []
    if config.backbone != "resnet_vd":
        problems.append(f"backbone={config.backbone!r} (only ResNet-vd backbones are written)")
    if len(set(config.num_points)) != 1:
        problems.append(f"num_points={config.num_points} (HF has one decoder_n_points for all levels)")
    if config.query_select_method != "default":
        problems.append(
            f"query_select_method={config.query_select_method!r} (HF always selects the top-K tokens by their "
            "best class score: 'default')"
        )
    if round(3 * config.depth_mult) != 3:
        problems.append(f"depth_mult={config.depth_mult} (HF always builds 3 RepVGG blocks per CSP layer)")
    if config.resolved_eval_idx != config.num_decoder_layers - 1:
        problems.append(
            f"eval_idx={config.eval_idx} (HF always outputs the last decoder layer; keep only the layers "
            f"used: num_decoder_layers={config.resolved_eval_idx + 1}, eval_idx=-1)"
        )
    if not float(config.pe_temperature).is_integer():
        problems.append(f"pe_temperature={config.pe_temperature} (HF stores an int)")
    widths = [c * (4 if config.depth >= 50 else 1) for c in config.stage_channels]
    try:
        _check_shortcuts(config.stem_channels, widths, config.depth >= 50, "ModelConfig")
    except ValueError as error:
        problems.append(str(error))
    if problems:
        raise ValueError("this model has no Hugging Face RT-DETR equivalent: " + "; ".join(problems))


def _version_fields(config: ModelConfig) -> dict[str, Any]:
    """model_type, architectures and (v2) the v2 decoder fields of the folder `config` is written as."""
    if not is_hf_v2(config):
        return {"model_type": "rt_detr", "architectures": ["RTDetrForObjectDetection"]}
    return {
        "model_type": "rt_detr_v2",
        "architectures": ["RTDetrV2ForObjectDetection"],
        "decoder_n_levels": 3,
        "decoder_method": config.cross_attn_method,
        "decoder_offset_scale": float(config.offset_scale),
    }


def hf_config_from_model_config(config: ModelConfig, id2label: dict[int, str] | None = None) -> dict[str, Any]:
    """A `config.json` dict from which `RTDetrForObjectDetection` (v1 configs) or `RTDetrV2ForObjectDetection`
    (`is_hf_v2`) builds the model `config` describes.

    `eval_size` and `anchor_image_size` stay None (HF then computes the position embedding and anchors
    per input, as we do); backbone norms are frozen exactly when ours are. Labels default to HF's LABEL_i.
    """
    _check_exportable(config)
    bottleneck = config.depth >= 50
    id2label = id2label or {i: f"LABEL_{i}" for i in range(config.num_classes)}
    if sorted(id2label) != list(range(config.num_classes)):
        raise ValueError(f"id2label needs the keys 0..{config.num_classes - 1}, got {sorted(id2label)}")
    backbone = {
        **_RESNET_DEFAULTS,
        "embedding_size": config.stem_channels,
        "hidden_sizes": [c * (4 if bottleneck else 1) for c in config.stage_channels],
        "depths": list(config.stage_blocks or BLOCKS_PER_DEPTH[config.depth]),
        "layer_type": "bottleneck" if bottleneck else "basic",
    }
    return {
        **{k: v for k, v in _HF_DEFAULTS.items() if k not in ("backbone", "use_timm_backbone", "num_labels")},
        **_version_fields(config),
        "backbone_config": backbone,
        "freeze_backbone_batch_norms": config.freeze_norm,
        "encoder_hidden_dim": config.encoder_hidden_dim,
        "encoder_in_channels": list(config.backbone_out_channels),
        "encoder_layers": config.num_encoder_layers,
        "encoder_ffn_dim": config.encoder_ffn_dim,
        "encoder_attention_heads": config.encoder_heads,
        "positional_encoding_temperature": int(config.pe_temperature),
        "hidden_expansion": float(config.expansion),
        "d_model": config.hidden_dim,
        "num_queries": config.num_queries,
        "decoder_in_channels": [config.encoder_hidden_dim] * 3,
        "decoder_ffn_dim": config.decoder_ffn_dim,
        "decoder_n_points": config.num_points[0],
        "decoder_layers": config.num_decoder_layers,
        "decoder_attention_heads": config.decoder_heads,
        "num_denoising": config.num_denoising,
        "label_noise_ratio": float(config.label_noise_ratio),
        "box_noise_scale": float(config.box_noise_scale),
        "id2label": {str(i): name for i, name in sorted(id2label.items())},
        "label2id": {name: i for i, name in sorted(id2label.items())},
    }


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Hugging Face RT-DETR folder needs config.json")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _load_weights_file(path: Path) -> dict[str, Tensor]:
    if path.suffix != ".safetensors":
        state_dict = torch_load(path)
    else:
        try:
            state_dict = load_file(path, device="cpu")
        except Exception as error:  # safetensors raises assorted types for corrupt or truncated files
            raise ValueError(f"cannot read weights {path}: {type(error).__name__}: {error}") from error
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return state_dict


def _read_hf_weights(folder: Path) -> tuple[dict[str, Tensor], Path]:
    """The HF state dict of `folder` (single-file or sharded safetensors, else pytorch_model.bin) and its file."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _load_weights_file(folder / name), folder / name
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / name
        if index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            if not shards:
                raise ValueError(f"{index} has no weight_map")
            state_dict = {}
            for shard in shards:
                state_dict.update(_load_weights_file(folder / shard))
            return state_dict, index
    raise FileNotFoundError(f"no weights in {folder}: expected model.safetensors or pytorch_model.bin")


def _class_names(config: dict[str, Any], source: str) -> list[str] | None:
    """Class names from id2label, or None when they are HF's placeholders LABEL_i."""
    id2label = config.get("id2label")
    if not id2label:
        return None
    try:
        labels = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError, AttributeError):
        raise ValueError(f"{source}: id2label must map integer ids to names, got {id2label!r}") from None
    if sorted(labels) != list(range(len(labels))):
        raise ValueError(f"{source}: id2label ids must be 0..{len(labels) - 1}, got {sorted(labels)}")
    names = [labels[i] for i in range(len(labels))]
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def _check_points_scale(hf_state_dict: dict[str, Tensor], config: ModelConfig, source: str) -> None:
    """RTDetrV2's stored `n_points_scale` (1 / n per point) must agree with decoder_n_points: our model
    recomputes it from num_points, so a different stored value would silently change the sampling."""
    points = config.num_points[0]
    expected = points_scale_tensors(points, 1)["model.decoder.layers.0.encoder_attn.n_points_scale"]
    for layer, value in sorted(points_scale_buffers(hf_state_dict).items()):
        if value.shape != expected.shape or not torch.allclose(value.float(), expected, rtol=1e-3, atol=0.0):
            raise ValueError(
                f"{source}: model.decoder.layers.{layer}.encoder_attn.n_points_scale={value.tolist()} disagrees "
                f"with decoder_n_points={points} (expected 1/{points} for each of its {expected.numel()} points)"
            )


def read_hf_folder(folder: str | Path) -> tuple[ModelConfig, dict[str, Tensor], list[str] | None]:
    """(config, official-named state dict, class names or None) of a Hugging Face RT-DETR or RT-DETRv2 folder
    (`config.json` + `model.safetensors` or `pytorch_model.bin`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a Hugging Face model folder")
    config_path = folder / "config.json"
    hf_config = _read_json(config_path)
    config = model_config_from_hf(hf_config, source=str(config_path))
    hf_state_dict, weights_path = _read_hf_weights(folder)
    _check_points_scale(hf_state_dict, config, str(weights_path))
    try:
        state_dict = hf_to_official(hf_state_dict)
    except ValueError as error:
        raise ValueError(f"{weights_path}: {error}") from None
    return config, fit_to_model(state_dict, config), _class_names(hf_config, str(config_path))


def save_hf_folder(
    model: nn.Module, config: ModelConfig, folder: str | Path, class_names: list[str] | None = None
) -> None:
    """Write `config.json` + `model.safetensors` that `RTDetrForObjectDetection.from_pretrained(folder)` (or,
    when `is_hf_v2(config)`, `RTDetrV2ForObjectDetection`) loads with no missing or unexpected tensors. The
    model must not be `deploy()`-ed (HF has no fused RepVGG)."""
    if class_names is not None and len(class_names) != config.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with num_classes={config.num_classes}")
    hf_config = hf_config_from_model_config(config, dict(enumerate(class_names)) if class_names else None)
    state_dict = official_to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()})
    if config.num_denoising == 0:  # HF builds no denoising class embedding then
        del state_dict["model.denoising_class_embed.weight"]
    if is_hf_v2(config):
        state_dict.update(points_scale_tensors(config.num_points[0], config.num_decoder_layers))
    state_dict = {k: v.contiguous() for k, v in checkpoint_names(state_dict).items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})
