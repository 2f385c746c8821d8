"""The `moba-rewrite` command: checkpoints in; rewritten, compiled and exported artifacts out.

Subcommands: `inspect`, `policy init|check|schema`, `rewrite`, `generate`, `demo`, `bench`,
`routes`, `eval`, `calibrate` (reference: docs/CLI.md). Errors are one line, `moba-rewrite: error: <file>: <what was
expected>`, with an exit status per kind of problem (`EXIT_*`, listed in docs/CLI.md);
`--debug` shows the traceback instead.

Layout: errors (exit codes, CliError), output (progress, tables, reports), steps (reading,
sampling, planning shared by the commands), artifacts (writing and verifying hf / pt2 / aoti /
onnx), generation_artifact (`rewrite --generate`), parser (argparse), and one module per command
family: inspect_cmd, policy_cmd, rewrite_cmd, generate_cmd (the greedy runner), eval_cmd,
misc_cmd (demo, routes, bench) with bench_builtin.
"""

from __future__ import annotations

import sys
from typing import Sequence

from moba_rewrite.cli.artifacts import FORMATS
from moba_rewrite.cli.errors import (EXIT_ARCHITECTURE, EXIT_CHECKPOINT, EXIT_EXPORT, EXIT_INTERNAL,
                                     EXIT_INTERRUPTED, EXIT_MISSING_PACKAGE, EXIT_OK, EXIT_OUTPUT_EXISTS,
                                     EXIT_OUTPUT_UNWRITABLE, EXIT_PICKLE, EXIT_POLICY, EXIT_TERMINATED, EXIT_USAGE,
                                     EXIT_VALUE, EXIT_VERIFY, PROG, CliError, first_line, missing_package)
from moba_rewrite.cli.output import Progress, say
from moba_rewrite.cli.parser import build_parser
from moba_rewrite.cli.rewrite_cmd import RewriteResult, run_rewrite

__all__ = ["main", "build_parser", "run_rewrite", "RewriteResult", "CliError", "Progress", "say", "FORMATS", "PROG",
           "EXIT_OK", "EXIT_INTERNAL", "EXIT_USAGE", "EXIT_CHECKPOINT", "EXIT_ARCHITECTURE", "EXIT_POLICY",
           "EXIT_OUTPUT_EXISTS", "EXIT_OUTPUT_UNWRITABLE", "EXIT_VALUE", "EXIT_PICKLE", "EXIT_VERIFY", "EXIT_EXPORT",
           "EXIT_MISSING_PACKAGE", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so temporary outputs are removed on the way out."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `moba-rewrite` command; returns the exit status."""
    import warnings

    # torch's own deprecation chatter while loading programs; not the user's concern
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    debug = bool(getattr(args, "debug", False))
    with _sigterm_unwinds():
        try:
            return _run(args, debug)
        except Terminated:
            sys.stderr.write(f"{PROG}: terminated\n")
            return EXIT_TERMINATED


def _run(args, debug: bool) -> int:
    """The command, with every failure turned into one line on stderr and its exit status."""
    from moba_rewrite import third_party

    third_party.set_passthrough(debug)
    try:
        with third_party.held_back():  # other libraries' output: replayed on success, dropped on error
            return int(args.func(args) or 0)
    except CliError as exc:
        if debug:
            raise
        sys.stderr.write(f"{PROG}: error: {_one_line(str(exc))}\n")
        return exc.code
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as exc:
        if debug or not exc.name or exc.name.split(".")[0] in ("moba_rewrite", "passes"):
            return _internal(exc, debug)
        err = missing_package(exc.name, f"{PROG} {getattr(args, 'command', '')}".strip())
        sys.stderr.write(f"{PROG}: error: {err}\n")
        return err.code
    except Exception as exc:  # noqa: BLE001  (one line, not a traceback, unless --debug)
        from moba_rewrite.integrations.hf_version import UnsupportedTransformersError

        if isinstance(exc, UnsupportedTransformersError) and not debug:
            sys.stderr.write(f"{PROG}: error: {exc}\n")
            return EXIT_MISSING_PACKAGE
        return _internal(exc, debug)


def _one_line(text: str) -> str:
    """A message on one line even when a file name holds a line break or a control character."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _internal(exc: Exception, debug: bool) -> int:
    if debug:
        raise exc
    sys.stderr.write(f"{PROG}: error: internal error ({type(exc).__name__}: {_one_line(first_line(exc))}); rerun with "
                     f"--debug for the traceback\n")
    return EXIT_INTERNAL


class _sigterm_unwinds:
    """While the command runs, SIGTERM raises `Terminated` (main thread only; restored after)."""

    def __enter__(self):
        import signal
        import threading

        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, _on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
