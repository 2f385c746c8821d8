"""The `moba-rewrite` command: checkpoints in; rewritten, compiled and exported artifacts out.

Subcommands: `inspect`, `policy init|check|schema`, `rewrite`, `demo`, `bench`, `routes`
(reference: docs/CLI.md). Errors are one line, `moba-rewrite: error: <file>: <what was
expected>`, with an exit status per kind of problem (`EXIT_*`, listed in docs/CLI.md);
`--debug` shows the traceback instead.

Layout: errors (exit codes, CliError), output (progress, tables, reports), steps (reading,
sampling, planning shared by the commands), artifacts (writing and verifying hf / pt2 / aoti /
onnx), parser (argparse), and one module per command family: inspect_cmd, policy_cmd,
rewrite_cmd, misc_cmd (demo, routes, bench) with bench_builtin.
"""

from __future__ import annotations

import sys
from typing import Sequence

from moba_rewrite.cli.artifacts import FORMATS
from moba_rewrite.cli.errors import (EXIT_ARCHITECTURE, EXIT_CHECKPOINT, EXIT_EXPORT, EXIT_INTERNAL, EXIT_OK,
                                     EXIT_OUTPUT_EXISTS, EXIT_OUTPUT_UNWRITABLE, EXIT_PICKLE, EXIT_POLICY,
                                     EXIT_USAGE, EXIT_VALUE, EXIT_VERIFY, PROG, CliError, first_line)
from moba_rewrite.cli.output import Progress, say
from moba_rewrite.cli.parser import build_parser
from moba_rewrite.cli.rewrite_cmd import RewriteResult, run_rewrite

__all__ = ["main", "build_parser", "run_rewrite", "RewriteResult", "CliError", "Progress", "say", "FORMATS", "PROG",
           "EXIT_OK", "EXIT_INTERNAL", "EXIT_USAGE", "EXIT_CHECKPOINT", "EXIT_ARCHITECTURE", "EXIT_POLICY",
           "EXIT_OUTPUT_EXISTS", "EXIT_OUTPUT_UNWRITABLE", "EXIT_VALUE", "EXIT_PICKLE", "EXIT_VERIFY", "EXIT_EXPORT"]


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
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        if getattr(args, "debug", False):
            raise
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return exc.code
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001  (one line, not a traceback, unless --debug)
        if getattr(args, "debug", False):
            raise
        sys.stderr.write(f"{PROG}: error: internal error ({type(exc).__name__}: {first_line(exc)}); rerun with "
                         f"--debug for the traceback\n")
        return EXIT_INTERNAL

