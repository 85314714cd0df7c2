"""Model size, FLOPs, latency (and, given data, AP) of one model in every backend: PyTorch eager, deploy mode
(optionally under autocast), ONNX Runtime, OpenVINO fp32 / bf16 / int8; and which kernels ran.

Every backend times the same work: the network plus the top-K post-processor (the exported graph), on the
same random batch. Runs are interleaved (A B C A B C ...) so that machine noise hits every backend alike.
FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (FLOPs = 2 x multiply-adds of the
convolutions and matrix products; element-wise ops, softmax and grid_sample are not counted), the convention
of the official model zoo table.
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..config import autocast
from ..engine.evaluation import evaluate
from ..export.onnx import EndToEndDetector, deployed_copy, export_onnx, matched_max_diff
from ..export.openvino import export_openvino, kernel_summary, runtime_precision
from ..export.quantize import DEFAULT_SPLIT, export_int8
from ..models.rtdetr import RTDETRModel
from .onnxruntime import OnnxDetector
from .openvino import OpenVinoDetector

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
    int8_calibration: Sequence[torch.Tensor] | str | Path | None = None,
    int8_split: str = DEFAULT_SPLIT,
    data: str | Path | None = None,
) -> dict[str, Any]:
    """Params, GFLOPs, latency of every backend, their matched output differences and the kernels that ran.

    Rows: PyTorch eager and deploy mode, ONNX Runtime, OpenVINO fp32 (on the CPU); amp 'bf16' / 'fp16' adds
    deploy mode under that autocast (and, for bf16 on the CPU, OpenVINO bf16); `int8_calibration` (images or a
    folder, `export.quantize.calibration_images`) adds OpenVINO int8 in `int8_split`. With `data` (a dataset
    folder), each row's COCO AP on its val split. `model` should already be on `device`; it is switched to
    eval. The ONNX model is exported to `onnx_path` (default: a temporary file). Returns a JSON-ready dict.
    """
    images = torch.rand(batch_size, 3, *image_size, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[image_size[1], image_size[0]]] * batch_size)
    eager = EndToEndDetector(model).eval()
    deployed = EndToEndDetector(deployed_copy(model)).to(device).eval()
    x, s = images.to(device), sizes.to(device)
    rows: dict[str, Callable[[], Any]] = {"pytorch_eager": lambda: eager(x, s), "pytorch_deploy": lambda: deployed(x, s)}
    if amp != "off":
        rows[f"pytorch_deploy_{amp}"] = lambda: tuple(t.float() for t in run_autocast(deployed, x, s, amp))
    kernels: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        graphs = export_graphs(model, Path(tmp), onnx_path, image_size, device, amp, int8_calibration, int8_split)
        feeds = {"images": images.numpy(), "orig_target_sizes": sizes.numpy()}
        for name, graph in graphs.items():
            if isinstance(graph, OnnxDetector):
                rows[name] = lambda session=graph.session: session.run(None, feeds)
            else:
                compiled = graph.compiled_for(batch_size)
                rows[name] = lambda compiled=compiled: compiled(feeds)
                kernels[name] = f"runs {runtime_precision(compiled)}: {kernel_summary(compiled)}"
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        with torch.inference_mode():
            reference = [t.cpu() for t in eager(x, s)]
            outputs = {name: graph.run(images, sizes) for name, graph in graphs.items()}
            outputs.update({name: [t.float().cpu() for t in rows[name]()] for name in rows if name.startswith("pytorch")})
            diffs = {name: _max_diffs(reference, list(out), image_size) for name, out in outputs.items()
                     if name != "pytorch_eager"}  # fmt: skip
            if device == "cpu":
                kernels.update({name: onednn_kernels(rows[name]) for name in rows if name.startswith("pytorch_deploy")})
            timings = time_interleaved(rows, runs, warmup, sync)
        accuracy = rows_ap(model, deployed.model, graphs, data, device, amp) if data is not None else {}
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
        "kernels": kernels,
        "ap": accuracy,
    }


def export_graphs(
    model: RTDETRModel,
    folder: Path,
    onnx_path: str | Path | None,
    image_size: tuple[int, int],
    device: str,
    amp: str,
    int8_calibration: Sequence[torch.Tensor] | str | Path | None,
    int8_split: str,
) -> dict[str, OnnxDetector | OpenVinoDetector]:
    """The exported rows of `benchmark_model`, written under `folder`: name -> its detector."""
    onnx_file = export_onnx(model, onnx_path or folder / "model.onnx", image_size, check=False)
    graphs: dict[str, OnnxDetector | OpenVinoDetector] = {"onnxruntime": OnnxDetector(onnx_file, device)}
    if device != "cpu":
        return graphs
    for precision in ("fp32", "bf16") if amp == "bf16" else ("fp32",):
        path = export_openvino(model, folder / f"openvino_{precision}", image_size, precision, check=False)
        graphs[f"openvino_{precision}"] = OpenVinoDetector(path)
    if int8_calibration is not None:
        path = export_int8(model, folder / "openvino_int8", int8_calibration, "openvino", int8_split, image_size)
        graphs["openvino_int8"] = OpenVinoDetector(path)
    return graphs


def rows_ap(
    model: RTDETRModel, deployed: nn.Module, graphs: dict, data: str | Path, device: str, amp: str
) -> dict[str, float]:
    """COCO AP on `data`'s val split of every row of `benchmark_model`."""
    names = dict(class_names=getattr(model, "class_names", None), category_ids=getattr(model, "category_ids", None))
    if names["class_names"] is None:
        raise ValueError("AP rows need a model with class names and category ids (load it from its checkpoint)")
    common = dict(device=device, verbose=False, **names)
    accuracy = {"pytorch_eager": evaluate(model, data, "val", **common)["AP"],
                "pytorch_deploy": evaluate(deployed, data, "val", **common)["AP"]}  # fmt: skip
    if amp != "off":
        accuracy[f"pytorch_deploy_{amp}"] = evaluate(deployed, data, "val", amp=amp, **common)["AP"]
    for name, graph in graphs.items():
        accuracy[name] = evaluate(graph, data, "val", verbose=False)["AP"]
    return accuracy


def onednn_kernels(fn: Callable[[], Any]) -> str:
    """Which oneDNN kernels one call of `fn` ran: 'convolution brg_conv_fwd:avx512_core_bf16 x47, ...' (from
    oneDNN's verbose log, which it writes to file descriptor 1; captured here). PyTorch runs some fp32 ops
    outside oneDNN (its own or MKL kernels): those are not listed."""
    sys.stdout.flush()
    with tempfile.TemporaryFile(mode="w+") as log:
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        fields = [line.split(",") for line in log.read().splitlines() if line.startswith("onednn_verbose,")]
    counts = collections.Counter((f[5], f[6]) for f in fields if len(f) > 6 and f[3] == "exec" and f[5] != "reorder")
    return ", ".join(f"{kind} {kernel} x{n}" for (kind, kernel), n in counts.most_common()) or "no oneDNN kernels"


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
    """The benchmark result as a text table (AP when measured), then the kernels each row ran."""
    h, w = result["image_size"]
    ap = result.get("ap") or {}
    lines = [
        f"{result['model']}: {result['params'] / 1e6:.2f} M params, {result['gflops']:.2f} GFLOPs at {h}x{w}",
        f"  ({result['flops_note']})",
        f"  batch {result['batch_size']}, {result['device']}, {result['torch_threads']} threads",
        f"  {'backend':20s} {'median ms':>10s} {'min ms':>9s} {'max ms':>9s}" + (f" {'AP':>7s}" if ap else "")
        + "  max diff vs eager (scores / boxes)",
    ]  # fmt: skip
    for name, t in result["latency"].items():
        diff = result["max_diff_vs_eager"].get(name)
        diff_text = f"{diff['scores']:.1e} / {diff['boxes_normalised']:.1e}" if diff else "reference"
        ap_text = f" {ap[name]:7.4f}" if name in ap else (" " * 8 if ap else "")
        lines.append(f"  {name:20s} {t['median_ms']:10.1f} {t['min_ms']:9.1f} {t['max_ms']:9.1f}{ap_text}  {diff_text}")
    if result.get("kernels"):
        lines.append("  kernels (oneDNN for PyTorch, the runtime graph for OpenVINO):")
        lines += [f"    {name}: {text}" for name, text in result["kernels"].items()]
    return "\n".join(lines)
