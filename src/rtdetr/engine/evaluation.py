"""Running a model over a dataset split and scoring it: `evaluate(weights, data=..., split="val", output=...)`.

The scoring itself is `evaluator.CocoEvaluator` (pycocotools). Used by the trainer every epoch (with the EMA
weights), by `RTDETR.evaluate` and by `rtdetr eval`. Under torchrun every process
scores a shard of the images and the detections are gathered before COCOeval runs on rank 0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..config import autocast
from ..data.coco import BatchCollator, CocoDetection
from ..data.datasets import open_split
from ..data.transforms import eval_transforms
from ..models.rtdetr import RTDETRModel
from ..postprocess import postprocess, select_detections
from ..weights.loading import fit_state_dict, read_weights
from .distributed import Rank, cleanup_distributed, init_distributed
from .evaluator import CocoEvaluator

logger = logging.getLogger(__name__)


def eval_loader(dataset: CocoDetection, batch_size: int, num_workers: int, process: Rank) -> DataLoader:
    """Batches of this process's shard (every world_size-th image, in order; no padding, no shuffling)."""
    shard = Subset(dataset, range(process.rank, len(dataset), process.world_size))
    return DataLoader(
        shard, batch_size=batch_size, num_workers=num_workers, collate_fn=BatchCollator(),
        pin_memory=process.device.type == "cuda", generator=torch.Generator().manual_seed(0),
    )  # fmt: skip


class ExportedGraph(Protocol):
    """An exported model's runner (`inference.onnxruntime.OnnxDetector`, `inference.openvino.OpenVinoDetector`):
    run(images [N, 3, H, W], orig_sizes [N, 2]) -> labels [N, K], boxes [N, K, 4] pixel xyxy, scores [N, K]."""

    class_names: list[str]
    category_ids: list[int]
    image_size: tuple[int, int]

    def run(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: DataLoader,
    evaluator: CocoEvaluator,
    category_ids: list[int],
    class_names: list[str],
    process: Rank,
    amp: str = "off",
) -> dict | None:
    """Run `model` (eval mode) over `loader` and score it: the metrics dict of `CocoEvaluator.summarize`
    on rank 0, None on the other ranks. Label i of the model is `category_ids[i]` / `class_names[i]`."""
    was_training = model.training
    model.eval()
    for images, targets in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not process.is_main):
        with autocast(process.device, amp):
            outputs = model(images.to(process.device, non_blocking=True))
        outputs = {k: outputs[k].float().cpu() for k in ("pred_logits", "pred_boxes")}
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        detections = postprocess(outputs, orig_sizes, category_ids, class_names)
        evaluator.update([int(t["image_id"]) for t in targets], detections)
    evaluator.gather()
    model.train(was_training)
    return evaluator.summarize() if process.is_main else None


@torch.no_grad()
def evaluate_graph(
    graph: ExportedGraph, loader: DataLoader, evaluator: CocoEvaluator, process: Rank
) -> dict | None:
    """As `evaluate_model` for an exported graph (post-processor inside): its top-K detections are scored as
    they come out, so the metrics are those of the artifact users run."""
    for images, targets in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not process.is_main):
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        labels, boxes, scores = graph.run(images, orig_sizes)
        detections = select_detections(labels, boxes, scores, graph.category_ids, graph.class_names)
        evaluator.update([int(t["image_id"]) for t in targets], detections)
    evaluator.gather()
    return evaluator.summarize() if process.is_main else None


def check_categories(category_ids: list[int], class_names: list[str], dataset: CocoDetection) -> None:
    """The model's (category id, class name) pairs must be the dataset's: otherwise scores are meaningless."""
    ours = dict(zip(category_ids, class_names))
    theirs = dict(zip(dataset.category_ids, dataset.class_names))
    wrong = [f"{i}: model '{name}' vs dataset '{theirs.get(i, '<absent>')}'" for i, name in ours.items()
             if theirs.get(i) != name]  # fmt: skip
    if wrong:
        raise ValueError(
            f"the model's classes do not match {dataset.ann_file} (category id: names): " + "; ".join(wrong[:10])
            + ". Evaluate a model trained on this dataset's categories."
        )  # fmt: skip


def evaluate(
    weights: str | Path | nn.Module,
    data: str | Path | None = None,
    split: str = "val",
    output: str | Path | None = None,
    *,
    ann_file: str | Path | None = None,
    image_dir: str | Path | None = None,
    image_size: tuple[int, int] | None = None,
    batch_size: int = 32,
    num_workers: int = 2,
    device: str = "auto",
    amp: str = "off",
    verbose: bool = True,
    class_names: list[str] | None = None,
    category_ids: list[int] | None = None,
) -> dict:
    """COCO box metrics of a checkpoint (or model) on a split of a dataset folder `data` of any layout (COCO,
    Roboflow, YOLO) or of an explicit COCO `ann_file` + `image_dir`.

    Returns {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "per_class"} (on every
    process). With `output`, writes output/metrics.json and output/predictions.json (COCO results with the
    dataset's own image and category ids). Images are resized to `image_size` (H, W), default the model's.
    amp: 'bf16' / 'fp16' run the forward under autocast (e.g. to measure bf16 inference accuracy).
    weights: a checkpoint any `read_weights` reads, a network with its `class_names` and `category_ids`, or an
    exported graph (`ExportedGraph`: an ONNX or OpenVINO detector, evaluated at its exported size, on the CPU).
    """
    if not isinstance(weights, (str, Path, nn.Module)):
        return _evaluate_exported(weights, data, split, output, ann_file, image_dir, image_size, batch_size,
                                  num_workers, amp, verbose)  # fmt: skip
    process = init_distributed(device)
    try:
        if isinstance(weights, nn.Module):
            model = weights
            if class_names is None or category_ids is None:
                raise ValueError("evaluating a network needs its class_names and category_ids")
        else:
            model, class_names, category_ids = _load_network(weights)
        model = model.to(process.device).eval()
        dataset = _dataset(data, split, ann_file, image_dir, tuple(image_size or model.config.image_size))
        check_categories(category_ids, class_names, dataset)
        evaluator = CocoEvaluator(dataset.coco, dataset.class_names)
        loader = eval_loader(dataset, batch_size, num_workers, process)
        metrics = evaluate_model(model, loader, evaluator, category_ids, class_names, process, amp)
        if process.is_main:
            _report(metrics, dataset, evaluator, output, verbose)
        return metrics if not process.distributed else _broadcast(metrics)
    finally:
        cleanup_distributed()


def _evaluate_exported(
    graph: ExportedGraph, data, split, output, ann_file, image_dir, image_size, batch_size, num_workers, amp, verbose
) -> dict:
    """`evaluate` of an exported graph: one process, its own size and precision."""
    if amp != "off":
        raise ValueError(f"amp={amp!r}: an exported graph runs in the precision it was exported with")
    if image_size is not None and tuple(image_size) != tuple(graph.image_size):
        raise ValueError(f"the graph was exported for {graph.image_size}, not {tuple(image_size)}: export it again")
    dataset = _dataset(data, split, ann_file, image_dir, tuple(graph.image_size))
    check_categories(graph.category_ids, graph.class_names, dataset)
    evaluator = CocoEvaluator(dataset.coco, dataset.class_names)
    loader = eval_loader(dataset, batch_size, num_workers, Rank(0, 1, torch.device("cpu")))
    metrics = evaluate_graph(graph, loader, evaluator, Rank(0, 1, torch.device("cpu")))
    _report(metrics, dataset, evaluator, output, verbose)
    return metrics


def _dataset(data, split, ann_file, image_dir, image_size: tuple[int, int]) -> CocoDetection:
    transforms = eval_transforms(image_size)
    if ann_file is not None and image_dir is not None:
        return CocoDetection(ann_file, image_dir, transforms)
    if data is not None:
        return open_split(data, split, transforms)
    raise ValueError("evaluate needs `data` (a dataset folder) or both `ann_file` and `image_dir`")


def _report(metrics, dataset: CocoDetection, evaluator: CocoEvaluator, output, verbose: bool) -> None:
    if verbose:
        print(f"{dataset.ann_file}: {len(dataset)} images\n{evaluator.table()}")
    if output is not None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (output / "predictions.json").write_text(json.dumps(evaluator.results()))


def _load_network(path: str | Path) -> tuple[RTDETRModel, list[str], list[int]]:
    weights = read_weights(path)
    network = RTDETRModel(weights.config)
    fit_state_dict(network, weights.state_dict, weights.source)
    return network, weights.class_names, weights.category_ids


def _broadcast(metrics: dict | None) -> dict:
    holder = [metrics]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]
