"""`benchmarks/model_check.py`, the first step of the prepared GPU check, runs and passes on the CPU
(fp32): it keeps working between the sessions that have a GPU, and its checks are end-to-end
checks of the model path in their own right (dense limit = original, every MoBA call of a prefill
and of `generate()` = the reference on its inputs, compiled = eager, and with `dense_below` crossed
mid-decode the compiled static decode = eager)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_model_check_passes_on_cpu():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "model_check.py")], capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(lines) == 10 and all(line.startswith("ok") for line in lines), run.stdout
    assert "model_check: all passed" in run.stdout


def test_cp_local_attention_benchmark_runs_and_its_backends_agree():
    """`benchmarks/bench_cp_local.py`, the prepared GPU check's context-parallel step, at toy sizes on
    the CPU (Triton under its interpreter): it exits non-zero when the torch and Triton kernels
    disagree on one rank's problem."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cp_local.py"), "--dry-run"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| forward + backward |" in run.stdout
