"""`RTDETR`: the network with the class names of its data, and everything a user does with it.

    model = RTDETR.from_checkpoint("rtdetr_r18vd_dec3_6x_coco_from_paddle.pth")  # or RTDETR.from_preset(...)
    out = model(images)              # eval: [B,3,H,W] RGB in [0,1] -> pred_logits [B,Q,C], pred_boxes [B,Q,4]
    dets = model.predict(["a.jpg", pil_image, ndarray], score_threshold=0.5)
    dets = model.predict("aerial.jpg", tile=640)         # tiled: small objects in large images
    result = model.track("clip.mp4", "runs/track")       # ByteTrack: annotated video, JSON, MOT text
    run = model.fit(data="datasets/mine", epochs=12)    # fine-tune; the model then holds the best weights
    metrics = model.evaluate(data="datasets/mine")      # COCO metrics
    model.export("model.onnx")                           # checked against PyTorch in ONNX Runtime
    model.save_pretrained("hf_folder")                   # a Hugging Face folder

This is the top floor: it calls down into `weights` (reading), `engine` (training, evaluation), `export` and
`inference`; nothing below imports it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .config import ModelConfig, autocast, config_dict, preset
from .data.images import ImageInput, model_input_batches
from .engine.evaluation import evaluate
from .engine.run import train
from .export.onnx import export_onnx
from .export.openvino import export_openvino, is_openvino
from .inference.onnxruntime import OnnxDetector
from .inference.openvino import OpenVinoDetector
from .inference.sources import PredictOptions
from .inference.tiling import TileOptions, predict_tiled
from .inference.tracking import TrackerOptions, TrackResult, track_video
from .loss.criterion import RTDETRCriterion
from .models.rtdetr import RTDETRModel
from .postprocess import Detections, postprocess
from .weights.checkpoint import atomic_save, model_checkpoint, torch_load
from .weights.huggingface import save_hf_folder
from .weights.loading import fit_state_dict, read_weights, truncate_decoder

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    """A finished `RTDETR.fit`: the run folder (best.pt, last.pt, log.jsonl, curves.png) and the validation
    metrics of the best weights (None if no evaluation ran)."""

    output: Path
    metrics: dict | None
    best_epoch: int | None


class RTDETR(RTDETRModel):
    """RT-DETR with the class names and dataset category ids of the data it was trained on."""

    def __init__(
        self, config: ModelConfig, class_names: Sequence[str] | None = None, category_ids: Sequence[int] | None = None
    ) -> None:
        super().__init__(config)
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
        weights = read_weights(path)
        state_dict = weights.state_dict
        if "num_decoder_layers" in overrides:
            available = weights.config.num_decoder_layers
            state_dict = truncate_decoder(state_dict, available, overrides["num_decoder_layers"], str(path))
            overrides.setdefault("eval_idx", -1)
        model = cls(weights.config.replace(**overrides), weights.class_names, weights.category_ids)
        fit_state_dict(model, state_dict, weights.source, strict=strict)
        logger.info("loaded %s checkpoint %s (%d tensors)", weights.kind, path, len(state_dict))
        return model.eval()

    def load_weights(self, state_dict: dict[str, Tensor], source: str = "state dict", strict: bool = True) -> list[str]:
        """Load weights, reporting mismatches by name. Returns the names of the tensors left at their
        initial values (non-strict loading only); raises on mis-shaped tensors and, if strict, on any mismatch."""
        return fit_state_dict(self, state_dict, source, strict=strict).missing

    def compute_loss(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Training loss (call in train mode): every weighted term by name and their sum under "loss", from the
        criterion the trainer uses. targets: per image, `labels` int64 [n] in 0..C-1 and `boxes` [n, 4]
        normalised cx,cy,w,h. The loss is computed in fp32 even under autocast."""
        if not self.training:
            raise RuntimeError("compute_loss needs train mode (model.train()): eval outputs carry no aux/denoising terms")
        return RTDETRCriterion(self.config.num_classes)(self(images, targets), targets)

    @torch.inference_mode()
    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        score_threshold: float = 0.5,
        image_size: tuple[int, int] | None = None,
        batch_size: int = 8,
        max_detections: int = 300,
        amp: str = "off",
        tile: int | TileOptions | None = None,
    ) -> list[Detections]:
        """Detect objects: per image, boxes [N, 4] pixel xyxy in the original image, scores, labels
        (dataset category ids) and class names, sorted by score.

        Images: file paths (EXIF orientation applied), PIL images, uint8 arrays [H, W(, 3|4)] RGB, or float
        tensors [3, H, W] RGB in [0, 1]. Each is resized to `image_size` (default: the config's, (H, W)),
        ignoring aspect ratio, as in training. At most `max_detections` (query, class) pairs per image.
        amp: 'bf16' (or 'fp16' on CUDA) runs the network under autocast: on CPUs with AMX / AVX512-BF16
        about 2x faster, at a small accuracy cost (benchmarks/RESULTS.md); post-processing stays fp32.
        tile: for images much larger than the input with small objects, cut each image into tiles of this side
        in original pixels (a `TileOptions` sets the overlap, a full-frame pass and the merge), run them in
        batches of `batch_size` and merge the boxes across tile borders (`inference.tiling`).
        """
        if tile is not None:
            tiles = tile if isinstance(tile, TileOptions) else TileOptions(tile)
            return predict_tiled(self, images, tiles, score_threshold, image_size, batch_size, max_detections, amp)
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

    def track(
        self,
        video: str | Path,
        output: str | Path = "runs/track",
        tracker: TrackerOptions | None = None,
        image_size: tuple[int, int] | None = None,
        batch_size: int = 8,
        amp: str = "off",
    ) -> TrackResult:
        """Detect and track objects through a video with ByteTrack at thresholds set for RT-DETR's scores
        (`tracker`; see `inference.tracking`). Writes `<stem>_track.mp4` (boxes with track ids and trails),
        `<stem>_tracks.json` (per frame) and `<stem>_mot.txt` (MOT challenge text) to `output`; returns the
        tracked detections of every frame (`TrackedDetections`: `Detections` plus `track_ids`)."""
        options = PredictOptions(image_size=image_size, batch_size=batch_size, amp=amp)
        return track_video(self, video, output, options, tracker)

    def fit(self, data: str | Path | None = None, **settings: Any) -> FitResult:
        """Train (fine-tune) these weights on a dataset folder (`rtdetr.engine.run.train` takes the same
        settings: epochs, batch_size, output, lr, ... any TrainConfig field, and explicit split paths).
        With other classes than the model's, the class heads start fresh. Afterwards this model holds the best
        (EMA) weights of the run, with the dataset's classes."""
        output = train(self, data, **settings)
        best = output / "best.pt"
        weights = read_weights(best if best.exists() else output / "last.pt")
        device = next(self.parameters()).device
        # The dataset may have other classes (other head shapes): rebuild in place, then load.
        RTDETR.__init__(self, weights.config, weights.class_names, weights.category_ids)
        fit_state_dict(self, weights.state_dict, weights.source)
        self.to(device).eval()
        saved = torch_load(best) if best.exists() else {}
        return FitResult(output, saved.get("metrics"), saved.get("epoch"))

    def evaluate(self, data: str | Path | None = None, split: str = "val", **options: Any) -> dict:
        """COCO metrics of this model on a split of a dataset folder (`rtdetr.engine.evaluation.evaluate`
        options: output, image_size, batch_size, amp, ...)."""
        return evaluate(self, data, split, class_names=self.class_names, category_ids=self.category_ids, **options)

    def export(
        self, path: str | Path, image_size: tuple[int, int] | None = None, format: str = "onnx", **options: Any
    ) -> Path:
        """Export to ONNX (post-processor inside; options: opset, batch_size_dynamic) or, with
        format='openvino', to an OpenVINO IR folder (option: precision fp32 / bf16 / fp16), and check it against
        PyTorch on the bundled sample image; raises `ExportCheckError` if they differ."""
        names = dict(class_names=self.class_names, category_ids=self.category_ids)
        if format == "openvino":
            return export_openvino(self, path, image_size, **names, **options)
        if format != "onnx":
            raise ValueError(f"format must be 'onnx' or 'openvino', got {format!r}")
        return export_onnx(self, path, image_size, **names, **options)

    def save(self, path: str | Path, **extra: Any) -> None:
        """Write our checkpoint format (weights, resolved config, class names, category ids) atomically."""
        checkpoint = model_checkpoint(self.config, self.state_dict(), self.class_names, self.category_ids, **extra)
        atomic_save(checkpoint, path)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a Hugging Face folder (config.json + model.safetensors) that
        `transformers.RTDetrForObjectDetection.from_pretrained(folder)` loads strictly."""
        save_hf_folder(self, self.config, folder, self.class_names)

    def extra_repr(self) -> str:
        return f"config={config_dict(self.config)}"


def load_detector(
    weights: str | Path | None,
    preset_name: str | None = None,
    num_decoder_layers: int | None = None,
    device: str = "cpu",
    deploy: bool = True,
    cross_attn_method: str | None = None,
) -> RTDETR | OnnxDetector | OpenVinoDetector:
    """A ready-to-predict detector (see `inference.detector.Detector`).

    weights: an `.onnx` export (run in ONNX Runtime), an OpenVINO IR (a folder with model.xml, or the .xml),
    or any checkpoint `RTDETR.from_checkpoint` reads (ours,
    official `.pth`, a Hugging Face folder). Without weights, `preset_name` with random weights (a warning
    says so). num_decoder_layers: keep the first k decoder layers and use the k-th layer's head (PyTorch
    weights only). deploy: re-parameterise the PyTorch model for inference (same outputs up to float
    rounding, faster). cross_attn_method: 'default' or 'discrete' sampling (v2; see `RTDETR.from_checkpoint`).
    """
    if weights is not None and (Path(weights).suffix.lower() == ".onnx" or is_openvino(weights)):
        for flag, value in (("--decoder-layers", num_decoder_layers), ("--cross-attn-method", cross_attn_method)):
            if value:
                raise ValueError(f"{weights}: an exported graph is fixed at export; export it again with {flag}")
        if Path(weights).suffix.lower() == ".onnx":
            return OnnxDetector(weights, device)
        return OpenVinoDetector(weights, device)
    overrides: dict[str, Any] = {"num_decoder_layers": num_decoder_layers} if num_decoder_layers else {}
    if cross_attn_method:
        overrides["cross_attn_method"] = cross_attn_method
    if weights is not None:
        model = RTDETR.from_checkpoint(weights, **overrides)
    elif preset_name is not None:
        logger.warning("no weights given: %s with RANDOM weights (boxes are meaningless)", preset_name)
        # The k-th layer's head: eval_idx is relative to the kept layers (the preset's may point past them).
        model = RTDETR.from_preset(preset_name, **overrides, **({"eval_idx": -1} if overrides else {}))
    else:
        raise ValueError("give weights (a checkpoint, a Hugging Face folder or an .onnx file) or a preset")
    model = model.to(device).eval()
    return model.deploy() if deploy else model
