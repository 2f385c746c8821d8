"""Shared by the tests/test_hostile_*.py suites: run the command on a hostile input (in process,
or in a subprocess with limits on memory, time and file size) and check what every refusal
must hold: the documented exit code, exactly one line on stderr (no traceback, no abort, no
"internal error"), the input unchanged, and nothing left at --out or beside it.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from moba_rewrite import cli

ROOT = Path(__file__).resolve().parents[1]
PROG = "moba-rewrite"


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def digest(path: Path) -> dict[str, str]:
    """sha256 of every regular file under `path` (links not followed), to prove it unchanged."""
    path = Path(path)
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    found = {}
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in files:
            f = Path(root) / name
            if f.is_file() and not f.is_symlink():
                found[str(f.relative_to(path))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return found


def run_in_process(argv, capfd) -> Outcome:
    """`moba-rewrite ARGV` through `cli.main`, stdout and stderr captured at the fd level (so a
    library writing to the real stderr is seen too)."""
    capfd.readouterr()
    code = cli.main([str(a) for a in argv])
    got = capfd.readouterr()
    return Outcome(code, got.out, got.err)


def _limits(memory: int | None, file_size: int | None, cpu_s: int | None):
    def apply() -> None:
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        if file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), no kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        if cpu_s is not None:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    return apply


def run_python(code: str, *, cwd: Path, memory: int | None = 6 << 30, file_size: int | None = None,
               cpu_s: int | None = 120, timeout: float = 180) -> Outcome:
    """`python -c CODE` with this checkout first on the path and hard limits on address space,
    file size (RLIMIT_FSIZE: how a full disk is simulated without filling one) and CPU time."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               MOBA_REWRITE_PROGRESS="0", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_limits(memory, file_size, cpu_s))
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def run_cli_subprocess(argv, *, cwd: Path, **limits) -> Outcome:
    return run_python(f"import sys; from moba_rewrite.cli import main; sys.exit(main({[str(a) for a in argv]!r}))",
                      cwd=cwd, **limits)


def assert_refused(got: Outcome, code: int, *, mentions: str | None = None) -> str:
    """The documented exit code and exactly one clean line on stderr; returns that line."""
    lines = got.err.splitlines()
    assert got.code == code, f"exit {got.code}, expected {code}; stderr:\n{got.err}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{got.err}"
    line = lines[0]
    assert line.startswith(f"{PROG}: error: "), line
    assert "Traceback" not in got.err and "internal error" not in line, line
    if mentions is not None:
        assert mentions in line, line
    return line


def assert_nothing_left(out: Path) -> None:
    """No output, and no temporary or backup file beside it."""
    out = Path(out)
    assert not out.exists() and not out.is_symlink(), f"{out} exists"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, f"left beside {out}: {leftovers}"
