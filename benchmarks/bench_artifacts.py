"""Every artifact rtdetr exports, side by side: latency (interleaved, against Hugging Face eager on the same
weights) and the COCO AP each one keeps on a trained model.

    nice -n 19 python3 benchmarks/bench_artifacts.py prepare --presets rtdetr_r18vd rtdetr_r50vd --folder /tmp/art
    flock /tmp/cpu.lock python3 benchmarks/bench_artifacts.py latency --presets rtdetr_r18vd rtdetr_r50vd \
        --folder /tmp/art --threads 2 --runs 15 --json latency.json
    nice -n 19 python3 benchmarks/bench_artifacts.py accuracy --weights runs/demo/train/best.pt \
        --data runs/demo/data --json accuracy.json

Backends: PyTorch eager and deploy mode (fp32, and deploy under bf16 autocast), ONNX Runtime fp32 and int8 (QDQ
from NNCF), OpenVINO fp32 / bf16 / fp16 and int8 in every split of `export.quantize.SPLITS`, and (latency)
Hugging Face `RTDetrForObjectDetection` eager with our weights (built as in bench_cpu.py). Each runs network +
top-K post-processor on the same input. Latency uses random weights (BatchNorm statistics calibrated as in
bench_cpu.py; int8 calibrated on 32 random images: int8 kernels' speed does not depend on the ranges); AP uses
the trained checkpoint, the int8 artifacts calibrated on its dataset's train split (300 images).
For each OpenVINO / PyTorch-bf16 row the kernels that ran are printed (OpenVINO's runtime graph; oneDNN's
verbose log for PyTorch). Needs `pip install -e ".[test,int8]"` (transformers for the HF rows, NNCF).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from bench_cpu import HFDetector, calibrate_norms, generic_heads, hf_twin, machine  # benchmarks/ is on sys.path

from rtdetr import RTDETR, load_detector
from rtdetr.config import autocast
from rtdetr.data.images import to_model_input
from rtdetr.engine.evaluation import evaluate
from rtdetr.export.onnx import EndToEndDetector, deployed_copy, export_onnx, matched_max_diff, sample_image
from rtdetr.export.openvino import export_openvino, kernel_summary, runtime_precision
from rtdetr.export.quantize import SPLITS, export_int8
from rtdetr.inference.benchmark import count_flops, count_parameters, onednn_kernels, time_interleaved

OPENVINO_PRECISIONS = ("fp32", "bf16", "fp16")


def export_all(model: RTDETR, folder: Path, size: tuple[int, int], calibration: Any) -> dict[str, Path]:
    """Every artifact of `model`: name -> ONNX file or IR folder."""
    paths = {"onnxruntime_fp32": export_onnx(model, folder / "fp32.onnx", size, check=False)}
    # The ONNX int8 graph first: quantised after the OpenVINO ones in the same process, its evaluation crashed
    # (SIGSEGV) once here; alone, or first, it never did.
    paths["onnxruntime_int8_decoder-float"] = export_int8(model, folder / "int8.onnx", calibration, "onnx",
                                                          "decoder-float", size)  # fmt: skip
    for precision in OPENVINO_PRECISIONS:
        export_openvino(model, folder / f"ov_{precision}", size, precision, check=False)
        paths[f"openvino_{precision}"] = folder / f"ov_{precision}"
    for split in SPLITS:
        export_int8(model, folder / f"ov_int8_{split}", calibration, "openvino", split, size)
        paths[f"openvino_int8_{split}"] = folder / f"ov_int8_{split}"
    return paths


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """COCO AP of the checkpoint (PyTorch fp32 / bf16) and of every artifact, on the dataset's val split."""
    model = RTDETR.from_checkpoint(args.weights)
    size = tuple(model.config.image_size)
    common = dict(device="cpu", verbose=False, class_names=model.class_names, category_ids=model.category_ids)
    results = {"pytorch_fp32": evaluate(model, args.data, "val", **common)["AP"]}
    deployed = RTDETR(model.config, model.class_names, model.category_ids)
    deployed.load_state_dict(model.state_dict())
    deployed.eval().deploy()
    results["pytorch_deploy_bf16"] = evaluate(deployed, args.data, "val", amp="bf16", **common)["AP"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in export_all(model, Path(tmp), size, args.data).items():
            results[name] = evaluate(load_detector(path), args.data, "val", verbose=False)["AP"]
            print(f"{name:34s} AP {results[name]:.4f}", flush=True)
    reference = results["pytorch_fp32"]
    print(f"\n{args.weights} on {args.data} val ({size[0]}x{size[1]}): AP and change in AP points vs PyTorch fp32")
    for name, ap in results.items():
        print(f"  {name:34s} {ap:.4f}  {(ap - reference) * 100:+6.2f}")
    return {"weights": str(args.weights), "data": str(args.data), "image_size": list(size), "AP": results}


def random_model(preset: str, size: int) -> tuple[RTDETR, torch.Tensor, torch.Tensor]:
    """`preset` with random weights that behave like trained ones (as bench_cpu.py), and the sample image."""
    torch.manual_seed(0)
    image, (width, height) = to_model_input(sample_image(), (size, size))
    x, sizes = image[None], torch.tensor([[width, height]])
    model = RTDETR.from_preset(preset).eval()
    generic_heads(model)
    calibrate_norms(model, x)
    return model, x, sizes


def prepare(args: argparse.Namespace) -> None:
    """Write every preset's weights and artifacts under --folder (slow, not timed: run it niced)."""
    for preset in args.presets:
        model, _, _ = random_model(preset, args.size)
        folder = Path(args.folder) / preset
        folder.mkdir(parents=True, exist_ok=True)
        model.save(folder / "weights.pt")
        calibration = [torch.rand(3, args.size, args.size, generator=torch.Generator().manual_seed(i))
                       for i in range(32)]  # fmt: skip
        export_all(model, folder, (args.size, args.size), calibration)
        print(f"prepared {folder}", flush=True)


def latency_backends(model: RTDETR, folder: Path) -> tuple[dict[str, Callable], dict[str, str]]:
    """name -> fn(images, sizes) -> (labels, boxes, scores) for every backend (the artifacts `prepare` wrote
    under `folder`); and the kernels each OpenVINO row ran."""
    deployed = EndToEndDetector(deployed_copy(model)).eval()
    backends: dict[str, Callable] = {
        "hf_eager": HFDetector(hf_twin(model)).eval(),
        "pytorch_eager": EndToEndDetector(model).eval(),
        "pytorch_deploy": deployed,
        "pytorch_deploy_bf16": lambda x, s: tuple(t.float() for t in _autocast(deployed, x, s)),
    }
    kernels = {}
    for name, path in artifact_paths(folder).items():
        detector = load_detector(path)
        if name.startswith("onnxruntime"):
            backends[name] = detector.run
            continue
        compiled = detector.compiled_for(1)
        kernels[name] = f"runs {runtime_precision(compiled)}: {kernel_summary(compiled)}"
        backends[name] = detector.run
    return backends, kernels


def artifact_paths(folder: Path) -> dict[str, Path]:
    """The names `export_all` gives the artifacts in `folder`."""
    paths = {"onnxruntime_fp32": folder / "fp32.onnx"}
    paths.update({f"openvino_{p}": folder / f"ov_{p}" for p in OPENVINO_PRECISIONS})
    paths.update({f"openvino_int8_{split}": folder / f"ov_int8_{split}" for split in SPLITS})
    paths["onnxruntime_int8_decoder-float"] = folder / "int8.onnx"
    return paths


def _autocast(detector: torch.nn.Module, x: torch.Tensor, s: torch.Tensor) -> Any:
    with autocast("cpu", "bf16"):
        return detector(x, s)


def latency(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every backend of each prepared preset, interleaved (run it under the CPU lock)."""
    results = []
    for preset in args.presets:
        folder = Path(args.folder) / preset
        _, x, sizes = random_model(preset, args.size)
        model = RTDETR.from_checkpoint(folder / "weights.pt")
        with torch.inference_mode():
            backends, kernels = latency_backends(model, folder)
            kernels["pytorch_deploy"] = onednn_kernels(lambda: backends["pytorch_deploy"](x, sizes))
            kernels["pytorch_deploy_bf16"] = onednn_kernels(lambda: backends["pytorch_deploy_bf16"](x, sizes))
            reference = [t[0] for t in backends["pytorch_eager"](x, sizes)]
            scale = float(sizes.max())
            diffs = {name: matched_max_diff(reference, [t[0] for t in fn(x, sizes)], scale)
                     for name, fn in backends.items()}  # fmt: skip
            timings = time_interleaved({n: (lambda fn=fn: fn(x, sizes)) for n, fn in backends.items()}, args.runs,
                                       args.warmup)  # fmt: skip
        hf = timings["hf_eager"].median
        rows = {name: {**t.summary(), "ratio_to_hf_eager": t.median / hf, "max_diff_vs_eager": diffs[name][1:]}
                for name, t in timings.items()}  # fmt: skip
        result = {"preset": preset, "image_size": [args.size, args.size], "params": count_parameters(model),
                  "gflops": count_flops(model, x) / 1e9, "latency": rows, "kernels": kernels}  # fmt: skip
        print_latency(result)
        results.append(result)
    return results


def print_latency(r: dict[str, Any]) -> None:
    print(f"\n{r['preset']} {r['image_size'][0]}x{r['image_size'][1]} batch 1: {r['params'] / 1e6:.2f} M params, "
          f"{r['gflops']:.2f} GFLOPs")  # fmt: skip
    print(f"  {'backend':34s} {'median':>8s} {'min':>8s} {'max':>8s} {'x HF':>6s}  max diff vs eager (scores, boxes)")
    for name, t in r["latency"].items():
        score, box = t["max_diff_vs_eager"]
        print(f"  {name:34s} {t['median_ms']:8.1f} {t['min_ms']:8.1f} {t['max_ms']:8.1f} "
              f"{t['ratio_to_hf_eager']:6.2f}  {score:.1e}, {box:.1e}")  # fmt: skip
    print("  kernels:")
    for name, text in r["kernels"].items():
        print(f"    {name}: {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    prep = sub.add_parser("prepare", help="write the random-weight models and their artifacts (slow, not timed)")
    lat = sub.add_parser("latency", help="time what `prepare` wrote, interleaved")
    for p in (prep, lat):
        p.add_argument("--presets", nargs="+", default=["rtdetr_r18vd", "rtdetr_r50vd"])
        p.add_argument("--size", type=int, default=640)
        p.add_argument("--folder", required=True, help="where `prepare` writes and `latency` reads the artifacts")
    lat.add_argument("--runs", type=int, default=10)
    lat.add_argument("--warmup", type=int, default=2)
    acc = sub.add_parser("accuracy", help="AP of a trained checkpoint's artifacts")
    acc.add_argument("--weights", required=True)
    acc.add_argument("--data", required=True)
    for p in (prep, lat, acc):
        p.add_argument("--threads", type=int, help="threads for every runtime (default: torch's)")
        p.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(machine()))
    if args.what == "prepare":
        prepare(args)
        return
    result = latency(args) if args.what == "latency" else accuracy(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "result": result}, indent=1, default=float))


if __name__ == "__main__":
    main()
