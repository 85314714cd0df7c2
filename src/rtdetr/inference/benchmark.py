"""Model size, FLOPs and latency of one model in PyTorch eager, deploy mode and ONNX Runtime.

Every backend times the same work: the network plus the top-K post-processor (the exported graph), on the
same random batch. Runs are interleaved (A B C A B C ...) so that machine noise hits every backend alike.
FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (FLOPs = 2 x multiply-adds of the
convolutions and matrix products; element-wise ops, softmax and grid_sample are not counted), the convention
of the official model zoo table.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..config import autocast
from ..export.onnx import EndToEndDetector, deployed_copy, export_onnx, matched_max_diff, onnx_session
from ..models.rtdetr import RTDETRModel

PAUSE_S = 0.05  # idle seconds before each timed call (see `time_interleaved`)
FLOPS_NOTE = "FLOPs = 2 x multiply-adds, counted by torch.utils.flop_counter.FlopCounterMode (convs and matmuls)"


@dataclass
class Timing:
    """Wall-clock times of one backend in milliseconds."""

    runs_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs_ms)

    def summary(self) -> dict[str, Any]:
        runs = self.runs_ms
        return {"median_ms": self.median, "min_ms": min(runs), "max_ms": max(runs), "runs": len(runs)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, images: torch.Tensor) -> int:
    """FLOPs (2 x multiply-adds) of one eval forward on `images`."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(images)
    model.train(was_training)
    return counter.get_total_flops()


def time_interleaved(
    candidates: dict[str, Callable[[], Any]],
    runs: int,
    warmup: int = 2,
    synchronize: Callable[[], None] = lambda: None,
    pause_s: float = PAUSE_S,
) -> dict[str, Timing]:
    """Call each candidate `warmup` times, then `runs` rounds of one call each, in turn, with `pause_s` of idle
    time (untimed) before each call.

    The pause matters on a CPU: after a run, OpenMP (PyTorch) and ONNX Runtime worker threads busy-wait for
    a while before sleeping; started at once, the next backend shares the cores with them (measured on 2
    cores: r18vd deploy 292 ms right after an ONNX Runtime run, 263 ms after a 50 ms pause).
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(runs):
        for name, fn in candidates.items():
            time.sleep(pause_s)
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: Timing(t) for name, t in times.items()}


def benchmark_model(
    model: RTDETRModel,
    image_size: tuple[int, int],
    batch_size: int = 1,
    device: str = "cpu",
    runs: int = 10,
    warmup: int = 2,
    onnx_path: str | Path | None = None,
    amp: str = "off",
) -> dict[str, Any]:
    """Params, GFLOPs, latency of eager / deploy / ONNX Runtime, and their matched output differences.

    `model` should already be on `device`; it is switched to eval. The ONNX model is exported to `onnx_path`
    (default: a temporary file). amp 'bf16' / 'fp16' adds deploy mode under that autocast. Returns a
    JSON-ready dict.
    """
    images = torch.rand(batch_size, 3, *image_size, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[image_size[1], image_size[0]]] * batch_size)
    eager = EndToEndDetector(model).eval()
    deployed = EndToEndDetector(deployed_copy(model)).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, onnx_path or Path(tmp) / "model.onnx", image_size, check=False)
        session = onnx_session(path, device)
    feeds = {"images": images.numpy(), "orig_target_sizes": sizes.numpy()}
    x, s = images.to(device), sizes.to(device)
    candidates = {
        "pytorch_eager": lambda: eager(x, s),
        "pytorch_deploy": lambda: deployed(x, s),
        "onnxruntime": lambda: session.run(None, feeds),
    }
    if amp != "off":
        candidates[f"pytorch_deploy_{amp}"] = lambda: run_autocast(deployed, x, s, amp)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        reference = [t.cpu() for t in eager(x, s)]
        diffs = {
            "pytorch_deploy": _max_diffs(reference, [t.cpu() for t in deployed(x, s)], image_size),
            "onnxruntime": _max_diffs(reference, [torch.from_numpy(a) for a in session.run(None, feeds)], image_size),
        }
        if amp != "off":
            got = [t.float().cpu() for t in run_autocast(deployed, x, s, amp)]
            diffs[f"pytorch_deploy_{amp}"] = _max_diffs(reference, got, image_size)
        timings = time_interleaved(candidates, runs, warmup, sync)
    return {
        "model": model.describe(),
        "image_size": list(image_size),
        "batch_size": batch_size,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "params": count_parameters(model),
        "gflops": count_flops(eager.model, images[:1].to(device)) / 1e9,
        "flops_note": FLOPS_NOTE + ", batch 1",
        "latency": {name: t.summary() for name, t in timings.items()},
        "max_diff_vs_eager": diffs,
    }


def run_autocast(detector: nn.Module, images: torch.Tensor, sizes: torch.Tensor, amp: str) -> Any:
    with autocast(images.device, amp):
        return detector(images, sizes)


def _max_diffs(reference: list[torch.Tensor], got: list[torch.Tensor], image_size: tuple[int, int]) -> dict[str, float]:
    """Matched max |score diff| and |box diff| / image size over the batch."""
    per_image = [
        matched_max_diff([t[i] for t in reference], [t[i] for t in got], box_scale=float(max(image_size)))
        for i in range(len(reference[0]))
    ]
    return {"scores": max(d[1] for d in per_image), "boxes_normalised": max(d[2] for d in per_image)}


def format_table(result: dict[str, Any]) -> str:
    """The benchmark result as a text table."""
    h, w = result["image_size"]
    lines = [
        f"{result['model']}: {result['params'] / 1e6:.2f} M params, {result['gflops']:.2f} GFLOPs at {h}x{w}",
        f"  ({result['flops_note']})",
        f"  batch {result['batch_size']}, {result['device']}, {result['torch_threads']} threads",
        f"  {'backend':16s} {'median ms':>10s} {'min ms':>9s} {'max ms':>9s}  max diff vs eager (scores / boxes)",
    ]
    for name, t in result["latency"].items():
        diff = result["max_diff_vs_eager"].get(name)
        diff_text = f"{diff['scores']:.1e} / {diff['boxes_normalised']:.1e}" if diff else "reference"
        lines.append(f"  {name:16s} {t['median_ms']:10.1f} {t['min_ms']:9.1f} {t['max_ms']:9.1f}  {diff_text}")
    return "\n".join(lines)

