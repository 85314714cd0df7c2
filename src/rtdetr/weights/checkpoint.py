"""Our checkpoint format, and reading any `.pt`/`.pth` file safely.

Ours: a dict with `rtdetr_format`, the resolved `config`, `class_names`, `category_ids`, `model` and optionally
`ema` weights (plus training state in last.pt). Files are read with `torch.load(weights_only=True)`: a
checkpoint can never run code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig, config_dict

FORMAT_VERSION = 1


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


def is_ours(checkpoint: Any) -> bool:
    return isinstance(checkpoint, dict) and "rtdetr_format" in checkpoint


def read_ours(path: Path, checkpoint: dict[str, Any]) -> tuple[ModelConfig, dict[str, Tensor], list[str], list[int]]:
    """(config, weights — the EMA ones when present —, class names, category ids) of one of our checkpoints."""
    version = checkpoint["rtdetr_format"]
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has rtdetr_format {version}; this version of rtdetr reads {FORMAT_VERSION}")
    try:
        config = ModelConfig(**checkpoint["config"])
        state_dict = checkpoint["ema"] if checkpoint.get("ema") is not None else checkpoint["model"]
        return config, state_dict, list(checkpoint["class_names"]), list(checkpoint["category_ids"])
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
