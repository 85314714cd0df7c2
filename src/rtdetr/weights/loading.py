"""Reading weights of every supported kind, and the one check of whether a state dict fits a model.

    weights = read_weights("rtdetr_r18vd_dec3_6x_coco_from_paddle.pth")   # official, Hugging Face folder, or ours
    model = RTDETRModel(weights.config)
    fit_state_dict(model, weights.state_dict, weights.source)           # strict: every tensor named on mismatch

Kinds: (a) official lyuwenyu/RT-DETR checkpoints (v1 or v2 names, `ema.module` or `model` nesting, or a bare
state dict), (b) Hugging Face folders (`config.json` + `model.safetensors`), (c) ours (`weights.checkpoint`),
(d) Ultralytics RT-DETR-L/X `.pt` files (`weights.ultralytics`, read without running their pickle).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from ..config import ModelConfig
from ..data.coco_categories import COCO_CATEGORY_IDS, COCO_CLASS_NAMES
from .checkpoint import is_ours, read_ours, torch_load
from .huggingface import read_hf_folder
from .official import read_official
from .ultralytics import is_ultralytics_checkpoint, read_ultralytics

logger = logging.getLogger(__name__)

# The tensors whose shape depends on the number of classes: re-initialised when fine-tuning on new classes.
CLASS_HEAD = re.compile(r"^decoder\.(enc_score_head|dec_score_head\.\d+|denoising_class_embed)\.")
_DECODER_LAYER = re.compile(r"^decoder\.(decoder\.layers|dec_score_head|dec_bbox_head)\.(\d+)\.")
_LISTED = 10


@dataclass
class LoadedWeights:
    """Weights with everything needed to rebuild their model. `kind` is 'rtdetr', 'official', 'huggingface' or
    'ultralytics'; `source` the file the tensors came from (for messages)."""

    config: ModelConfig
    state_dict: dict[str, Tensor]
    class_names: list[str]
    category_ids: list[int]
    kind: str
    source: str


def read_weights(path: str | Path) -> LoadedWeights:
    """Any supported checkpoint -> LoadedWeights. Ours give their EMA weights when they have them; official and
    Hugging Face checkpoints are COCO models (label i is the i-th COCO category); Ultralytics ones carry their
    class names (COCO category ids when the names are COCO's)."""
    path = Path(path)
    if path.is_dir():
        config, state_dict, names = read_hf_folder(path)
        weights_file = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), path)
        return _with_coco_names(config, state_dict, "huggingface", names, str(weights_file))
    if is_ultralytics_checkpoint(path):  # pickled Ultralytics modules: torch_load (weights_only) cannot read them
        u = read_ultralytics(path)
        ids = list(COCO_CATEGORY_IDS) if tuple(u.class_names) == COCO_CLASS_NAMES else list(range(len(u.class_names)))
        return LoadedWeights(u.config, u.state_dict, u.class_names, ids, "ultralytics", str(path))
    checkpoint = torch_load(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not an RT-DETR checkpoint (a dict)")
    if is_ours(checkpoint):
        config, state_dict, names, ids = read_ours(path, checkpoint)
        return LoadedWeights(config, state_dict, names, ids, "rtdetr", str(path))
    try:
        config, state_dict = read_official(checkpoint)
    except ValueError as error:
        keys = ", ".join(list(checkpoint)[:8])
        raise ValueError(f"{path} is not an RT-DETR checkpoint ({error}); its top-level keys: {keys}") from None
    return _with_coco_names(guess_cross_attn_method(config, path), state_dict, "official", None, str(path))


def guess_cross_attn_method(config: ModelConfig, path: Path) -> ModelConfig:
    """An official v2 discrete-sampling ("dsp") checkpoint holds exactly the tensors of its bilinear parent, so
    the method cannot be read from the weights: a file name containing 'dsp' (the official release names, e.g.
    `rtdetrv2_r18vd_dsp_3x_coco.pth`) selects 'discrete', and says so. Override it either way with
    `RTDETR.from_checkpoint(path, cross_attn_method=...)`."""
    if "dsp" in path.name.lower() and config.cross_attn_method == "default":
        logger.warning("%s: 'dsp' in the file name, so loaded with discrete sampling (cross_attn_method='discrete'; "
                       "pass cross_attn_method='default' to load it bilinear)", path)  # fmt: skip
        return config.replace(cross_attn_method="discrete")
    return config


def _with_coco_names(
    config: ModelConfig, state_dict: dict, kind: str, names: list[str] | None, source: str
) -> LoadedWeights:
    if names is None and config.num_classes == len(COCO_CLASS_NAMES):
        names, ids = list(COCO_CLASS_NAMES), list(COCO_CATEGORY_IDS)
    else:
        names = names or [f"class_{i}" for i in range(config.num_classes)]
        ids = list(range(config.num_classes))
    return LoadedWeights(config, state_dict, names, ids, kind, source)


def truncate_decoder(state_dict: dict[str, Tensor], available: int, keep: int, source: str) -> dict[str, Tensor]:
    """Drop the decoder layers (and their heads) from index `keep` on (the paper's speed knob, Table 2)."""
    if not 1 <= keep <= available:
        raise ValueError(f"num_decoder_layers={keep}: {source} has {available} decoder layers (choose 1..{available})")
    return {k: v for k, v in state_dict.items() if not ((m := _DECODER_LAYER.match(k)) and int(m.group(2)) >= keep)}


@dataclass
class FitReport:
    """What `fit_state_dict` did: tensors left at their initial values (`missing`, non-strict loading only)
    and class-head tensors re-initialised for a new number of classes."""

    missing: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)


def fit_state_dict(
    model: nn.Module, state_dict: dict[str, Tensor], source: str, strict: bool = True, new_classes: bool = False
) -> FitReport:
    """Load `state_dict` into `model`, checking first that it fits: mis-shaped tensors always raise; with
    `strict`, so do missing and unexpected ones. With `new_classes`, class-head tensors whose shape differs
    (another number of classes) keep their fresh initialisation instead of raising: fine-tuning.
    The error names `source` and up to ten tensors of each kind."""
    own = model.state_dict()
    reinitialised = [
        k for k in own if new_classes and CLASS_HEAD.match(k) and k in state_dict and state_dict[k].shape != own[k].shape
    ]  # fmt: skip
    state_dict = {k: v for k, v in state_dict.items() if k not in reinitialised}
    missing = [k for k in own if k not in state_dict and k not in reinitialised]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape
    ]  # fmt: skip
    problems = [f"{len(misshaped)} mis-shaped: " + "; ".join(misshaped[:_LISTED])] if misshaped else []
    if strict or new_classes:
        problems += [f"{len(names)} {label}: " + ", ".join(sorted(names)[:_LISTED])
                     for label, names in (("missing", missing), ("unexpected", unexpected)) if names]  # fmt: skip
    if problems:
        raise ValueError(
            f"weights from {source} do not fit this {_describe(model)} model: " + " | ".join(problems)
            + ". Is it a checkpoint of another variant?"
        )  # fmt: skip
    model.load_state_dict(state_dict, strict=False)
    if reinitialised:
        logger.info("loaded %s; re-initialised %d class-head tensors for %d classes: %s",
                    source, len(reinitialised), model.config.num_classes, ", ".join(reinitialised))  # fmt: skip
    return FitReport(missing, reinitialised)


def _describe(model: nn.Module) -> str:
    describe = getattr(model, "describe", None)
    return describe() if callable(describe) else type(model).__name__
