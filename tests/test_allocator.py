"""keep_freed_memory: freed blocks stay in the process, so re-allocating them costs no page faults (the invariant
the faster CPU training steps come from), checked in a fresh process so this one's allocator is untouched."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Allocate, write and free a 64 MiB tensor (over glibc's default mmap limit of 32 MiB: mmapped and unmapped every
# time) and count the minor page faults per round, before and after keep_freed_memory().
SCRIPT = """
import json, resource, torch
from rtdetr.engine.allocator import keep_freed_memory

def faults_per_round(rounds=10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        torch.ones(16 << 20)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds

faults_per_round(2)
default = faults_per_round()
threshold = keep_freed_memory()
faults_per_round(2)
print(json.dumps({"threshold": threshold, "default": default, "kept": faults_per_round()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    result = json.loads(subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                                       check=True).stdout)  # fmt: skip
    if result["threshold"] < 64 << 20:
        pytest.skip(f"this C library caps the mmap threshold at {result['threshold']} bytes")
    # 64 MiB = 16384 pages of 4 KiB: faulted in on every round by default, once at most with the setting.
    assert result["default"] > 8000
    assert result["kept"] < result["default"] / 20
