"""A bounded load test of `rtdetr serve` on loopback: throughput and p50/p95 latency per backend and concurrency,
dynamic batching against one request per model call, and the server's memory before and after.

    rtdetr demo --output runs/demo && rtdetr export --weights runs/demo/train/best.pt --output runs/demo/model.onnx
    rtdetr export --weights runs/demo/train/best.pt --format openvino --output runs/demo/model_ov
    flock /tmp/cpu.lock python3 benchmarks/bench_serve.py --weights runs/demo/train/best.pt runs/demo/model.onnx \
        runs/demo/model_ov/model.xml

Per weights file (PyTorch `.pt`, ONNX Runtime `.onnx`, OpenVINO IR `.xml` or its folder) and per mode
(`--max-batch 8 --max-wait-ms 10`, the defaults, or `--max-batch 1`), one server process (`python3 -m rtdetr.cli
serve ... --log-level warning`) on a free port: 64 warm-up requests at each concurrency, highest first (the largest
batches and the most decoding threads allocate their memory there, and OpenVINO compiles its graph for each batch
size it meets: 0.3 s each for the demo model, which must not land in a measured level), its RSS (/proc/PID/status
VmRSS), then `--requests` requests at each concurrency (`--concurrency`; an asyncio httpx client in this process, so
client and server share the CPU) and its RSS after each level. Each request uploads the bundled sample image
(640x480 JPEG, multipart). Latency: from sending to the full answer, per request; throughput: requests / wall-clock
of the level. Every answer must be a 200.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from rtdetr.export.onnx import sample_image

MODES = {"dynamic batching (max 8, 10 ms)": ["--max-batch", "8", "--max-wait-ms", "10"],
         "one at a time": ["--max-batch", "1"]}  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def load(url: str, image: bytes, requests: int, concurrency: int) -> dict[str, float]:
    """`requests` uploads, at most `concurrency` in flight: requests/s, p50 and p95 latency (ms), mean batch."""
    latencies: list[float] = []
    batches: list[int] = []
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one() -> None:
            async with gate:
                start = time.perf_counter()
                response = await client.post(f"{url}/v1/detect", files={"image": ("sample.jpg", image, "image/jpeg")})
                latencies.append((time.perf_counter() - start) * 1000)
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code}: {response.text}")
                batches.append(response.json()["batch_size"])

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        seconds = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=100)
    return {"rps": requests / seconds, "p50": statistics.median(latencies), "p95": cuts[94],
            "batch": statistics.mean(batches)}  # fmt: skip


def label(weights: str) -> str:
    """The weights' file name, with its folder for an IR (every exported IR is a model.xml)."""
    path = Path(weights)
    return f"{path.parent.name}/{path.name}" if path.suffix.lower() == ".xml" else path.name


def serve(weights: str, mode: list[str], port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "rtdetr.cli", "serve", "--weights", weights, "--port", str(port),
               "--device", "cpu", "--log-level", "warning", *mode]  # fmt: skip
    server = subprocess.Popen(command)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"the server did not start: {' '.join(command)}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", nargs="+", required=True,
                        help="any of: a .pt checkpoint, an exported .onnx, an OpenVINO IR (.xml or its folder)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    image = Path(sample_image()).read_bytes()
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}; {args.requests} "
          f"requests per level, the sample image (640x480 JPEG)")  # fmt: skip
    print("| weights | mode | concurrency | requests/s | p50 ms | p95 ms | mean batch |\n|---|---|---|---|---|---|---|")
    memory = []
    for weights in args.weights:
        for mode_name, mode in MODES.items():
            port = free_port()
            server = serve(weights, mode, port)
            url = f"http://127.0.0.1:{port}"
            try:
                for concurrency in sorted(args.concurrency, reverse=True):
                    asyncio.run(load(url, image, 64, concurrency))
                rss = [rss_mib(server.pid)]
                for concurrency in args.concurrency:
                    r = asyncio.run(load(url, image, args.requests, concurrency))
                    rss.append(rss_mib(server.pid))
                    print(f"| {label(weights)} | {mode_name} | {concurrency} | {r['rps']:.1f} | {r['p50']:.0f} | "
                          f"{r['p95']:.0f} | {r['batch']:.2f} |", flush=True)  # fmt: skip
                memory.append((label(weights), mode_name, rss))
            finally:
                server.terminate()
                server.wait(30)
    levels = " | ".join(f"after c={c}" for c in args.concurrency)
    print(f"\n| weights | mode | server RSS (MiB) after warm-up | {levels} | change |")
    print("|---|---|---|" + "---|" * (len(args.concurrency) + 1))
    for name, mode_name, rss in memory:
        print(f"| {name} | {mode_name} | " + " | ".join(f"{v:.0f}" for v in rss) + f" | {rss[-1] - rss[0]:+.1f} |")


if __name__ == "__main__":
    main()
