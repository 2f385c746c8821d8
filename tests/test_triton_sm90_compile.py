"""The Triton kernels compile for sm_90 (Hopper) on this CPU machine, as the JIT and Inductor
would launch them: catches GPU-only compile errors (such as fp64 scalars from Inductor, which
broke torch.compile on an H200 once) without a GPU. Uses Triton's bundled ptxas."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
# One variant per kernel family (the full list: `python benchmarks/bench_gpu.py --compile-sm90`), and the
# attention kernels with a value head dim of their own (DeepSeek-V3 / Kimi-K2 MLA: q/k 192, v 128).
ONLY = (r"^D=64 (fwd mode=2 causal=True mask=False|fwd mode=0 repair|bwd causal=True|decode merge=True|"
        r"fwd finish repair=False|gate causal=True top-8 split3)|"
        r"^D=192 Dv=128 (fwd mode=2 causal=True mask=False|bwd causal=True mask=False|decode merge=True)")


def test_kernels_compile_for_sm90_with_inductor_style_float_scalars():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--compile-sm90", "--only", ONLY],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    if "No module named" in out and "nvidia" in out:
        pytest.skip("this triton build has no NVIDIA backend")
    assert res.returncode == 0, out[-3000:]
    compiled = [line for line in res.stdout.splitlines() if line.strip().startswith("ok ")]
    assert len(compiled) == 9, out[-3000:]
    assert "all variants compiled" in res.stdout
