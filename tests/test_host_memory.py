"""The host allocator's settings: freed gradient-sized blocks are reused, not re-faulted.

Each case runs in a fresh interpreter, since glibc's settings are per process and the
test process's own must not change under the other tests.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="glibc's malloc only",
)

# Faults per allocation of a 64 MiB buffer (above glibc's largest mmap threshold, like
# the word-embedding gradient of BERT-base), filled and freed, before and after.
PROBE = """
import json, resource, sys
import torch
from mtl_dist.host_memory import keep_freed_memory

def faults_per_alloc(n=6):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.empty(16 * 2**20, dtype=torch.float32).fill_(1.0)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / n

def anon_mib():
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024

faults_per_alloc(2)
before = faults_per_alloc()
start = anon_mib()
changed = keep_freed_memory()
# glibc 2.36 cannot reuse a block freed by an aligned allocation while the tiny
# remainder behind it sits in its per-thread cache (7 per size): the first few blocks
# are left behind, then every allocation reuses one.
faults_per_alloc(10)
after = faults_per_alloc()
grown = anon_mib() - start
print(json.dumps({"before": before, "changed": changed, "after": after, "grown": grown}))
"""


def probe(**env: str) -> dict:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_large_blocks_are_reused_without_page_faults():
    result = probe()
    assert result["changed"]
    # 64 MiB of 4 KiB pages is 16,384 faults when every block is mapped afresh (fewer
    # where the kernel hands out huge pages); kept in the heap, nearly none.
    assert result["before"] > 1000, result
    assert result["after"] < result["before"] / 20, result
    # What is kept stays bounded: a handful of blocks, not one per allocation (18).
    assert result["grown"] < 10 * 64, result


def test_a_user_tuned_allocator_is_left_alone():
    result = probe(MALLOC_TRIM_THRESHOLD_="131072")
    assert not result["changed"]
    assert result["after"] > result["before"] / 2, result
