"""Reading every supported checkpoint kind, and writing ours atomically.

Kinds: (a) official lyuwenyu/RT-DETR checkpoints (v1 or v2 names, `ema.module` or `model` nesting, or a bare
state dict), (b) Hugging Face folders (`config.json` + `model.safetensors`), (c) ours: a dict with
`rtdetr_format`, the resolved `config`, `class_names`, `category_ids`, `model` and optionally `ema` weights.
Files are read with `torch.load(weights_only=True)`: a checkpoint can never run code.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig, config_dict
from ..convert.huggingface import read_hf_folder
from ..convert.official import read_official
from ..data.coco_categories import COCO_CATEGORY_IDS, COCO_CLASS_NAMES

FORMAT_VERSION = 1


@dataclass
class LoadedWeights:
    """Weights with everything needed to rebuild their model. `kind` is 'rtdetr', 'official' or 'huggingface'."""

    config: ModelConfig
    state_dict: dict[str, Tensor]
    class_names: list[str]
    category_ids: list[int]
    kind: str


def torch_load(path: str | Path) -> Any:
    """torch.load(weights_only=True) with errors that name the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise ValueError(
            f"cannot read checkpoint {path}: not a PyTorch checkpoint, or truncated/corrupt "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error


def read_checkpoint(path: str | Path) -> LoadedWeights:
    """Any supported checkpoint -> LoadedWeights. Ours give their EMA weights when they have them."""
    path = Path(path)
    if path.is_dir():
        config, state_dict, names = read_hf_folder(path)
        return _with_coco_names(config, state_dict, "huggingface", names)
    checkpoint = torch_load(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not an RT-DETR checkpoint (a dict)")
    if "rtdetr_format" in checkpoint:
        return _read_ours(path, checkpoint)
    try:
        config, state_dict = read_official(checkpoint)
    except ValueError as error:
        keys = ", ".join(list(checkpoint)[:8])
        raise ValueError(f"{path} is not an RT-DETR checkpoint ({error}); its top-level keys: {keys}") from None
    return _with_coco_names(config, state_dict, "official", None)


def _with_coco_names(config: ModelConfig, state_dict: dict, kind: str, names: list[str] | None) -> LoadedWeights:
    """Official and HF checkpoints are COCO models: label i is the i-th COCO category."""
    if names is None and config.num_classes == len(COCO_CLASS_NAMES):
        names, ids = list(COCO_CLASS_NAMES), list(COCO_CATEGORY_IDS)
    else:
        names = names or [f"class_{i}" for i in range(config.num_classes)]
        ids = list(range(config.num_classes))
    return LoadedWeights(config, state_dict, names, ids, kind)


def _read_ours(path: Path, checkpoint: dict[str, Any]) -> LoadedWeights:
    version = checkpoint["rtdetr_format"]
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has rtdetr_format {version}; this version of rtdetr reads {FORMAT_VERSION}")
    try:
        config = ModelConfig(**checkpoint["config"])
        state_dict = checkpoint["ema"] if checkpoint.get("ema") is not None else checkpoint["model"]
        return LoadedWeights(
            config, state_dict, list(checkpoint["class_names"]), list(checkpoint["category_ids"]), "rtdetr"
        )
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} is a damaged rtdetr checkpoint: {error}") from None


def model_checkpoint(
    config: ModelConfig, state_dict: dict[str, Tensor], class_names: list[str], category_ids: list[int], **extra: Any
) -> dict[str, Any]:
    """Our checkpoint dict: weights with the resolved config and class names (plus training state in `extra`)."""
    return {
        "rtdetr_format": FORMAT_VERSION,
        "config": config_dict(config),
        "class_names": list(class_names),
        "category_ids": [int(i) for i in category_ids],
        "model": state_dict,
        **extra,
    }


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a crash while
    saving leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
