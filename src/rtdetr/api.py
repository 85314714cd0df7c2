"""`RTDETR`: the network plus its class names, with loading, saving and prediction.

    model = RTDETR.from_checkpoint("rtdetr_r18vd_dec3_6x_coco_from_paddle.pth")  # or RTDETR.from_preset(...)
    out = model(images)              # eval: [B,3,H,W] RGB in [0,1] -> pred_logits [B,Q,C], pred_boxes [B,Q,4]
    dets = model.predict(["a.jpg", pil_image, ndarray], score_threshold=0.5)
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .config import ModelConfig, autocast, config_dict, preset
from .data.images import ImageInput, load_image, model_input_batches  # noqa: F401 (load_image re-exported)
from .engine.checkpoint import atomic_save, model_checkpoint, read_checkpoint
from .loss.criterion import RTDETRCriterion
from .models.rtdetr import RTDETRModel
from .postprocess import Detections, postprocess

logger = logging.getLogger(__name__)

class RTDETR(RTDETRModel):
    """RT-DETR with the class names and dataset category ids of the data it was trained on."""

    def __init__(
        self, config: ModelConfig, class_names: Sequence[str] | None = None, category_ids: Sequence[int] | None = None
    ) -> None:
        super().__init__(config)
        self.config = config
        self.criterion = RTDETRCriterion(config.num_classes)  # no parameters: not in the state dict
        self.class_names = list(class_names or [f"class_{i}" for i in range(config.num_classes)])
        self.category_ids = list(category_ids if category_ids is not None else range(config.num_classes))
        if not len(self.class_names) == len(self.category_ids) == config.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names and {len(self.category_ids)} category ids "
                f"for a model of {config.num_classes} classes"
            )

    @classmethod
    def from_preset(
        cls, name: str, class_names: Sequence[str] | None = None, category_ids: Sequence[int] | None = None,
        **overrides: Any,
    ) -> "RTDETR":  # fmt: skip
        """A randomly initialised preset (`rtdetr_r18vd`, ..., `rtdetr_tiny`); overrides by ModelConfig field."""
        if class_names is not None and "num_classes" not in overrides:
            overrides["num_classes"] = len(class_names)
        return cls(preset(name, **overrides), class_names, category_ids)

    @classmethod
    def from_checkpoint(cls, path: str | Path, strict: bool = True, **overrides: Any) -> "RTDETR":
        """Load an official, Hugging Face or rtdetr checkpoint; the variant is read from the weights.

        `num_decoder_layers=k` keeps the first k decoder layers and evaluates the k-th layer's head (the
        paper's speed knob, Table 2: no retraining); `num_denoising=n` and the other ModelConfig fields that do
        not change tensor shapes may be overridden too. Loading is strict: any missing, unexpected or
        mis-shaped tensor raises with its name.
        """
        weights = read_checkpoint(path)
        state_dict = dict(weights.state_dict)
        config = weights.config
        if "num_decoder_layers" in overrides:
            state_dict = _truncate_decoder(state_dict, config.num_decoder_layers, overrides["num_decoder_layers"], path)
            overrides.setdefault("eval_idx", -1)
        model = cls(config.replace(**overrides), weights.class_names, weights.category_ids)
        model.load_weights(state_dict, source=str(path), strict=strict)
        logger.info("loaded %s checkpoint %s (%d tensors)", weights.kind, path, len(state_dict))
        return model.eval()

    def load_weights(self, state_dict: dict[str, Tensor], source: str = "state dict", strict: bool = True) -> list[str]:
        """Load weights, reporting mismatches by name. Returns the names of the tensors left at their
        initial values (non-strict loading only); raises on mis-shaped tensors and, if strict, on any mismatch."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        misshaped = [
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
            for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape
        ]  # fmt: skip
        problems = []
        if misshaped:
            problems.append(f"{len(misshaped)} mis-shaped: " + "; ".join(misshaped[:10]))
        if strict and missing:
            problems.append(f"{len(missing)} missing: " + ", ".join(missing[:10]))
        if strict and unexpected:
            problems.append(f"{len(unexpected)} unexpected: " + ", ".join(unexpected[:10]))
        if problems:
            raise ValueError(
                f"weights from {source} do not fit this {self.describe()} model: " + " | ".join(problems)
                + ". Is it a checkpoint of another variant?"
            )  # fmt: skip
        self.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
        return missing

    def compute_loss(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Training loss (call in train mode): every weighted term by name and their sum under "loss".

        targets: per image, `labels` int64 [n] in 0..C-1 and `boxes` [n, 4] normalised cx,cy,w,h.
        The loss is computed in fp32 even under autocast.
        """
        if not self.training:
            raise RuntimeError("compute_loss needs train mode (model.train()): eval outputs carry no aux/denoising terms")
        return self.criterion(self(images, targets), targets)

    def describe(self) -> str:
        c = self.config
        return f"R{c.depth} ({c.encoder_hidden_dim}-d encoder, {c.num_decoder_layers} decoder layers, {c.num_classes} classes)"

    def save(self, path: str | Path, **extra: Any) -> None:
        """Write our checkpoint format (weights, resolved config, class names, category ids) atomically."""
        checkpoint = model_checkpoint(self.config, self.state_dict(), self.class_names, self.category_ids, **extra)
        atomic_save(checkpoint, path)

    @torch.inference_mode()
    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        score_threshold: float = 0.5,
        image_size: tuple[int, int] | None = None,
        batch_size: int = 8,
        max_detections: int = 300,
        amp: str = "off",
    ) -> list[Detections]:
        """Detect objects: per image, boxes [N, 4] pixel xyxy in the original image, scores, labels
        (dataset category ids) and class names, sorted by score.

        Images: file paths (EXIF orientation applied), PIL images, uint8 arrays [H, W(, 3|4)] RGB, or float
        tensors [3, H, W] RGB in [0, 1]. Each is resized to `image_size` (default: the config's, (H, W)),
        ignoring aspect ratio, as in training. At most `max_detections` (query, class) pairs per image.
        amp: 'bf16' (or 'fp16' on CUDA) runs the network under autocast: on CPUs with AMX / AVX512-BF16
        about 2x faster, at a small accuracy cost (benchmarks/RESULTS.md); post-processing stays fp32.
        """
        size = tuple(image_size or self.config.image_size)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        results: list[Detections] = []
        for batch, orig_sizes in model_input_batches(images, size, batch_size):
            with autocast(device, amp):
                outputs = self(batch.to(device))
            outputs = {k: outputs[k].float() for k in ("pred_logits", "pred_boxes")}
            results += postprocess(
                outputs, orig_sizes.to(device), self.category_ids, self.class_names, score_threshold, max_detections
            )
        self.train(was_training)
        return [Detections(d.boxes.cpu(), d.scores.cpu(), d.labels.cpu(), d.class_names) for d in results]

    def extra_repr(self) -> str:
        return f"config={config_dict(self.config)}"


def _truncate_decoder(state_dict: dict[str, Tensor], available: int, keep: int, path: Any) -> dict[str, Tensor]:
    """Drop the decoder layers (and their heads) from index `keep` on."""
    if not 1 <= keep <= available:
        raise ValueError(f"num_decoder_layers={keep}: {path} has {available} decoder layers (choose 1..{available})")
    dropped = re.compile(r"^decoder\.(decoder\.layers|dec_score_head|dec_bbox_head)\.(\d+)\.")
    return {k: v for k, v in state_dict.items() if not ((m := dropped.match(k)) and int(m.group(2)) >= keep)}
