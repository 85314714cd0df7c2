"""Eval-forward latency of our presets against Hugging Face transformers' RT-DETR on the same weights.

    python3 benchmarks/bench_vs_hf.py --presets rtdetr_r18vd rtdetr_r50vd --runs 15

Runs are interleaved (ours, ours-deploy, HF, ours, ...) so that machine noise hits all alike; medians are
reported with the ratio to HF. Outputs are checked equal (matched max abs diff) before timing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import RTDetrConfig, RTDetrForObjectDetection

from rtdetr import RTDETR
from rtdetr.convert.huggingface import hf_config_from_model_config, official_to_hf


def hf_twin(model: RTDETR) -> RTDetrForObjectDetection:
    """The HF model with our model's weights."""
    hf = RTDetrForObjectDetection(RTDetrConfig(**hf_config_from_model_config(model.config, None)))
    hf.load_state_dict(official_to_hf(model.state_dict()), strict=True)
    return hf.eval()


def timed(fn, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def bench(preset: str, size: int, runs: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    ours = RTDETR.from_preset(preset).eval()
    hf = hf_twin(ours)
    deployed = RTDETR.from_preset(preset).eval()
    deployed.load_state_dict(ours.state_dict())
    deployed.deploy()
    x = torch.rand(1, 3, size, size)
    candidates = {
        "ours": lambda t: ours(t),
        "ours_deploy": lambda t: deployed(t),
        "hf": lambda t: hf(pixel_values=t),
    }
    with torch.inference_mode():
        ref = ours(x)["pred_boxes"]
        diff = (deployed(x)["pred_boxes"] - ref).abs().max().item()
        hf_diff = (hf(pixel_values=x).pred_boxes - ref).abs().max().item()
        for _ in range(warmup):
            for fn in candidates.values():
                fn(x)
        times: dict[str, list[float]] = {k: [] for k in candidates}
        for _ in range(runs):
            for name, fn in candidates.items():
                times[name].append(timed(fn, x))
    medians = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"\n{preset} {size}x{size} batch 1 ({runs} interleaved runs; box diff deploy {diff:.1e}, HF {hf_diff:.1e})")
    for name, ms in medians.items():
        spread = f"min {min(times[name]) * 1000:.0f} max {max(times[name]) * 1000:.0f}"
        print(f"  {name:12s} median {ms:7.1f} ms ({spread})  ratio to HF {ms / medians['hf']:.2f}")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["rtdetr_r18vd", "rtdetr_r50vd"])
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    for preset in args.presets:
        bench(preset, args.size, args.runs, args.warmup)


if __name__ == "__main__":
    main()
