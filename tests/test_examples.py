"""Every script in examples/ runs to completion on its tiny model and reaches its own checks
("ok: ..."). They run in this process (runpy, as `__main__`, with a fresh argv, the repository
root as working directory and a private temporary folder): a subprocess each would pay the
torch/transformers import again (~4 s) for no extra coverage. The real console script is
run once as a subprocess (`moba-rewrite --help`), and its entry point is checked to be `main`."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
# Arguments for scripts whose full run takes minutes: a tiny budget that still runs every step.
EXAMPLE_ARGS = {"activate_moba.py": ["--quick", "--plot", "activate_moba.png"]}


def test_examples_are_found():
    assert {"rewrite_hf_generate.py", "rewrite_custom_model.py", "finetune_moba.py",
            "load_and_compile.py", "decode_with_means_cache.py", "activate_moba.py",
            "context_parallel.py"} <= set(EXAMPLES)


@pytest.fixture
def fresh_process_state(tmp_path, monkeypatch):
    """What a new interpreter would give the script: argv, cwd, an empty temp folder, no compiled
    graphs left over from other tests (and none left behind for them)."""
    monkeypatch.setattr(sys, "argv", ["example"])
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, fresh_process_state, capsys, tmp_path):
    sys.argv[0] = str(ROOT / "examples" / name)
    sys.argv[1:] = [a if not a.endswith(".png") else str(tmp_path / a) for a in EXAMPLE_ARGS.get(name, [])]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:  # a script may end with sys.exit(0)
        assert exc.code in (None, 0), f"{name} exited with {exc.code}"
    out = capsys.readouterr().out
    assert out.strip(), f"{name} printed nothing"
    assert "ok:" in out.strip().splitlines()[-1], out[-2000:]


@pytest.mark.slow
def test_context_parallel_example_runs_a_hybrid_stack(fresh_process_state, capsys):
    """`examples/context_parallel.py --hybrid`: a Qwen3.5 stack (gated delta nets between MoBA
    attention layers) sharded over two ranks, prefill, training step and decoding equal to one process."""
    sys.argv[:] = [str(ROOT / "examples" / "context_parallel.py"), "--hybrid"]
    runpy.run_path(sys.argv[0], run_name="__main__")
    out = capsys.readouterr().out
    assert "(Qwen3_5ForCausalLM)" in out and "ok:" in out.strip().splitlines()[-1], out[-2000:]


def test_console_script_entry_point():
    """pyproject's `moba-rewrite` script names the command's `main`; run once for real as a subprocess."""
    from moba_rewrite import cli

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["moba-rewrite"]
    module, func = target.split(":")
    assert getattr(__import__(module, fromlist=[func]), func) is cli.main
    script = shutil.which("moba-rewrite")
    argv = [script] if script else [sys.executable, "-m", "moba_rewrite.cli"]  # not installed: the same main
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([*argv, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: moba-rewrite") and "rewrite" in proc.stdout and "Exit codes" in proc.stdout
