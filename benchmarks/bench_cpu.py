"""CPU latency of RT-DETR: ours (eager, deploy, ONNX Runtime) against Hugging Face transformers (eager, ONNX
Runtime), same weights, batch 1, fp32, plus the machine's conv roof and a per-component profile.

    python3 benchmarks/bench_cpu.py --presets rtdetr_r18vd rtdetr_r50vd --runs 10 --json bench_cpu.json
    python3 benchmarks/bench_cpu.py --amp bf16 ...   # adds deploy mode under bf16 autocast (AMX / AVX512-BF16)
    python3 benchmarks/bench_cpu.py --presets rtdetrv2_r18vd rtdetrv2_hgnetv2_l --cross-attn default discrete \
        --runs 8 --threads 1                         # v2: bilinear and discrete sampling, rows `*_dsp`

v1 presets are compared with `RTDetrForObjectDetection`, v2 presets (and any discrete one) with
`RTDetrV2ForObjectDetection` (`decoder_method` "default" / "discrete"). HGNetv2 backbones go to HF as an
`HGNetV2Config` backbone (transformers' D-FINE backbone, the same network; tensor names mapped here). With
`--cross-attn default discrete` each preset is built once, and the discrete model gets the very same weights;
all backends of both methods are interleaved in one timing loop. Discrete (nearest-cell) sampling is
discontinuous, so a backend may move a few detections by a lot: the matched max diff is reported as it is,
with the share of detections that have a twin within 1e-3 (`twin_share`, the export check's criterion).
The all-zero initial weights of the sampling offsets, attention weights and box-head outputs get small random
values first (`generic_heads`; --zero-init-heads keeps them): with them zero, a third of the discrete sampling
locations lie exactly on cell borders and the backends' float noise decides them.

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
from transformers import (
    HGNetV2Config,
    PreTrainedModel,
    RTDetrConfig,
    RTDetrForObjectDetection,
    RTDetrV2Config,
    RTDetrV2ForObjectDetection,
)

import rtdetr.models.deform_attn as deform_attn
from rtdetr import RTDETR
from rtdetr.config import ModelConfig
from rtdetr.data.images import to_model_input
from rtdetr.export.onnx import (
    DISCRETE_TOLERANCE,
    EndToEndDetector,
    deployed_copy,
    export_onnx,
    matched_max_diff,
    onnx_session,
    sample_image,
    twin_share,
)
from rtdetr.inference.benchmark import FLOPS_NOTE, count_flops, count_parameters, run_autocast, time_interleaved
from rtdetr.models.hgnetv2 import HGNETV2_ARCHS
from rtdetr.models.layers import FrozenBatchNorm2d
from rtdetr.postprocess import topk_detections
from rtdetr.weights.hf_names import official_to_hf, points_scale_tensors
from rtdetr.weights.huggingface import hf_config_from_model_config

Detections3 = tuple[Tensor, Tensor, Tensor]


class HFDetector(nn.Module):
    """HF's model + our top-K post-processor: forward(images, orig_target_sizes) -> labels, boxes, scores."""

    def __init__(self, hf: PreTrainedModel) -> None:
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


# Our (official) HGNetv2 names -> transformers' HGNetV2Backbone names inside RTDetr(V2)ForObjectDetection, in order.
_HGNET_TO_HF = [
    ("backbone.stem.", "model.backbone.model.embedder."),
    ("backbone.stages.", "model.backbone.model.encoder.stages."),
    (".conv.1.weight", ".convolution.weight"),  # the stem's 2x2 convs: Sequential(ZeroPad2d, Conv2d)
    (".conv.weight", ".convolution.weight"),
    (".bn.", ".normalization."),
    (".aggregation_squeeze_conv.", ".aggregation.0."),
    (".aggregation_excitation_conv.", ".aggregation.1."),
]


@torch.no_grad()
def generic_heads(model: nn.Module, std: float = 0.02) -> list[str]:
    """Give every all-zero Linear weight (the official init of the sampling offsets, attention weights and the
    last layer of each box head) small random values; returns the names of the layers changed.

    With those weights zero, every reference box is its anchor (a cell centre) and every sampling offset is its
    ring bias, so in real arithmetic about 30% of the sampling locations (r18vd, 640 px) fall exactly on a cell
    border: discrete sampling then rounds them by float noise, and backends computing the same function
    disagree on a third of the detections. A trained model has no such ties; nor has the model after this.
    """
    generator = torch.Generator().manual_seed(0)
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not module.weight.any():
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
            changed.append(name)
    return changed


def hf_hgnetv2_backbone(config: ModelConfig) -> dict[str, Any]:
    """transformers' `HGNetV2Config` (as a dict) of our HGNetv2 arch, returning stages 2..4 (strides 8/16/32)."""
    arch = HGNETV2_ARCHS[config.backbone.removeprefix("hgnetv2_").upper()]
    stages = arch.stages
    return HGNetV2Config(
        stem_channels=list(arch.stem_channels), embedding_size=arch.stem_channels[2],
        stage_in_channels=[s.in_channels for s in stages], stage_mid_channels=[s.mid_channels for s in stages],
        stage_out_channels=[s.out_channels for s in stages], stage_num_blocks=[s.num_blocks for s in stages],
        stage_downsample=[s.downsample for s in stages], stage_light_block=[s.light_block for s in stages],
        stage_kernel_size=[s.kernel_size for s in stages], stage_numb_of_layers=[s.layer_num for s in stages],
        hidden_sizes=[s.out_channels for s in stages], depths=[s.num_blocks for s in stages],
        use_learnable_affine_block=config.use_lab, out_features=["stage2", "stage3", "stage4"],
    ).to_dict()  # fmt: skip


def hf_state_dict(model: RTDETR, v2: bool) -> dict[str, Tensor]:
    """Our state dict in HF names: `official_to_hf`, HGNetv2 backbone tensors renamed by `_HGNET_TO_HF`."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out = {}
    if model.config.backbone.startswith("hgnetv2"):
        for key in [k for k in state if k.startswith("backbone.")]:
            name = key
            for old, new in _HGNET_TO_HF:
                name = name.replace(old, new)
            out[name] = state.pop(key)
    out.update(official_to_hf(state))
    if v2:
        out.update(points_scale_tensors(model.config.num_points[0], model.config.num_decoder_layers))
    return out


def hf_twin(model: RTDETR) -> PreTrainedModel:
    """HF's model with our weights: RTDetr (v1 configs) or RTDetrV2 (v2 / discrete), loaded strictly."""
    config = model.config
    hgnet = config.backbone.startswith("hgnetv2")
    # hf_config_from_model_config writes ResNet backbones only: for HGNetv2 take everything else from it.
    fields = hf_config_from_model_config(config.replace(backbone="resnet_vd") if hgnet else config, None)
    if hgnet:
        fields["backbone_config"] = hf_hgnetv2_backbone(config)
        fields["encoder_in_channels"] = list(config.backbone_out_channels)
    v2 = fields["model_type"] == "rt_detr_v2"
    config_cls, model_cls = (RTDetrV2Config, RTDetrV2ForObjectDetection) if v2 else (RTDetrConfig, RTDetrForObjectDetection)
    fields = {k: v for k, v in fields.items() if k not in ("model_type", "architectures")}
    hf = model_cls(config_cls(**fields))
    state = hf_state_dict(model, v2)
    # RTDetrV2ForObjectDetection also keeps top-level copies of the decoder heads (tied on from_pretrained,
    # unused in forward): give them the decoder's tensors so that the strict load below checks everything else.
    for key in hf.state_dict():
        if key.startswith(("class_embed.", "bbox_embed.")) and key not in state:
            state[key] = state[f"model.decoder.{key}"]
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def export_hf_onnx(detector: HFDetector, path: Path, size: int) -> Path:
    example = (torch.rand(1, 3, size, size), torch.tensor([[size, size]]))
    with torch.no_grad():
        torch.onnx.export(
            detector, example, str(path), input_names=["images", "orig_target_sizes"],
            output_names=["labels", "boxes", "scores"], opset_version=17, dynamo=False,
        )  # fmt: skip
    return path


SUFFIX = {"default": "", "discrete": "_dsp"}  # backend name suffix per cross-attention method


def run_session(session: Any) -> Callable[[Tensor, Tensor], Detections3]:
    def run(x: Tensor, s: Tensor) -> Detections3:
        outputs = session.run(None, {"images": x.numpy(), "orig_target_sizes": s.numpy()})
        return tuple(torch.from_numpy(a) for a in outputs)

    return run


def build_backends(
    model: RTDETR, size: int, folder: Path, amp: str = "off", suffix: str = ""
) -> tuple[dict[str, Callable[[Tensor, Tensor], Detections3]], str | None]:
    """The five backends (six with `amp`: deploy mode under autocast), each a function
    (images, orig_sizes) -> (labels, boxes, scores), named with `suffix`; and why HF is missing (None: it is not)."""
    ours_onnx = onnx_session(export_onnx(model, folder / f"ours{suffix}.onnx", (size, size), check=False))
    deployed = EndToEndDetector(deployed_copy(model)).eval()
    backends = {
        f"ours_eager{suffix}": EndToEndDetector(model).eval(),
        f"ours_deploy{suffix}": deployed,
        f"ours_onnxruntime{suffix}": run_session(ours_onnx),
    }
    no_hf = None
    try:
        # eval() on the wrapper itself: torch.onnx.export restores the wrapper's mode recursively afterwards, and a
        # wrapper left in train mode would switch the HF model inside it to train mode (BatchNorm updating stats).
        hf = HFDetector(hf_twin(model)).eval()
    except (ValueError, RuntimeError, TypeError) as error:
        no_hf = f"{type(error).__name__}: {error}"
    else:
        backends[f"hf_eager{suffix}"] = hf
        backends[f"hf_onnxruntime{suffix}"] = run_session(
            onnx_session(export_hf_onnx(hf, folder / f"hf{suffix}.onnx", size))
        )
    if amp != "off":
        backends[f"ours_deploy_{amp}{suffix}"] = lambda x, s: tuple(
            t.float() for t in run_autocast(deployed, x, s, amp)
        )
    return backends, no_hf


def check_outputs(
    backends: dict[str, Callable], x: Tensor, sizes: Tensor, scale: float, reference_name: str
) -> dict[str, dict[str, float]]:
    """Matched max |diff| of every backend against `reference_name`, and the share of its detections with a
    twin (same label, score and box / size within DISCRETE_TOLERANCE: `twin_share`, the export check's criterion
    for discrete models) in the reference's."""
    with torch.inference_mode():
        outputs = {name: [t[0] for t in fn(x, sizes)] for name, fn in backends.items()}
    reference = outputs[reference_name]
    diffs = {}
    for name, out in outputs.items():
        compared, score, box = matched_max_diff(reference, out, box_scale=scale)
        diffs[name] = {"reference": reference_name, "compared": compared, "scores": score, "boxes_normalised": box}
        diffs[name]["twin_share_1e-3"] = twin_share(reference, out, scale, DISCRETE_TOLERANCE)
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


def bench_preset(
    preset: str, size: int, runs: int, warmup: int, conv_gflops: float, amp: str, methods: list[str],
    generic: bool = True,
) -> dict[str, Any]:
    """All backends of `preset` for each cross-attention method in `methods`, same weights, interleaved."""
    torch.manual_seed(0)
    image, (width, height) = to_model_input(sample_image(), (size, size))
    x, sizes = image[None], torch.tensor([[width, height]])
    base = RTDETR.from_preset(preset).eval()
    if generic:
        generic_heads(base)
    calibrate_norms(base, x)
    flops = count_flops(base, x)
    models = {}
    for method in methods:
        model = RTDETR.from_preset(preset, cross_attn_method=method).eval()
        model.load_state_dict(base.state_dict(), strict=True)  # the same weights for every method
        models[method] = model
    backends: dict[str, Callable] = {}
    diffs: dict[str, dict] = {}
    no_hf: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, model in models.items():
            suffix = SUFFIX[method]
            found, reason = build_backends(model, size, Path(tmp), amp, suffix)
            if reason:
                no_hf[method] = reason
                print(f"{preset} {method}: no Hugging Face backend ({reason})")
            diffs.update(check_outputs(found, x, sizes, float(max(width, height)), f"ours_eager{suffix}"))
            backends.update(found)
    with torch.inference_mode():
        timings = time_interleaved({name: (lambda fn=fn: fn(x, sizes)) for name, fn in backends.items()}, runs, warmup)
    latency = {}
    for name, t in timings.items():
        suffix = SUFFIX["discrete"] if name.endswith(SUFFIX["discrete"]) else ""
        base_name = f"hf_eager{suffix}" if f"hf_eager{suffix}" in timings else f"ours_eager{suffix}"
        latency[name] = {**t.summary(), "ratio_to": base_name, "ratio": t.median / timings[base_name].median,
                         "max_diff": diffs[name]}  # fmt: skip
    return {
        "preset": preset, "image_size": [size, size], "params": count_parameters(base), "gflops": flops / 1e9,
        "roof_ms": flops / (conv_gflops * 1e9) * 1000, "generic_heads": generic, "no_hf": no_hf, "latency": latency,
        "profile_deploy": {m: component_profile(model, x, max(3, runs // 2)) for m, model in models.items()},
    }  # fmt: skip


def print_result(r: dict[str, Any]) -> None:
    print(f"\n{r['preset']} {r['image_size'][0]}x{r['image_size'][1]} batch 1 fp32: {r['params'] / 1e6:.2f} M params, "
          f"{r['gflops']:.2f} GFLOPs, roof {r['roof_ms']:.0f} ms")  # fmt: skip
    for method, reason in r["no_hf"].items():
        print(f"  {method}: no Hugging Face backend: {reason}")
    header = f"{'backend':22s} {'median':>8s} {'min':>8s} {'max':>8s} {'ratio':>6s} {'to':16s}"
    print(f"  {header} max diff vs ours_eager of the same method (scores, boxes/size)")
    for name, t in r["latency"].items():
        d = t["max_diff"]
        twin = f", twin share {d['twin_share_1e-3']:.1%}"
        print(f"  {name:22s} {t['median_ms']:8.1f} {t['min_ms']:8.1f} {t['max_ms']:8.1f} {t['ratio']:6.2f} "
              f"{t['ratio_to']:16s} {d['scores']:.1e}, {d['boxes_normalised']:.1e} ({d['compared']} compared{twin})")  # fmt: skip
    for method, p in r["profile_deploy"].items():
        total = p["whole_network"]["median_ms"]
        print(f"  deploy-mode profile, {method} sampling (median ms, share of the whole network {total:.1f} ms):")
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
    parser.add_argument("--cross-attn", nargs="+", default=["default"], choices=list(SUFFIX),
                        help="cross-attention sampling methods to benchmark (discrete rows end in _dsp)")
    parser.add_argument("--zero-init-heads", action="store_true",
                        help="keep the official all-zero init of offset / attention / box-head weights (see generic_heads)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    load_before = os.getloadavg()
    start = time.time()
    conv_gflops = conv_throughput()
    print(json.dumps(info), flush=True)
    print(f"3x3 conv throughput: {conv_gflops:.0f} GFLOP/s (best of 10; {FLOPS_NOTE})")
    methods = list(dict.fromkeys(args.cross_attn))
    results = []
    for preset in args.presets:
        results.append(bench_preset(preset, args.size, args.runs, args.warmup, conv_gflops, args.amp, methods,
                                    generic=not args.zero_init_heads))  # fmt: skip
        print_result(results[-1])
    load_after = os.getloadavg()
    print(f"\nload average (1, 5, 15 min) before {load_before}, after {load_after}; {time.time() - start:.0f} s")
    if args.json:
        summary = {"machine": info, "conv_gflops_per_s": conv_gflops, "flops_note": FLOPS_NOTE,
                   "load_before": load_before, "load_after": load_after, "results": results}  # fmt: skip
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
