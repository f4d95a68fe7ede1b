"""moerm.cpu_memory: with the setting, repeated forward passes reuse freed memory instead of faulting in new pages."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

import moerm.cpu_memory as cpu_memory

# A small transformer layer over batches of varying shape, as length-sorted batches vary: the minor page faults of
# 30 passes after 6 warm-up passes (every shape seen once), in a fresh process (the setting is process-wide and
# cannot be undone). The reference holds glibc's initial thresholds fixed: by default glibc raises them as large
# blocks are freed, so how often it faults depends on the process's history (1,000-11,000 faults here, run to run).
LOOP = """
import resource, sys, torch
if sys.argv[1] == "initial":  # glibc's initial thresholds, held fixed (no dynamic raise)
    import ctypes
    from moerm.cpu_memory import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024) and libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
if sys.argv[1] == "keep":
    from moerm.cpu_memory import keep_cpu_memory
    assert keep_cpu_memory()
torch.manual_seed(0); torch.set_num_threads(1)
layer = torch.nn.TransformerEncoderLayer(64, 4, 256, batch_first=True).eval()
def run(n):
    with torch.no_grad():
        for i in range(n):
            layer(torch.randn(8 + i % 3 * 8, 96 + 16 * (i % 2), 64))
run(6)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
run(30)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, timeout=120,
                         env={**os.environ, cpu_memory.ENV: "1"})
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="the setting applies to glibc on Linux only")
def test_kept_memory_reuses_what_each_pass_freed_where_malloc_returns_it():
    initial, kept = _faults("initial"), _faults("keep")
    # Measured: 70,622 faults with the initial thresholds (every pass faults its activations in), 2-578 kept.
    assert initial > 30000
    assert kept * 20 < initial


def test_opt_out_changes_nothing(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_applied", None)
    monkeypatch.setenv(cpu_memory.ENV, "0")
    assert cpu_memory.keep_cpu_memory() is False  # monkeypatch restores the process's own state afterwards
