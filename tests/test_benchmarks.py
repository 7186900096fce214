"""The benchmark scripts that must run where there is nothing to measure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script measures it")
def test_the_gpu_benchmark_says_there_is_no_gpu_and_exits_cleanly(tmp_path):
    results = BENCHMARKS / "results" / "gpu.json"
    before = results.read_bytes() if results.exists() else None
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("no GPU: ") and "nothing measured" in run.stdout
    assert "Traceback" not in run.stderr
    after = results.read_bytes() if results.exists() else None
    assert after == before  # no figures written where none were measured
