"""Writing under hostile conditions: a full disk (simulated with RLIMIT_FSIZE, never by filling
one), signals in the middle of a write, and inputs whose links would make a copy recurse. The
process never aborts, the error is one line with the documented exit code, the input is
unchanged, and nothing is left at --out or beside it (issue 17).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import textwrap

import pytest

from hostile_tools import Outcome, assert_nothing_left, assert_refused, digest, run_in_process, run_python
from moba_rewrite import checkpoints as ck
from moba_rewrite.exit_codes import (EXIT_CHECKPOINT, EXIT_INTERRUPTED, EXIT_MISSING_PACKAGE, EXIT_OK,
                                     EXIT_OUTPUT_UNWRITABLE, EXIT_TERMINATED)
from test_checkpoints import make_llama, save_hf

POLICY = "defaults: {block_size: 8, top_k: 2}\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-out")
    save_hf(make_llama(layers=2), root / "llama")
    (root / "policy.yaml").write_text(POLICY)
    return root


@contextlib.contextmanager
def file_size_limit(limit: int):
    """RLIMIT_FSIZE for this process while the block runs (writes past it fail with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_full_disk_while_writing_pt2_or_aoti_is_one_line_not_an_abort(base, tmp_path):
    """torch's archive writer used to finalise the failed file again at exit and SIGABRT. One
    subprocess (limited to 60 kB per file): the command writing pt2, then both writers directly
    (AOTInductor's compile replaced by a plain save: its package is written by the same torch
    archive writer, which is what aborted)."""
    out = tmp_path / "model.pt2"
    before = digest(base / "llama")
    argv = ["rewrite", str(base / "llama"), "--policy", str(base / "policy.yaml"), "--out", str(out),
            "--format", "pt2", "--no-progress", "-q"]
    code = textwrap.dedent(f"""
        import sys, torch, torch._inductor
        from moba_rewrite.cli import main
        from moba_rewrite.exporters import aoti, pt2
        from moba_rewrite.exporters.common import OutputWriteFailed
        print("exit", main({argv!r}), flush=True)
        torch._inductor.aoti_compile_and_package = lambda ep, package_path: torch.export.save(ep, package_path)
        ep = torch.export.export(torch.nn.Linear(256, 256), (torch.randn(2, 256),))
        for name, save in (("pt2", pt2.save_pt2), ("aoti", aoti.save_aoti)):
            try:
                save(ep, {str(tmp_path)!r} + "/" + name + ".pt2")
                print(name, "wrote")
            except OutputWriteFailed as exc:
                print(name, "refused", exc.errno)
    """)
    got = run_python(code, cwd=tmp_path, file_size=60_000, memory=None)
    assert got.code == 0, got.err  # no abort
    assert f"exit {EXIT_OUTPUT_UNWRITABLE}" in got.out, got.out
    assert_refused(Outcome(EXIT_OUTPUT_UNWRITABLE, "", got.err), EXIT_OUTPUT_UNWRITABLE,
                   mentions=f"{out}: expected a writable location (File too large)")
    assert "pt2 refused 27" in got.out and "aoti refused 27" in got.out, got.out
    assert digest(base / "llama") == before
    assert_nothing_left(out)


def test_full_disk_while_copying_an_hf_checkpoint(base, tmp_path, capfd):
    out = tmp_path / "out"
    before = digest(base / "llama")
    with file_size_limit(20_000):  # config.json fits, model.safetensors does not
        got = run_in_process(["rewrite", base / "llama", "--policy", base / "policy.yaml", "--out", out,
                              "--no-progress", "-q", "--no-verify"], capfd)
    assert_refused(got, EXIT_OUTPUT_UNWRITABLE, mentions=f"{out}: expected a writable location")
    assert digest(base / "llama") == before
    assert_nothing_left(out)


class _NoHandler(Exception):
    pass


def _unexpected_sigterm(signum, frame):
    raise _NoHandler("the command did not handle SIGTERM")


@pytest.mark.parametrize("how", ["sigterm", "ctrl_c"])
def test_a_signal_in_the_middle_of_a_write_leaves_nothing(base, tmp_path, capfd, monkeypatch, how):
    """The signal arrives after the first file of the copy: 143 (SIGTERM) or 130 (Ctrl-C), one
    line, no output and no temporary directory. (In process: a fallback handler turns a missed
    SIGTERM into a test failure instead of killing the test run.)"""
    out = tmp_path / "out"
    copy = ck._copy_file

    def copy_then_signal(src, dst):
        copy(src, dst)
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(ck, "_copy_file", copy_then_signal)
    previous = signal.signal(signal.SIGTERM, _unexpected_sigterm)
    try:
        got = run_in_process(["rewrite", base / "llama", "--policy", base / "policy.yaml", "--out", out,
                              "--no-progress", "-q"], capfd)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if how == "sigterm":
        assert got.code == EXIT_TERMINATED and got.err == "moba-rewrite: terminated\n", got.err
    else:
        assert got.code == EXIT_INTERRUPTED and got.err == "moba-rewrite: interrupted\n", got.err
    assert_nothing_left(out)


def test_links_and_special_files_inside_a_checkpoint_are_not_followed(base, tmp_path, capfd):
    """`latest -> .` (training scripts) used to be copied ~40 levels deep; a FIFO would block."""
    d = tmp_path / "ckpt"
    import shutil

    shutil.copytree(base / "llama", d)
    (d / "latest").symlink_to(".")
    (d / "loop").symlink_to("loop")
    (d / "notes").mkdir()
    (d / "notes" / "README").write_text("kept\n")
    os.mkfifo(d / "pipe")
    before = digest(d)
    out = tmp_path / "out"
    got = run_in_process(["rewrite", d, "--policy", base / "policy.yaml", "--out", out, "--no-progress", "-q"], capfd)
    assert got.code == EXIT_OK, got.err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "moba_policy.json",
                                                     "moba_rewrite.json", "model.safetensors", "notes"]
    assert (out / "notes" / "README").read_text() == "kept\n"
    assert digest(d) == before


@pytest.mark.parametrize("argv", [["routes", "{ckpt}", "--policy", "{policy}", "--out", "{out}"],
                                  ["bench", "--builtin", "--quick", "--plot", "{out}"]])
def test_a_missing_plotting_package_is_one_line_naming_the_install(base, tmp_path, capfd, monkeypatch, argv):
    """Without matplotlib (the `plot` extra), drawing commands answer before any work, exit 12."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: find_spec -> None
    out = tmp_path / "plot.png"
    argv = [a.format(ckpt=base / "llama", policy=base / "policy.yaml", out=out) for a in argv]
    assert_refused(run_in_process(argv, capfd), EXIT_MISSING_PACKAGE,
                   mentions="pip install 'moba-rewrite[plot]'")
    assert_nothing_left(out)


def test_a_file_name_with_a_line_break_still_gives_one_line(tmp_path, capfd):
    bad = tmp_path / "two\nlines"
    assert_refused(run_in_process(["inspect", bad], capfd), EXIT_CHECKPOINT, mentions="two\\nlines")


def test_disk_full_raised_deep_inside_an_exporter_is_the_outputs_problem():
    """onnx and safetensors report a full disk wrapped in their own errors: still exit 7."""
    import errno

    from moba_rewrite.exporters.common import OutputWriteFailed, as_output_failure

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("export failed") from inner
    except RuntimeError as outer:
        found = as_output_failure(outer)
    assert isinstance(found, OutputWriteFailed) and found.errno == errno.ENOSPC
    assert as_output_failure(RuntimeError("a real export bug")) is None
    assert as_output_failure(FileNotFoundError(errno.ENOENT, "no compiler")) is None


def test_an_unreadable_input_file_is_blamed_not_the_output(base, tmp_path, capfd):
    """A file of the checkpoint that fails to read (here a link to /proc/self/mem, whose first
    page is unmapped: EIO) is the input's problem, exit 3, named by its own path."""
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(base / "llama", d)
    (d / "notes.bin").symlink_to("/proc/self/mem")
    out = tmp_path / "out"
    assert_refused(run_in_process(["rewrite", d, "--policy", base / "policy.yaml", "--out", out, "--no-progress",
                                   "-q"], capfd), EXIT_CHECKPOINT, mentions=f"{d / 'notes.bin'}: expected a readable file")
    assert_nothing_left(out)
