"""Ultralytics RT-DETR-L/X checkpoints (`rtdetr-l.pt`, `rtdetr-x.pt`, or a model trained with `ultralytics.RTDETR`
from `rtdetr-l.yaml` / `rtdetr-x.yaml`), read without running the file's code and mapped onto our
`rtdetr_hgnetv2_l` / `rtdetr_hgnetv2_x` presets.

    weights = read_ultralytics("rtdetr-l.pt")   # config, state dict in our names, class names, preset, notes

An Ultralytics `.pt` is `torch.save` of a dict whose `model` (or `ema`, in a training checkpoint) is the pickled
`RTDETRDetectionModel` module object itself, in fp16 (Ultralytics `strip_optimizer`, `BaseTrainer.save_model`).
Unpickling it normally imports `ultralytics` and runs whatever the pickle names. Here a restricted unpickler lets
torch rebuild the tensors and turns every other class into a `PickledObject`: an inert record of the class name,
its arguments and its pickled state (for a module its `__dict__`: `_parameters`, `_buffers`, `_modules`, `eps`, ...).
Nothing is imported and nothing is called but torch's tensor rebuild functions and `collections.OrderedDict`.

The rtdetr-l/x.yaml networks compute the official HGNetv2 RT-DETR-L/X function (checked against Ultralytics
8.4.190 `nn/modules/{block,conv,transformer,head}.py` and by `tests/test_ultralytics_weights.py`): the same layers,
numbered `model.0` ... `model.28` (X: `model.32`) in the yaml's order (`_HEAD`). What differs, and what we do:
- every BatchNorm eps is 1e-3 (`initialize_weights`; official 1e-5): in eval exactly absorbed by adding
  eps - 1e-5 to running_var, with eps read from each BatchNorm's pickled state;
- `denoising_class_embed` has nc rows (official nc + 1, the last a zero padding row): a zero row is appended
  (it only enters training);
- the fp16 weights are read as float32.
Outside the weights: Ultralytics' decoder lacks the official fp16 overflow clamp after each FFN (fp32 alike), and
reuses fp16-rounded anchors a file may cache (`_cached_anchors_note`). Its pre- and post-processing are the
official ones: a plain resize (`LetterBox(scale_fill=True)`) and the top 300 (query, class) pairs by sigmoid score.
"""

from __future__ import annotations

import collections
import logging
import pickle
import re
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator

import torch
from torch import Tensor

from ..config import ModelConfig, preset

logger = logging.getLogger(__name__)

OFFICIAL_EPS = 1e-5  # the BatchNorm2d and LayerNorm default, which the official code and our model keep
ULTRALYTICS_MODEL_MODULE = "ultralytics.nn.tasks"  # where every Ultralytics model class lives

# The only globals the unpickler resolves: torch's tensor rebuild functions and the hooks dict they take.
_ALLOWED_GLOBALS = MappingProxyType({
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
})  # fmt: skip


class PickledObject:
    """An inert stand-in for an object of a class that was not imported.

    `type_name` is the pickled class ('ultralytics.nn.modules.conv.Conv'); `args` and `kwargs` what it was pickled
    to be constructed with; `state` what pickle would have handed to `__setstate__` (for an nn.Module its
    `__dict__`); `items` whatever pickle appends or assigns to it as a container.
    """

    pickled_module = ""
    pickled_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "PickledObject":  # pickle's NEWOBJ, and REDUCE via __call__
        record = super().__new__(cls)
        record.args, record.kwargs, record.state, record.items = args, kwargs, None, []
        return record

    @property
    def type_name(self) -> str:
        return f"{self.pickled_module}.{self.pickled_name}"

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def __repr__(self) -> str:
        return f"PickledObject({self.type_name})"


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose globals are the allow-list (`_ALLOWED_GLOBALS`) or, for any other name, a fresh
    `PickledObject` subclass: constructing or `__reduce__`-calling it records the call instead of running it.
    torch.load's wrapper resolves the storage types (`torch.HalfStorage`, ...) before this is asked."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        return type(name, (PickledObject,), {"pickled_module": module, "pickled_name": name})


def load_restricted(path: str | Path) -> Any:
    """The object a torch.save file holds, with tensors rebuilt by torch and every other class a `PickledObject`
    (see `RestrictedUnpickler`): no code of the file runs and nothing is imported."""
    pickle_module = types.ModuleType("rtdetr_restricted_pickle", "pickle's interface, with a RestrictedUnpickler")
    pickle_module.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    pickle_module.load = lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load()  # type: ignore[attr-defined]
    try:
        return torch.load(path, map_location="cpu", pickle_module=pickle_module, weights_only=False)
    except Exception as error:  # a damaged or non-torch file: torch and pickle raise many kinds
        raise ValueError(f"cannot read {path} as a torch.save file ({type(error).__name__}: {error})") from error


def is_ultralytics_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a torch.save zip whose pickle names an Ultralytics model class (a cheap look at the
    pickle's bytes; nothing is unpickled)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        return bool(pickles) and ULTRALYTICS_MODEL_MODULE.encode() in archive.read(pickles[0])


@dataclass
class UltralyticsWeights:
    """An Ultralytics RT-DETR checkpoint in our terms: the config (the preset with the file's classes, queries,
    decoder and denoising settings), the state dict in our model's names (float32, BatchNorm eps folded),
    the class names in label order, the preset it follows, and notes on what the conversion did."""

    config: ModelConfig
    state_dict: dict[str, Tensor]
    class_names: list[str]
    preset: str
    notes: list[str]


def read_ultralytics(path: str | Path) -> UltralyticsWeights:
    """Read an Ultralytics RT-DETR-L/X `.pt` (see the module docstring). Raises ValueError, naming the file,
    for any other file: another Ultralytics model (YOLO, RT-DETR-ResNet, ...) or a network that differs from
    the official one (other layers, activations or eps)."""
    checkpoint = load_restricted(path)
    model = _detection_model(checkpoint, path)
    try:
        weights = _convert_model(model, path)
    except (KeyError, TypeError, AttributeError, IndexError) as error:  # a layout this reader does not know
        raise ValueError(f"{path}: an Ultralytics RTDETRDetectionModel of an unexpected layout "
                         f"({type(error).__name__}: {error})") from error  # fmt: skip
    weights.notes.insert(0, f"Ultralytics {checkpoint.get('version', '(unknown version)')} "
                            f"{'EMA' if checkpoint.get('ema') is not None else 'model'} weights")  # fmt: skip
    logger.info("%s: %s", path, "; ".join(weights.notes))
    return weights


def _convert_model(model: PickledObject, path: str | Path) -> UltralyticsWeights:
    """The pickled RTDETRDetectionModel in our terms (see `UltralyticsWeights`)."""
    tensors, modules = _our_names(_children(_children(model.state)["model"].state), path)
    _check_unfused(modules, path)
    _check_functions(modules, path)
    bn_eps = _convert(tensors, modules)
    name = _preset_name(tensors, path)
    config = _config(preset(name), model, modules, tensors)
    embedding = "decoder.denoising_class_embed.weight"
    tensors[embedding] = _with_padding_row(tensors[embedding])
    notes = [
        f"RT-DETR-{name[-1].upper()} with {config.num_classes} classes, read from fp16 as float32",
        f"BatchNorm eps {', '.join(f'{e:g}' for e in sorted(bn_eps))} folded into running_var (ours {OFFICIAL_EPS:g})",
        "denoising_class_embed: a zero padding row appended (official nc + 1 rows; training only)",
        *_cached_anchors_note(modules["decoder"].state),
    ]
    return UltralyticsWeights(config, tensors, _class_names(model, config.num_classes), name, notes)


def _detection_model(checkpoint: Any, path: str | Path) -> PickledObject:
    """The pickled model: `ema` when set, else `model` (as Ultralytics' `attempt_load_one_weight`); it must be
    an `RTDETRDetectionModel`."""
    model = None
    if isinstance(checkpoint, dict):
        model = checkpoint.get("ema") if checkpoint.get("ema") is not None else checkpoint.get("model")
    if not isinstance(model, PickledObject):
        raise ValueError(f"{path} is not an Ultralytics checkpoint (no pickled model under 'model' or 'ema')")
    if model.pickled_module != ULTRALYTICS_MODEL_MODULE or not isinstance(model.state, dict):
        raise ValueError(f"{path} is not an Ultralytics checkpoint: its model is a {model.type_name}")
    if model.pickled_name != "RTDETRDetectionModel":
        raise ValueError(
            f"{path} holds an Ultralytics {model.pickled_name}, not an RT-DETR (RTDETRDetectionModel): only "
            f"RT-DETR-L/X (rtdetr-l.yaml, rtdetr-x.yaml) map onto this package's models"
        )
    return model


def _cached_anchors_note(decoder_state: dict[str, Any]) -> list[str]:
    """Ultralytics caches the anchors of the last input size on the decoder (`shapes`, `anchors`) and its
    `BaseModel._apply` rounds them with the weights when saving in fp16: reloaded, Ultralytics reuses them at
    that size. We generate them in float32 for every size, as the official code."""
    shapes = decoder_state.get("shapes") or []
    if not shapes:
        return []
    height, width = shapes[0]  # the stride-8 level
    return [f"the file caches fp16-rounded anchors for {height * 8}x{width * 8} inputs, which Ultralytics reuses at "
            "that size (up to ~2e-3 off in inverse-sigmoid space); ours are float32, as officially"]  # fmt: skip


def _children(state: Any) -> dict[str, PickledObject]:
    """The submodules of a pickled nn.Module's state, by name (None entries dropped)."""
    modules = state.get("_modules", {}) if isinstance(state, dict) else {}
    return {k: v for k, v in modules.items() if isinstance(v, PickledObject)}


def _walk(module: PickledObject, path: str) -> Iterator[tuple[str, PickledObject]]:
    """(dotted path, record) of `module` and every submodule below it, parents first."""
    yield path, module
    for name, child in _children(module.state).items():
        yield from _walk(child, f"{path}.{name}" if path else name)


def _own_tensors(module: PickledObject) -> dict[str, Tensor]:
    """A pickled module's own parameters and buffers, as its state_dict holds them."""
    state = module.state if isinstance(module.state, dict) else {}
    tensors = {**state.get("_parameters", {}), **state.get("_buffers", {})}
    return {k: v for k, v in tensors.items() if isinstance(v, Tensor)}


# The layers after the backbone, in the yaml's order: (Ultralytics type, its inputs `f`, our module). In `f`,
# numbers >= 0 count from the first of these layers; "S3"/"S4" are the last layers of backbone stages 1 and 2.
# Official HybridEncoder.forward: input projections, AIFI on S5, top-down FPN (lateral conv, 2x nearest upsample,
# concat [upsampled, finer], CSP block), bottom-up PAN (3x3/2 conv, concat with the lateral output, CSP block).
_HEAD = (
    ("Conv", -1, "encoder.input_proj.2"),
    ("AIFI", -1, "encoder.encoder.0.layers.0"),
    ("Conv", -1, "encoder.lateral_convs.0"),
    ("Upsample", -1, None),
    ("Conv", "S4", "encoder.input_proj.1"),
    ("Concat", (-2, -1), None),
    ("RepC3", -1, "encoder.fpn_blocks.0"),
    ("Conv", -1, "encoder.lateral_convs.1"),
    ("Upsample", -1, None),
    ("Conv", "S3", "encoder.input_proj.0"),
    ("Concat", (-2, -1), None),
    ("RepC3", -1, "encoder.fpn_blocks.1"),
    ("Conv", -1, "encoder.downsample_convs.0"),
    ("Concat", (-1, 7), None),
    ("RepC3", -1, "encoder.pan_blocks.0"),
    ("Conv", -1, "encoder.downsample_convs.1"),
    ("Concat", (-1, 2), None),
    ("RepC3", -1, "encoder.pan_blocks.1"),
    ("RTDETRDecoder", (11, 14, 17), "decoder"),
)

# Renames of the module paths inside one Ultralytics layer, by its role (the layer type, or 'input_proj').
_RENAMES: MappingProxyType[str, tuple[tuple[str, str], ...]] = MappingProxyType({
    "HGStem": ((r"^(stem2[ab])\.conv$", r"\1.conv.1"),),  # official padding 'same': Sequential(ZeroPad2d, Conv2d)
    "HGBlock": (
        (r"^m\.", "layers."), (r"^sc\b", "aggregation_squeeze_conv"), (r"^ec\b", "aggregation_excitation_conv"),
    ),
    "DWConv": (),
    "input_proj": ((r"^conv$", "0"), (r"^bn$", "1")),
    "Conv": ((r"^bn$", "norm"),),
    "AIFI": ((r"^ma\b", "self_attn"), (r"^fc1$", "linear1"), (r"^fc2$", "linear2")),
    "RepC3": ((r"^cv(\d)", r"conv\1"), (r"^m\.", "bottlenecks."), (r"\.bn$", ".norm")),
    "RTDETRDecoder": (
        (r"^input_proj\.(\d+)\.0$", r"input_proj.\1.conv"), (r"^input_proj\.(\d+)\.1$", r"input_proj.\1.norm"),
    ),
})  # fmt: skip

# The activation the official network applies in each module that has one (our names; the first match counts).
_ACTIVATIONS = tuple((re.compile(p), a) for p, a in (
    (r"^backbone\.stages\.\d+\.downsample$", "Identity"),  # depthwise 3x3/2 conv + BN only
    (r"^backbone\..*\.conv1$", "Identity"),  # a light block's 1x1 conv
    (r"^backbone\.", "ReLU"),
    (r"^encoder\.input_proj\.", "Identity"),
    (r"\.bottlenecks\.\d+\.conv[12]$", "Identity"),  # the RepVGG branches, summed before one SiLU
    (r"^encoder\.encoder\.", "GELU"),
    (r"^encoder\.", "SiLU"),
    (r"^decoder\.", "ReLU"),
))  # fmt: skip


def _backbone(layers: list[PickledObject], path: str | Path) -> tuple[list[tuple[str, str]], list[int]]:
    """(our module, rename role) of each backbone layer, and the index of each stage's last layer.

    HGStem is the stem; a DWConv opens the next stage as its downsample conv; an HGBlock is the next block of the
    current stage (stage 0 has no downsample, as officially). The backbone ends at the first other layer.
    """
    if not layers or layers[0].pickled_name != "HGStem":
        raise ValueError(f"{path}: the backbone is not an HGNetv2 (its first layer is not an HGStem)")
    names, stage_ends, block = [("backbone.stem", "HGStem")], [], 0
    for i, layer in enumerate(layers[1:], start=1):
        kind = layer.pickled_name
        if kind not in ("DWConv", "HGBlock"):
            break
        if kind == "DWConv" or not stage_ends:
            stage_ends.append(i)
            block = 0
        stage_ends[-1] = i
        if kind == "DWConv":
            names.append((f"backbone.stages.{len(stage_ends) - 1}.downsample", kind))
            continue
        # Official HG_Block: the identity shortcut in every block of a stage but the first.
        if layer.state.get("add") != (block > 0):
            raise ValueError(f"{path}: HGBlock layer {i} {'has no' if block else 'has an'} identity shortcut; "
                             "officially every block of a stage but the first has one")  # fmt: skip
        names.append((f"backbone.stages.{len(stage_ends) - 1}.blocks.{block}", kind))
        block += 1
    if len(stage_ends) != 4:
        raise ValueError(f"{path}: the HGNetv2 backbone has {len(stage_ends)} stages; RT-DETR-L/X have 4")
    return names, stage_ends


def _head(layers: list[PickledObject], stage_ends: list[int], path: str | Path) -> list[tuple[str | None, str]]:
    """(our module, rename role) of each layer after the backbone, checking its type and inputs against `_HEAD`."""
    start = stage_ends[-1] + 1
    if len(layers) - start != len(_HEAD):
        raise ValueError(f"{path}: {len(layers) - start} layers after the backbone; RT-DETR-L/X have {len(_HEAD)}")
    names = []
    for i, (kind, inputs, ours) in enumerate(_HEAD, start=start):
        layer = layers[i]
        if isinstance(inputs, tuple):  # Ultralytics keeps a list
            expected: Any = [x + start if x >= 0 else x for x in inputs]
        else:
            expected = {"S3": stage_ends[1], "S4": stage_ends[2]}.get(inputs, inputs)  # type: ignore[call-overload]
        found = layer.state.get("f")
        if layer.pickled_name != kind or found != expected:
            raise ValueError(
                f"{path}: layer {i} is an Ultralytics {layer.pickled_name} on input {found}; RT-DETR-L/X "
                f"(rtdetr-l.yaml / rtdetr-x.yaml) have a {kind} on input {expected} there"
            )
        if kind == "Upsample" and (layer.state.get("scale_factor") != 2 or layer.state.get("mode") != "nearest"):
            raise ValueError(f"{path}: layer {i} is not the official 2x nearest upsampling")
        names.append((ours, "input_proj" if ours and "input_proj" in ours else kind))
    return names


def _our_names(
    layers: dict[str, PickledObject], path: str | Path
) -> tuple[dict[str, Tensor], dict[str, PickledObject]]:
    """Every tensor and every module of the Ultralytics layers (`model.model`), under our model's names."""
    ordered = [layers[k] for k in sorted(layers, key=int)]
    backbone, stage_ends = _backbone(ordered, path)
    tensors: dict[str, Tensor] = {}
    modules: dict[str, PickledObject] = {}
    for layer, (prefix, role) in zip(ordered, backbone + _head(ordered, stage_ends, path)):
        if prefix is None:  # Upsample, Concat: no weights
            continue
        for inner, record in _walk(layer, ""):
            for pattern, replacement in _RENAMES[role]:
                inner = re.sub(pattern, replacement, inner)
            name = f"{prefix}.{inner}" if inner else prefix
            modules[name] = record
            tensors.update({f"{name}.{k}": v for k, v in _own_tensors(record).items()})
    return tensors, modules


def _activation(record: PickledObject) -> str:
    """'ReLU', 'SiLU', 'GELU', 'Identity', ...; a tanh-approximated GELU is 'GELU(tanh)'."""
    approximate = record.state.get("approximate", "none") if isinstance(record.state, dict) else "none"
    return record.pickled_name + ("" if approximate == "none" else f"({approximate})")


def _check_unfused(modules: dict[str, PickledObject], path: str | Path) -> None:
    """Raise if Ultralytics' `model.fuse()` merged convs with their BatchNorms (its predictor fuses the model in
    place, so a model saved after predicting is fused): such a file has no BatchNorm tensors to map."""
    for name, record in modules.items():
        unfused = "conv1" if record.pickled_name == "RepConv" else "bn"
        if record.pickled_name in ("Conv", "DWConv", "RepConv") and unfused not in _children(record.state):
            raise ValueError(f"{path} holds a fused Ultralytics model ({name}: conv and BatchNorm merged by "
                             "`model.fuse()`), which is not mapped: save the model before predicting with it")  # fmt: skip


def _check_functions(modules: dict[str, PickledObject], path: str | Path) -> None:
    """Raise unless every activation and LayerNorm eps is the official one (`_ACTIVATIONS`, 1e-5)."""
    problems = []
    for name, record in modules.items():
        act = _children(record.state).get("act")
        expected = next((a for p, a in _ACTIVATIONS if p.search(name)), None) if act else None
        if act and _activation(act) != expected:
            problems.append(f"{name} applies {_activation(act)} (official: {expected})")
        if record.pickled_name == "LayerNorm" and record.state.get("eps") != OFFICIAL_EPS:
            problems.append(f"{name} has LayerNorm eps {record.state.get('eps')} (official 1e-05)")
    if problems:
        raise ValueError(f"{path} does not compute the official RT-DETR-L/X function: " + "; ".join(problems[:5]))


def _convert(tensors: dict[str, Tensor], modules: dict[str, PickledObject]) -> set[float]:
    """In place: every float tensor to float32, each BatchNorm's eps folded into its running_var so that
    var + 1e-5 (ours) equals var + eps (Ultralytics) exactly in eval, and the backbone's `num_batches_tracked`
    dropped (its BatchNorms are frozen, `freeze_norm` as officially, and keep no count). Returns the eps values."""
    for key in [k for k in tensors if k.startswith("backbone.") and k.endswith(".num_batches_tracked")]:
        del tensors[key]
    for key, value in tensors.items():
        tensors[key] = value.detach().float() if value.is_floating_point() else value.detach()
    found = set()
    for name, record in modules.items():
        if record.pickled_name == "BatchNorm2d":
            eps = float(record.state["eps"])
            tensors[f"{name}.running_var"] = tensors[f"{name}.running_var"] + (eps - OFFICIAL_EPS)
            found.add(eps)
    return found


# HGNetv2 arch by the stem's output channels (official arch tables: L 48, X 64)
_PRESET_BY_STEM = MappingProxyType({48: "rtdetr_hgnetv2_l", 64: "rtdetr_hgnetv2_x"})


def _preset_name(tensors: dict[str, Tensor], path: str | Path) -> str:
    stem = tensors["backbone.stem.stem4.conv.weight"].shape[0]
    if stem not in _PRESET_BY_STEM:
        raise ValueError(f"{path}: an HGNetv2 stem of {stem} channels is neither RT-DETR-L's (48) nor -X's (64)")
    return _PRESET_BY_STEM[stem]


def _config(
    base: ModelConfig, model: PickledObject, modules: dict[str, PickledObject], tensors: dict[str, Tensor]
) -> ModelConfig:
    """`base` with what the pickled RTDETRDecoder and AIFI set (classes, queries, heads, points, decoder
    layers, eval layer, denoising) and the training image size."""
    decoder = modules["decoder"].state
    cross_attn = modules["decoder.decoder.layers.0.cross_attn"].state
    if decoder.get("learnt_init_query"):
        raise ValueError("learnt_init_query (learned initial queries, `tgt_embed`) is not the official RT-DETR-L/X, "
                         "which take the selected encoder features as queries")  # fmt: skip
    if cross_attn["n_levels"] != 3:
        raise ValueError(f"the decoder attends to {cross_attn['n_levels']} feature levels; RT-DETR-L/X to 3")
    layers = decoder["num_decoder_layers"]
    return base.replace(
        num_classes=tensors["decoder.dec_score_head.0.weight"].shape[0],
        num_queries=decoder["num_queries"],
        num_decoder_layers=layers,
        eval_idx=modules["decoder.decoder"].state["eval_idx"] % layers - layers,  # Ultralytics stores it >= 0
        decoder_heads=decoder["nhead"],
        encoder_heads=modules["encoder.encoder.0.layers.0.self_attn"].state["num_heads"],
        num_points=(cross_attn["n_points"],) * 3,
        num_denoising=decoder["num_denoising"],
        label_noise_ratio=float(decoder["label_noise_ratio"]),
        box_noise_scale=float(decoder["box_noise_scale"]),
        image_size=_image_size(model, base.image_size),
    )


def _image_size(model: PickledObject, default: tuple[int, int]) -> tuple[int, int]:
    """The training `imgsz` kept in the model's `args` (a dict, or a pickled namespace), if a multiple of 32."""
    args = model.state.get("args")
    args = args.state if isinstance(args, PickledObject) else args
    size = args.get("imgsz") if isinstance(args, dict) else None
    size = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (list, tuple)) else ()
    if len(size) == 2 and all(isinstance(s, int) and s > 0 and s % 32 == 0 for s in size):
        return size  # type: ignore[return-value]
    return default


def _with_padding_row(embedding: Tensor) -> Tensor:
    """[nc, D] -> [nc + 1, D]: the official `nn.Embedding(nc + 1, D, padding_idx=nc)` keeps a zero last row."""
    return torch.cat([embedding, embedding.new_zeros(1, embedding.shape[1])])


def _class_names(model: PickledObject, num_classes: int) -> list[str]:
    """The model's `names` ({label: name}) in label order; `class_i` where it has none."""
    names = model.state.get("names")
    names = names if isinstance(names, dict) else {}
    return [str(names.get(i, f"class_{i}")) for i in range(num_classes)]
