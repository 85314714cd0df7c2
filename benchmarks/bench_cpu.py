"""CPU latency of RT-DETR: ours (eager, deploy, ONNX Runtime) against Hugging Face transformers (eager, ONNX
Runtime), same weights, batch 1, fp32, plus the machine's conv roof and a per-component profile.

    python3 benchmarks/bench_cpu.py --presets rtdetr_r18vd rtdetr_r50vd --runs 10 --json bench_cpu.json
    python3 benchmarks/bench_cpu.py --amp bf16 ...   # adds deploy mode under bf16 autocast (AMX / AVX512-BF16)

On a shared machine use --threads 1 unless it is idle: with as many OpenMP threads as cores, one busy core
elsewhere makes every parallel region wait for the descheduled thread (measured here: r18vd deploy 0.59 s
with 1 thread, 3.6 s with 2 threads, while another process kept one of the 2 cores busy).

Every backend runs network + top-K post-processor on the same image (the bundled sample resized to the input
size). Outputs are compared first (matched detections, scores and boxes / image size). Runs are interleaved
(A B C D E A B C D E ...): machine noise, which on a shared machine is large, hits every backend alike.
The roof is model FLOPs / the measured throughput of one large 3x3 convolution: a floor no backend beats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import torch
from torch import Tensor, nn
from transformers import RTDetrConfig, RTDetrForObjectDetection

import rtdetr.models.deform_attn as deform_attn
from rtdetr import RTDETR
from rtdetr.data.images import to_model_input
from rtdetr.convert.huggingface import hf_config_from_model_config, official_to_hf
from rtdetr.export.benchmark import (
    FLOPS_NOTE,
    count_flops,
    count_parameters,
    ort_session,
    run_autocast,
    time_interleaved,
)
from rtdetr.export.onnx import DeployedDetector, deployed_copy, export_onnx, matched_max_diff, sample_image
from rtdetr.models.backbone import FrozenBatchNorm2d
from rtdetr.postprocess import topk_detections

Detections3 = tuple[Tensor, Tensor, Tensor]


class HFDetector(nn.Module):
    """HF's model + our top-K post-processor: forward(images, orig_target_sizes) -> labels, boxes, scores."""

    def __init__(self, hf: RTDetrForObjectDetection) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, images: Tensor, orig_target_sizes: Tensor) -> Detections3:
        out = self.hf(pixel_values=images)
        return topk_detections(out.logits, out.pred_boxes, orig_target_sizes)


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    names = [line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")]
    model = names[0] if names else platform.processor()
    return {
        "cpu": model, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }  # fmt: skip


def conv_throughput(runs: int = 10) -> float:
    """GFLOP/s of one large 3x3 conv (256 -> 256 channels on 80x80, 7.55 GFLOP = 2 x multiply-adds)."""
    conv = nn.Conv2d(256, 256, 3, padding=1).eval()
    x = torch.rand(1, 256, 80, 80)
    flops = 2 * 256 * 256 * 9 * 80 * 80
    with torch.inference_mode():
        timing = time_interleaved({"conv": lambda: conv(x)}, runs, warmup=2)["conv"]
    return flops / (min(timing.runs_ms) / 1000) / 1e9


@torch.no_grad()
def calibrate_norms(model: nn.Module, images: Tensor) -> None:
    """Set every BatchNorm's (also frozen ones') statistics from its input on `images`, layer by layer.

    With random weights and the init statistics the signal fades through the backbone and all tokens look
    alike, so query selection is decided by float noise and no two backends could agree; calibrated
    statistics make the random model behave like a trained one in that respect.
    """

    def set_stats(module: nn.Module, inputs: tuple[Tensor]) -> None:
        module.running_mean.copy_(inputs[0].mean((0, 2, 3)))
        module.running_var.copy_(inputs[0].var((0, 2, 3)))

    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    hooks = [m.register_forward_pre_hook(set_stats) for m in norms]
    model.eval()(images)
    for hook in hooks:
        hook.remove()


def hf_twin(model: RTDETR) -> RTDetrForObjectDetection:
    hf = RTDetrForObjectDetection(RTDetrConfig(**hf_config_from_model_config(model.config, None)))
    hf.load_state_dict(official_to_hf(model.state_dict()), strict=True)
    return hf.eval()


def export_hf_onnx(detector: HFDetector, path: Path, size: int) -> Path:
    example = (torch.rand(1, 3, size, size), torch.tensor([[size, size]]))
    with torch.no_grad():
        torch.onnx.export(
            detector, example, str(path), input_names=["images", "orig_target_sizes"],
            output_names=["labels", "boxes", "scores"], opset_version=17, dynamo=False,
        )  # fmt: skip
    return path


def build_backends(
    model: RTDETR, size: int, folder: Path, amp: str = "off"
) -> dict[str, Callable[[Tensor, Tensor], Detections3]]:
    """The five backends (six with `amp`: deploy mode under autocast), each a function
    (images, orig_sizes) -> (labels, boxes, scores)."""
    ours_onnx = ort_session(export_onnx(model, folder / "ours.onnx", (size, size), check=False))
    # eval() on the wrapper itself: torch.onnx.export restores the wrapper's mode recursively afterwards, and a
    # wrapper left in train mode would switch the HF model inside it to train mode (BatchNorm updating its stats).
    hf = HFDetector(hf_twin(model)).eval()
    hf_onnx = ort_session(export_hf_onnx(hf, folder / "hf.onnx", size))

    def run_session(session: Any) -> Callable[[Tensor, Tensor], Detections3]:
        def run(x: Tensor, s: Tensor) -> Detections3:
            outputs = session.run(None, {"images": x.numpy(), "orig_target_sizes": s.numpy()})
            return tuple(torch.from_numpy(a) for a in outputs)

        return run

    deployed = DeployedDetector(deployed_copy(model)).eval()
    backends = {
        "ours_eager": DeployedDetector(model).eval(),
        "ours_deploy": deployed,
        "ours_onnxruntime": run_session(ours_onnx),
        "hf_eager": hf,
        "hf_onnxruntime": run_session(hf_onnx),
    }
    if amp != "off":
        backends[f"ours_deploy_{amp}"] = lambda x, s: tuple(t.float() for t in run_autocast(deployed, x, s, amp))
    return backends


def check_outputs(backends: dict[str, Callable], x: Tensor, sizes: Tensor, scale: float) -> dict[str, dict[str, float]]:
    """Matched max |diff| of every backend against ours_eager."""
    with torch.inference_mode():
        outputs = {name: [t[0] for t in fn(x, sizes)] for name, fn in backends.items()}
    reference = outputs["ours_eager"]
    diffs = {}
    for name, out in outputs.items():
        compared, score, box = matched_max_diff(reference, out, box_scale=scale)
        diffs[name] = {"compared": compared, "scores": score, "boxes_normalised": box}
    return diffs


@contextmanager
def captured_core_calls() -> Iterator[list[tuple]]:
    """Record the arguments of every `deformable_attention_core` call made inside the block."""
    calls: list[tuple] = []
    original = deform_attn.deformable_attention_core

    def recording(*args: Any) -> Tensor:
        calls.append(args)
        return original(*args)

    with mock.patch.object(deform_attn, "deformable_attention_core", recording):
        yield calls


def component_profile(model: RTDETR, x: Tensor, runs: int) -> dict[str, Any]:
    """Median ms of backbone, encoder, decoder (query selection + layers + heads) and of the deformable
    attention core alone (all of its calls in one forward), for the deploy model, interleaved."""
    deployed = deployed_copy(model).eval()
    with torch.inference_mode():
        feats = deployed.backbone(x)
        memory = deployed.encoder(feats)
        with captured_core_calls() as calls:
            deployed.decoder(memory)
        core = deform_attn.deformable_attention_core
        parts = {
            "backbone": lambda: deployed.backbone(x),
            "encoder": lambda: deployed.encoder(feats),
            "decoder": lambda: deployed.decoder(memory),
            "deformable_attention_core": lambda: [core(*args) for args in calls],
            "whole_network": lambda: deployed(x),
        }
        timings = time_interleaved(parts, runs, warmup=2)
    return {"core_calls_per_forward": len(calls), **{k: t.summary() for k, t in timings.items()}}


def bench_preset(preset: str, size: int, runs: int, warmup: int, conv_gflops: float, amp: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = RTDETR.from_preset(preset).eval()
    image, (width, height) = to_model_input(sample_image(), (size, size))
    x, sizes = image[None], torch.tensor([[width, height]])
    calibrate_norms(model, x)
    flops = count_flops(model, x)
    with tempfile.TemporaryDirectory() as tmp:
        backends = build_backends(model, size, Path(tmp), amp)
        diffs = check_outputs(backends, x, sizes, float(max(width, height)))
    with torch.inference_mode():
        timings = time_interleaved({name: (lambda fn=fn: fn(x, sizes)) for name, fn in backends.items()}, runs, warmup)
    hf_median = timings["hf_eager"].median
    return {
        "preset": preset, "image_size": [size, size], "params": count_parameters(model), "gflops": flops / 1e9,
        "roof_ms": flops / (conv_gflops * 1e9) * 1000,
        "latency": {
            name: {**t.summary(), "ratio_to_hf_eager": t.median / hf_median, "max_diff_vs_ours_eager": diffs[name]}
            for name, t in timings.items()
        },
        "profile_deploy": component_profile(model, x, max(3, runs // 2)),
    }  # fmt: skip


def print_result(r: dict[str, Any]) -> None:
    print(f"\n{r['preset']} {r['image_size'][0]}x{r['image_size'][1]} batch 1 fp32: {r['params'] / 1e6:.2f} M params, "
          f"{r['gflops']:.2f} GFLOPs, roof {r['roof_ms']:.0f} ms")  # fmt: skip
    header = f"{'backend':18s} {'median':>8s} {'min':>8s} {'max':>8s} {'/HF':>6s}"
    print(f"  {header}   max diff vs ours_eager (scores, boxes/size)")
    for name, t in r["latency"].items():
        d = t["max_diff_vs_ours_eager"]
        print(f"  {name:18s} {t['median_ms']:8.1f} {t['min_ms']:8.1f} {t['max_ms']:8.1f} {t['ratio_to_hf_eager']:6.2f}"
              f"   {d['scores']:.1e}, {d['boxes_normalised']:.1e} ({d['compared']} compared)")  # fmt: skip
    p = r["profile_deploy"]
    total = p["whole_network"]["median_ms"]
    print(f"  deploy-mode profile (median ms, share of the whole network {total:.1f} ms):")
    for part in ("backbone", "encoder", "decoder", "deformable_attention_core"):
        print(f"    {part:26s} {p[part]['median_ms']:8.1f}  {p[part]['median_ms'] / total:5.1%}")
    calls = p["core_calls_per_forward"]
    print(f"    ({calls} deformable-attention core calls per forward; the core is part of the decoder)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["rtdetr_r18vd", "rtdetr_r50vd"])
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="threads for torch and ONNX Runtime (default: torch's)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--amp", default="off", choices=["off", "bf16"], help="also time deploy mode under autocast")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    load_before = os.getloadavg()
    start = time.time()
    conv_gflops = conv_throughput()
    print(json.dumps(info))
    print(f"3x3 conv throughput: {conv_gflops:.0f} GFLOP/s (best of 10; {FLOPS_NOTE})")
    results = [bench_preset(p, args.size, args.runs, args.warmup, conv_gflops, args.amp) for p in args.presets]
    for r in results:
        print_result(r)
    load_after = os.getloadavg()
    print(f"\nload average (1, 5, 15 min) before {load_before}, after {load_after}; {time.time() - start:.0f} s")
    if args.json:
        summary = {"machine": info, "conv_gflops_per_s": conv_gflops, "flops_note": FLOPS_NOTE,
                   "load_before": load_before, "load_after": load_after, "results": results}  # fmt: skip
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
