"""`rtdetr bench` and its pieces: FLOP convention, interleaved timing, the JSON it writes."""

from __future__ import annotations

import json

import torch
from torch import nn

from rtdetr import RTDETR
from rtdetr.cli import main
from rtdetr.config import native_bf16
from rtdetr.inference.benchmark import count_flops, count_parameters, time_interleaved


def test_flops_are_twice_the_multiply_adds_of_a_hand_counted_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    macs = 16 * 16 * 8 * (3 * 3 * 3)  # output pixels x output channels x kernel volume
    assert count_flops(conv, torch.rand(1, 3, 16, 16)) == 2 * macs
    assert conv.training, "count_flops restores the mode"


def test_time_interleaved_alternates_and_pauses():
    order: list[str] = []
    timings = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, runs=3, warmup=1,
                               pause_s=0.0)  # fmt: skip
    assert order == ["a", "b"] * 4  # 1 warm-up round + 3 timed rounds, A B A B
    assert [len(t.runs_ms) for t in timings.values()] == [3, 3]
    assert all(min(t.runs_ms) <= t.median <= max(t.runs_ms) for t in timings.values())


def test_bench_command_writes_every_backend(tmp_path):
    output = tmp_path / "bench.json"
    argv = ["bench", "--preset", "rtdetr_tiny", "--img-size", "96", "--runs", "2", "--warmup", "1",
            "--amp", "bf16", "--output", str(output)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(output.read_text())
    assert result["params"] == count_parameters(RTDETR.from_preset("rtdetr_tiny"))
    assert result["image_size"] == [96, 96] and result["batch_size"] == 1
    assert set(result["latency"]) == {"pytorch_eager", "pytorch_deploy", "onnxruntime", "pytorch_deploy_bf16",
                                      "openvino_fp32", "openvino_bf16"}  # fmt: skip
    for timing in result["latency"].values():
        assert timing["runs"] == 2 and 0 < timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]
    # deploy mode and the ONNX graph compute the same detections; bf16 is reported, not bounded
    for backend in ("pytorch_deploy", "onnxruntime", "openvino_fp32"):
        diff = result["max_diff_vs_eager"][backend]
        assert diff["scores"] <= 1e-4 and diff["boxes_normalised"] <= 1e-4, (backend, diff)
    assert "pytorch_deploy_bf16" in result["max_diff_vs_eager"] and "openvino_bf16" in result["max_diff_vs_eager"]
    # which kernels ran: OpenVINO's fp32 row in f32 (never its bf16 default), its bf16 row in bf16 where the CPU has
    # bf16 instructions and in f32 where it has none (OpenVINO falls back, and the row says so)
    assert result["kernels"]["openvino_fp32"].startswith("runs f32") and " bf16 " not in result["kernels"]["openvino_fp32"]
    assert result["kernels"]["openvino_bf16"].startswith("runs bf16" if native_bf16("cpu") else "runs f32")
