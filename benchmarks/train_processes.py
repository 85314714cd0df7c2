"""Training steps: one process with every thread against one single-thread process per core (`--processes`),
side by side on the same data, interleaved.

    python3 benchmarks/train_processes.py --data /tmp/digits --img-size 320 --rounds 3

Per round and setting, the wall time of `rtdetr train --preset rtdetr_tiny ... --set max_steps=K` for K = 20 and
K = 100 (same start-up: imports, data, model; no evaluation before step 125); (t100 - t20) / 80 is the time of one
optimizer step of 16 images. Prints each round, the medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHORT, LONG = 20, 100


def run_seconds(data: str, image_size: int, processes: int, steps: int, output: Path) -> float:
    command = ["rtdetr", "train", "--preset", "rtdetr_tiny", "--data", data, "--img-size", str(image_size),
               "--epochs", "50", "--device", "cpu", "--processes", str(processes), "--output", str(output),
               "--set", f"max_steps={steps}"]  # fmt: skip
    tic = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - tic


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a dataset folder of 1600+ training images")
    parser.add_argument("--img-size", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, nargs=2, default=(1, 2), help="the two settings (default 1 2)")
    args = parser.parse_args()
    per_step: dict[int, list[float]] = {n: [] for n in args.processes}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for n in args.processes:
                short = run_seconds(args.data, args.img_size, n, SHORT, Path(scratch) / f"p{n}s")
                long = run_seconds(args.data, args.img_size, n, LONG, Path(scratch) / f"p{n}l")
                per_step[n].append((long - short) / (LONG - SHORT))
                print(f"round {round_ + 1}: --processes {n}: {per_step[n][-1]:.3f} s per step", flush=True)
    one, other = (statistics.median(per_step[n]) for n in args.processes)
    print(f"median s per step at {args.img_size} px: --processes {args.processes[0]} {one:.3f}, "
          f"--processes {args.processes[1]} {other:.3f}; ratio {one / other:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
