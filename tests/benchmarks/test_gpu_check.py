"""benchmarks/gpu_check.sh at tiny shapes on the CPU (so the GPU check cannot rot): it runs DDP and FSDP on 2 gloo
processes, reports pairs/s, peak memory and their ratios, and both modes trained the same model (same final loss)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_cpu_at_tiny_shapes(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", str(out)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["gpus"] == 0 and list(report["shapes"]) == ["tiny"]
    row = report["shapes"]["tiny"]
    assert row["processes"] == 2 and row["parameters"] > 0
    for key in ("ddp_pairs_per_s", "fsdp_pairs_per_s", "ddp_peak_gib", "fsdp_peak_gib", "memory_ratio_fsdp_over_ddp",
                "speed_ratio_fsdp_over_ddp"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert abs(row["ddp_final_loss"] - row["fsdp_final_loss"]) < 1e-5
    assert "FSDP/DDP memory" in res.stdout
